/**
 * The left-sidebar panel: pick an agent, see my sessions and today's tokens, and chat.
 *
 * Everything the chat shows comes from the session's reduced view (reducer.ts); this module
 * only draws it and turns clicks into API calls or socket frames. Drawing is batched to one
 * repaint per animation frame, so a fast stream of chunks costs one render per frame.
 */

import { Widget } from '@lumino/widgets';

import { AcpApi, AcpApiError, AgentInfo, SessionInfo, UsageInfo } from './api';
import { SessionConnection } from './connection';
import { diffLines } from './diff';
import { renderMarkdown } from './markdown';
import { ChatItem, formatTokens, SessionView } from './reducer';

type Attrs = Record<string, string | boolean | ((ev: Event) => void) | undefined>;

/** A tiny DOM builder: text children are always text nodes, never HTML. */
function h(tag: string, attrs: Attrs = {}, ...children: (Node | string | null | undefined)[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) {
      continue;
    }
    if (typeof value === 'function') {
      el.addEventListener(key.replace(/^on/, ''), value);
    } else if (key === 'className') {
      el.className = String(value);
    } else {
      el.setAttribute(key, value === true ? '' : value);
    }
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      el.append(child);
    }
  }
  return el;
}

/** `path` relative to the session's workspace when inside it (shorter, and what the file browser shows). */
export function displayPath(path: string, workspace: string): string {
  const root = workspace.replace(/\/+$/, '');
  return root && path.startsWith(root + '/') ? path.slice(root.length + 1) : path;
}

const STATUS_LABEL: Record<string, string> = {
  pending: 'pending',
  in_progress: 'running',
  completed: 'done',
  failed: 'failed'
};

export class AcpPanel extends Widget {
  readonly api: AcpApi;
  private _agents: AgentInfo[] = [];
  private _defaultAgent: string | null = null;
  private _sessions: SessionInfo[] = [];
  private _usage: UsageInfo | null = null;
  private _conn: SessionConnection | null = null;
  private _frame = 0;

  private _agentSelect: HTMLSelectElement;
  private _sessionList: HTMLElement;
  private _usageLine: HTMLElement;
  private _banner: HTMLElement;
  private _status: HTMLElement;
  private _modeSelect: HTMLSelectElement;
  private _log: HTMLElement;
  private _input: HTMLTextAreaElement;
  private _sendButton: HTMLButtonElement;
  private _cancelButton: HTMLButtonElement;

  /**
   * @param onTurnEnd called after each turn (e.g. to refresh the file browser, since the agent
   * writes files behind JupyterLab's back)
   */
  constructor(
    api?: AcpApi,
    private readonly onTurnEnd?: () => void
  ) {
    super();
    this.api = api ?? new AcpApi();
    this.id = 'jupyter-acp-panel';
    this.addClass('jp-AcpPanel');
    this.title.caption = 'Coding agents';

    this._agentSelect = h('select', {
      className: 'jp-mod-styled jp-AcpPanel-agent',
      'aria-label': 'Agent'
    }) as HTMLSelectElement;
    this._sessionList = h('ul', { className: 'jp-AcpPanel-sessions', 'aria-label': 'My sessions' });
    this._usageLine = h('div', { className: 'jp-AcpPanel-usage', 'data-testid': 'acp-usage-today' });
    this._banner = h('div', { className: 'jp-AcpPanel-banner', role: 'alert' });
    this._status = h('div', { className: 'jp-AcpPanel-status' });
    this._modeSelect = h('select', {
      className: 'jp-mod-styled jp-AcpPanel-mode',
      'aria-label': 'Mode',
      onchange: () => this._conn?.setMode(this._modeSelect.value)
    }) as HTMLSelectElement;
    this._log = h('div', { className: 'jp-AcpPanel-log', 'aria-live': 'polite' });
    this._input = h('textarea', {
      className: 'jp-mod-styled jp-AcpPanel-input',
      placeholder: 'Ask the agent… (Enter sends, Shift+Enter for a new line)',
      rows: '3',
      onkeydown: (ev: Event) => {
        const key = ev as KeyboardEvent;
        if (key.key === 'Enter' && !key.shiftKey && !key.isComposing) {
          key.preventDefault();
          void this.submit();
        }
      }
    }) as HTMLTextAreaElement;
    this._sendButton = h(
      'button',
      { className: 'jp-Button jp-mod-styled jp-mod-accept', onclick: () => void this.submit() },
      'Send'
    ) as HTMLButtonElement;
    this._cancelButton = h(
      'button',
      { className: 'jp-Button jp-mod-styled jp-mod-warn', onclick: () => this._conn?.cancel() },
      'Cancel'
    ) as HTMLButtonElement;

    this.node.append(
      h(
        'div',
        { className: 'jp-AcpPanel-header' },
        h('div', { className: 'jp-AcpPanel-title' }, 'Coding agents'),
        h(
          'div',
          { className: 'jp-AcpPanel-row' },
          this._agentSelect,
          h(
            'button',
            {
              className: 'jp-Button jp-mod-styled jp-mod-accept',
              title: 'Start a new session with the selected agent',
              onclick: () => void this.newSession()
            },
            'New session'
          )
        ),
        this._usageLine,
        this._sessionList
      ),
      this._banner,
      h(
        'div',
        { className: 'jp-AcpPanel-chatbar' },
        this._status,
        h('label', { className: 'jp-AcpPanel-modeLabel' }, 'Mode ', this._modeSelect)
      ),
      this._log,
      h(
        'div',
        { className: 'jp-AcpPanel-composer' },
        this._input,
        h('div', { className: 'jp-AcpPanel-row' }, this._cancelButton, this._sendButton)
      )
    );
    this.draw();
  }

