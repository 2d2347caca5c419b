/**
 * The bar above the chat: the session's status line (agent, state, tokens, context) and the
 * mode and model selects. Each part is redrawn only when what it shows changed: rebuilding the
 * `<option>`s on every repaint (as many as chunks stream in) closed a select the user had open.
 */

import { SessionConnection } from './connection';
import { h } from './dom';
import { __ } from './i18n';
import { formatTokens } from './reducer';
import { Mode, ModelState, SessionView } from './view';

/** States in which the session's socket and agent are gone for good or for now. */
export const NOT_RUNNING = new Set(['stopped', 'error', 'suspended']);

export class ChatBar {
  readonly node: HTMLElement;
  readonly status = h('div', { className: 'jp-AcpPanel-status' });
  readonly modeSelect: HTMLSelectElement;
  readonly modelSelect: HTMLSelectElement;
  private readonly _modeLabel: HTMLElement;
  private readonly _modelLabel: HTMLElement;
  private _statusSeen = '';
  private _modesSeen: { modes: Mode[]; current: string | null; running: boolean } | null = null;
  private _modelsSeen: { models: ModelState | null; disabled: boolean } | null = null;

  constructor(actions: { setMode(id: string): void; setModel(value: string): void }) {
    this.modeSelect = h('select', {
      className: 'jp-mod-styled jp-AcpPanel-mode',
      'aria-label': __('Mode'),
      onchange: () => actions.setMode(this.modeSelect.value)
    }) as HTMLSelectElement;
    this.modelSelect = h('select', {
      className: 'jp-mod-styled jp-AcpPanel-model',
      'aria-label': __('Model'),
      onchange: () => actions.setModel(this.modelSelect.value)
    }) as HTMLSelectElement;
    this._modeLabel = h('label', { className: 'jp-AcpPanel-modeLabel' }, __('Mode') + ' ', this.modeSelect);
    this._modelLabel = h('label', { className: 'jp-AcpPanel-modeLabel jp-AcpPanel-modelLabel' }, __('Model') + ' ', this.modelSelect);
    this.node = h('div', { className: 'jp-AcpPanel-chatbar' }, this.status, this._modeLabel, this._modelLabel);
  }

  /** No session shown: a sentence instead of the status, no selects. */
  showText(text: string): void {
    if (this._statusSeen !== text) {
      this._statusSeen = text;
      this.status.textContent = text;
    }
    this._modeLabel.hidden = true;
    this._modelLabel.hidden = true;
    this._modesSeen = null;
    this._modelsSeen = null;
  }

  /** The session `conn` shows; `pending` is what the panel is doing to it (e.g. "resuming…"). */
  show(conn: SessionConnection, view: SessionView, pending: string | null): void {
    const where =
      pending ??
      (conn.ended !== null
        ? __('ended')
        : conn.suspended
          ? __('suspended')
          : conn.connected
            ? stateWord(view.state)
            : __('reconnecting…'));
    const context = view.context?.size ? ` · ${__('context %1/%2', view.context.used ?? 0, view.context.size)}` : '';
    const name = view.agentDisplayName || view.agent || '…';
    const tail = ` · ${where}${view.error ? `: ${view.error}` : ''} · `;
    const tokens = formatTokens(view.tokens.total_tokens);
    const status = [name, tail, tokens, context].join('\u0000');
    if (status !== this._statusSeen) {
      this._statusSeen = status;
      this.status.replaceChildren(
        h('span', { className: 'jp-AcpPanel-agentName' }, name),
        tail,
        h('span', { className: 'jp-AcpPanel-tokens', 'data-testid': 'acp-session-tokens' }, tokens),
        context
      );
    }
    // (a suspended or ended session has no agent to switch: reopening it comes first)
    const running = conn.ended === null && !conn.suspended && !NOT_RUNNING.has(view.state);
    this._drawModes(view, running);
    this._drawModels(view, running, !!pending);
  }

  /** Draw the model select again at the next `show` (a change was refused: back to the current one). */
  resetModels(): void {
    this._modelsSeen = null;
  }

  private _drawModes(view: SessionView, running: boolean): void {
    const seen = this._modesSeen;
    if (seen && seen.modes === view.modes && seen.current === view.currentMode && seen.running === running) {
      return;
    }
    this._modesSeen = { modes: view.modes, current: view.currentMode, running };
    this._modeLabel.hidden = view.modes.length === 0; // (an agent without modes: no selector)
    this.modeSelect.disabled = !running;
    if (!seen || seen.modes !== view.modes) {
      this.modeSelect.replaceChildren(...view.modes.map(m => h('option', { value: m.id }, m.name)));
    }
    if (view.currentMode !== null) {
      this.modeSelect.value = view.currentMode;
    }
  }

  private _drawModels(view: SessionView, running: boolean, pending: boolean): void {
    const models = view.models;
    const disabled = !running || view.busy || pending;
    const seen = this._modelsSeen;
    if (seen && seen.models === models && seen.disabled === disabled) {
      return;
    }
    this._modelsSeen = { models, disabled };
    this._modelLabel.hidden = !models || models.available.length === 0;
    if (!models) {
      return;
    }
    if (!seen || seen.models?.available !== models.available) {
      this.modelSelect.replaceChildren(
        ...models.available.map(m => h('option', { value: m.value, title: m.description || undefined }, m.name))
      );
    }
    this.modelSelect.value = models.current;
    this.modelSelect.disabled = disabled;
  }
}

/** The server's session states (session_types.SessionState) in the user's language (each
 * msgid written out, so that translation tools find it). */
const STATE_WORDS: Record<string, () => string> = {
  starting: () => __('starting…'),
  ready: () => __('ready'),
  busy: () => __('busy'),
  stopped: () => __('stopped'),
  error: () => __('error'),
  suspended: () => __('suspended')
};

/** A session state in the user's language; one this build does not know, as the server said it. */
export function stateWord(state: string): string {
  return Object.prototype.hasOwnProperty.call(STATE_WORDS, state) ? STATE_WORDS[state]() : state;
}