  /** The session the chat shows (null before one is opened). */
  get connection(): SessionConnection | null {
    return this._conn;
  }

  dispose(): void {
    this._conn?.dispose();
    super.dispose();
  }

  /** Show an error in words the user understands (the API's `message`), or clear it. */
  showError(error: unknown): void {
    const text =
      error instanceof AcpApiError
        ? error.message
        : error instanceof Error
          ? error.message
          : error
            ? String(error)
            : '';
    this._banner.textContent = text;
    this._banner.classList.toggle('jp-mod-visible', !!text);
  }

  /** Reload agents, sessions and usage (on first show and after changes). */
  async refresh(): Promise<void> {
    try {
      const [agents, sessions, usage] = await Promise.all([
        this.api.agents(),
        this.api.sessions(),
        this.api.usage()
      ]);
      this._agents = agents.agents;
      this._defaultAgent = agents.default;
      this._sessions = sessions;
      // after a reload, come back to the conversation I was in (its history is replayed)
      const live = sessions.filter(s => s.state !== 'stopped' && s.state !== 'error');
      if (!this._conn && live.length) {
        this.open(live.reduce((a, b) => (b.last_activity > a.last_activity ? b : a)).id);
      }
      this._usage = usage;
      this.drawAgents();
      this.drawSessions();
      this.drawUsage();
      if (!agents.agents.some(a => a.available)) {
        this.showError('No agent can run here: ' + agents.agents.map(a => `${a.display_name}: ${a.reason}`).join('; '));
      }
    } catch (e) {
      this.showError(e);
    }
  }

  async refreshUsage(): Promise<void> {
    try {
      [this._usage, this._sessions] = await Promise.all([this.api.usage(), this.api.sessions()]);
      this.drawUsage();
      this.drawSessions();
    } catch (e) {
      this.showError(e);
    }
  }

  /** Start a session with the selected agent (or `agent`), and open it. */
  async newSession(agent?: string): Promise<SessionInfo | null> {
    this.showError(null);
    const name = agent ?? (this._agentSelect.value || this._defaultAgent);
    try {
      const session = await this.api.createSession(name, true);
      this.open(session.id);
      await this.refreshUsage();
      return session;
    } catch (e) {
      this.showError(e);
      return null;
    }
  }

  /** Show the session `id` in the chat (connecting its socket). */
  open(id: string): void {
    if (this._conn?.id === id) {
      return;
    }
    this._conn?.dispose();
    const conn = new SessionConnection(this.api, id);
    this._conn = conn;
    conn.changed.connect(() => this.schedule());
    conn.turnEnded.connect(() => {
      void this.refreshUsage();
      this.onTurnEnd?.();
    });
    conn.sessionEnded.connect(() => void this.refreshUsage()); // (its list entry goes)
    this._log.replaceChildren();
    this.drawSessions();
    this.schedule();
  }

  /**
   * Send `text` as a prompt to the current session, opening one with the default agent (or
   * reusing my live one) when the chat shows none.
   */
  async sendText(text: string): Promise<void> {
    if (!text.trim()) {
      return;
    }
    if (!this._conn || this._conn.view.state === 'stopped') {
      this.showError(null);
      try {
        const session = await this.api.createSession(this._agentSelect.value || this._defaultAgent, false);
        this.open(session.id);
        void this.refreshUsage();
      } catch (e) {
        this.showError(e);
        return;
      }
    }
    this._conn!.prompt(text);
  }

  private async submit(): Promise<void> {
    const text = this._input.value;
    if (!text.trim()) {
      return;
    }
    this._input.value = '';
    await this.sendText(text);
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  private schedule(): void {
    if (!this._frame) {
      this._frame = requestAnimationFrame(() => {
        this._frame = 0;
        this.draw();
      });
    }
  }

  private drawAgents(): void {
    const selected = this._agentSelect.value || this._defaultAgent || '';
    this._agentSelect.replaceChildren(
      ...this._agents.map(a =>
        h(
          'option',
          {
            value: a.name,
            disabled: !a.available,
            title: a.available ? a.description : `Unavailable: ${a.reason}`,
            selected: a.name === selected
          },
          a.available ? a.display_name : `${a.display_name} — unavailable: ${a.reason}`
        )
      )
    );
  }

  private drawUsage(): void {
    const u = this._usage;
    if (!u) {
      this._usageLine.textContent = '';
      return;
    }
    const cap = u.quota?.max_tokens_per_day ?? 0;
    const today = u.today?.total_tokens ?? 0;
    this._usageLine.textContent = cap
      ? `Today: ${formatTokens(today)} of ${cap.toLocaleString('en-US')}`
      : `Today: ${formatTokens(today)}`;
  }

  private drawSessions(): void {
    const current = this._conn?.id;
    this._sessionList.replaceChildren(
      ...this._sessions.map(s =>
        h(
          'li',
          {
            className: 'jp-AcpPanel-session' + (s.id === current ? ' jp-mod-current' : ''),
            title: `Started ${new Date(s.created * 1000).toLocaleString()} in /${s.cwd}`
          },
          h(
            'button',
            { className: 'jp-AcpPanel-sessionOpen', onclick: () => this.open(s.id) },
            `${s.agent_display_name} · ${s.state} · ${formatTokens(s.tokens?.total_tokens ?? 0)}`
          ),
          h(
            'button',
            {
              className: 'jp-AcpPanel-sessionEnd',
              title: 'End this session',
              'aria-label': 'End session',
              onclick: () => void this.endSession(s.id)
            },
            '×'
          )
        )
      )
    );
  }

  private async endSession(id: string): Promise<void> {
    try {
      await this.api.deleteSession(id);
      if (this._conn?.id === id) {
        this._conn.dispose();
        this._conn = null;
        this._log.replaceChildren();
      }
      await this.refreshUsage();
      this.draw();
    } catch (e) {
      this.showError(e);
    }
  }

  /** Redraw the chat from the current view. */
  draw(): void {
    const conn = this._conn;
    const view = conn?.view;
    this.node.classList.toggle('jp-mod-noSession', !view);
    this._sendButton.disabled = !!view && view.busy;
    this._cancelButton.disabled = !view || !view.busy;
    if (!conn || !view) {
      this._status.textContent = 'No session open: pick an agent and start one, or just type.';
      (this._modeSelect.parentElement as HTMLElement).hidden = true;
      return;
    }
    const where = conn.ended !== null ? 'ended' : conn.connected ? view.state : 'reconnecting…';
    const context = view.context?.size ? ` · context ${view.context.used ?? 0}/${view.context.size}` : '';
    this._status.replaceChildren(
      h('span', { className: 'jp-AcpPanel-agentName' }, view.agentDisplayName || view.agent || '…'),
      ` · ${where}${view.error ? `: ${view.error}` : ''} · `,
      h('span', { className: 'jp-AcpPanel-tokens', 'data-testid': 'acp-session-tokens' },
        formatTokens(view.tokens.total_tokens)),
      context
    );
    (this._modeSelect.parentElement as HTMLElement).hidden = view.modes.length === 0;
    if (view.modes.length) {
      this._modeSelect.replaceChildren(
        ...view.modes.map(m => h('option', { value: m.id, selected: m.id === view.currentMode }, m.name))
      );
    }
    this.drawLog(view);
  }

  private drawLog(view: SessionView): void {
    const log = this._log;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.replaceChildren(...view.items.map(item => this.drawItem(item, view.workspace)));
    if (view.busy) {
      log.append(h('div', { className: 'jp-AcpPanel-working' }, 'The agent is working…'));
    }
    if (atBottom) {
      log.scrollTop = log.scrollHeight;
    }
  }

  private drawItem(item: ChatItem, workspace: string): HTMLElement {
    switch (item.kind) {
      case 'user':
        return h('div', { className: 'jp-AcpMsg jp-AcpMsg-user' }, item.text);
      case 'agent': {
        const el = h('div', { className: 'jp-AcpMsg jp-AcpMsg-agent jp-RenderedHTMLCommon' });
        el.innerHTML = renderMarkdown(item.text); // escaped by construction (markdown.ts)
        return el;
      }
      case 'thought':
        return h(
          'details',
          { className: 'jp-AcpMsg jp-AcpMsg-thought' },
          h('summary', {}, 'Thinking'),
          item.text
        );
      case 'tool':
        return h(
          'div',
          { className: `jp-AcpTool jp-AcpTool-${item.status}` },
          h(
            'div',
            { className: 'jp-AcpTool-head' },
            h('span', { className: 'jp-AcpTool-kind' }, item.toolKind),
            h('span', { className: 'jp-AcpTool-title' }, item.title),
            h('span', { className: 'jp-AcpTool-status' }, STATUS_LABEL[item.status] ?? item.status)
          ),
          ...(() => {
            // a location that is also a diff's path is shown once, above its diff
            const shown = new Set(item.content.map(c => (c.type === 'diff' ? c.path : '')));
            const where = item.locations.filter(l => !shown.has(l)).map(l => displayPath(l, workspace));
            return where.length ? [h('div', { className: 'jp-AcpTool-where' }, where.join(', '))] : [];
          })(),
          ...item.content.map(c => {
            if (c.type === 'diff') {
              return h(
                'div',
                { className: 'jp-AcpDiff' },
                h('div', { className: 'jp-AcpDiff-path' }, displayPath(c.path, workspace)),
                h(
                  'pre',
                  {},
                  ...diffLines(c.oldText, c.newText).map(l =>
                    h('div', { className: `jp-AcpDiff-line jp-AcpDiff-${l.op === '…' ? 'skip' : l.op === '+' ? 'add' : l.op === '-' ? 'del' : 'ctx'}` },
                      `${l.op} ${l.text}`)
                  )
                )
              );
            }
            if (c.type === 'text') {
              return h('pre', { className: 'jp-AcpTool-output' }, c.text);
            }
            return h('div', { className: 'jp-AcpTool-output' }, `terminal ${c.terminalId}`);
          })
        );
      case 'plan':
        return h(
          'div',
          { className: 'jp-AcpPlan' },
          h('div', { className: 'jp-AcpPlan-head' }, 'Plan'),
          h(
            'ol',
            {},
            ...item.entries.map(e =>
              h('li', { className: `jp-AcpPlan-${e.status}`, title: `${e.priority} priority` }, e.content)
            )
          )
        );
      case 'permission': {
        const resolved = item.resolved;
        const conn = this._conn;
        let footer: HTMLElement;
        if (resolved) {
          const chosen = item.options.find(o => o.optionId === resolved.optionId);
          const what =
            resolved.outcome === 'selected' && chosen ? `Answered: ${chosen.name}` : 'No answer (cancelled)';
          footer = h('div', { className: 'jp-AcpPermission-done' }, resolved.by === 'user' ? what : `${what} by ${resolved.by}`);
        } else {
          footer = h(
            'div',
            { className: 'jp-AcpPanel-row' },
            ...item.options.map(o =>
              h(
                'button',
                {
                  className: `jp-Button jp-mod-styled ${o.kind.startsWith('allow') ? 'jp-mod-accept' : 'jp-mod-warn'}`,
                  'data-option-id': o.optionId,
                  onclick: () => conn?.answer(item.requestId, o.optionId)
                },
                o.name
              )
            )
          );
        }
        return h(
          'div',
          { className: 'jp-AcpPermission' + (resolved ? '' : ' jp-mod-pending') },
          h('div', { className: 'jp-AcpPermission-head' }, `The agent asks permission: ${item.title}`),
          footer
        );
      }
      case 'turn':
        return h(
          'div',
          { className: 'jp-AcpTurn' },
          [
            item.stopReason === 'end_turn' ? 'Turn done' : `Turn ended: ${item.stopReason.replace(/_/g, ' ')}`,
            item.totalTokens ? formatTokens(item.totalTokens) : '',
            item.duration !== null ? `${item.duration.toFixed(1)} s` : ''
          ]
            .filter(Boolean)
            .join(' · ')
        );
      case 'error':
        return h('div', { className: 'jp-AcpMsg jp-AcpMsg-error', role: 'alert' }, item.message);
      case 'notice':
        return h('div', { className: 'jp-AcpTurn' }, item.text);
    }
  }
}
