/**
 * The left-sidebar panel: pick an agent, see my sessions (live and suspended) and today's tokens,
 * and chat.
 *
 * Everything the chat shows comes from the session's reduced view (reducer.ts); this module
 * only draws it and turns clicks into API calls or socket frames. Drawing is batched to one
 * repaint per animation frame, so a fast stream of chunks costs one render per frame. The input
 * (completion, images) is composer.ts, the session list sessions.ts, the chat items items.ts.
 */

import { Dialog, showDialog } from '@jupyterlab/apputils';
import { Widget } from '@lumino/widgets';

import { AcpApi, AcpApiError, AgentInfo, ImageBlock, SessionInfo, UsageInfo } from './api';
import { Composer } from './composer';
import { SessionConnection } from './connection';
import { h } from './dom';
import { drawItem } from './items';
import { Command, formatTokens, modelState, SessionView } from './reducer';
import { drawSessionList } from './sessions';

export { displayPath } from './dom';

/** States in which the session's socket and agent are gone for good or for now. */
const NOT_RUNNING = new Set(['stopped', 'error', 'suspended']);

export class AcpPanel extends Widget {
  readonly api: AcpApi;
  private _agents: AgentInfo[] = [];
  private _defaultAgent: string | null = null;
  private _sessions: SessionInfo[] = [];
  private _usage: UsageInfo | null = null;
  private _conn: SessionConnection | null = null;
  private _frame = 0;
  /** What the panel is doing to the session (creating, resuming), shown instead of its state. */
  private _pending: string | null = null;
  /** The session being resumed (shown as the current one in the list meanwhile). */
  private _pendingId: string | null = null;
  private _commandsSeen: Command[] = [];

  private _agentSelect: HTMLSelectElement;
  private _sessionList: HTMLElement;
  private _usageLine: HTMLElement;
  private _banner: HTMLElement;
  private _status: HTMLElement;
  private _modeSelect: HTMLSelectElement;
  private _modelSelect: HTMLSelectElement;
  private _log: HTMLElement;
  private _composer: Composer;

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
    this._modelSelect = h('select', {
      className: 'jp-mod-styled jp-AcpPanel-model',
      'aria-label': 'Model',
      onchange: () => void this.setModel(this._modelSelect.value)
    }) as HTMLSelectElement;
    this._log = h('div', { className: 'jp-AcpPanel-log', 'aria-live': 'polite' });
    this._composer = new Composer({
      commands: () => this._conn?.view.commands ?? [],
      files: prefix => (this._conn ? this.api.files(this._conn.id, prefix) : Promise.resolve([])),
      acceptsImages: () => (this._conn ? this._conn.view.promptCapabilities.image : null),
      agentName: () => this._conn?.view.agentDisplayName || this._conn?.view.agent || '',
      submit: (text, images) => this.sendText(text, images),
      cancel: () => this._conn?.cancel(),
      error: message => this.showError(message)
    });

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
        h('label', { className: 'jp-AcpPanel-modeLabel' }, 'Mode ', this._modeSelect),
        h('label', { className: 'jp-AcpPanel-modeLabel jp-AcpPanel-modelLabel' }, 'Model ', this._modelSelect)
      ),
      this._log,
      this._composer.node
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
      // after a reload, come back to the conversation I was in (its history is replayed);
      // a suspended one waits to be reopened from the list (that starts its agent again)
      const live = sessions.filter(s => !NOT_RUNNING.has(s.state));
      if (!this._conn && !this._pending && live.length) {
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
    return this.creating(() => this.api.createSession(name, true));
  }

  /**
   * Create a session (the input is off meanwhile: what one types then must not go to the
   * session shown before, nor to the new one behind one's back), then open it.
   */
  private async creating(create: () => Promise<SessionInfo>): Promise<SessionInfo | null> {
    if (this._pending) {
      return null;
    }
    this.setPending('starting…');
    try {
      const session = await create();
      this._sessions = [session, ...this._sessions.filter(s => s.id !== session.id)];
      this.setPending(null);
      this.connectTo(session.id);
      void this.refreshUsage();
      return session;
    } catch (e) {
      this.setPending(null);
      this.showError(e);
      return null;
    }
  }

  /**
   * Show the session `id` in the chat (its socket replays the transcript). A suspended one is
   * resumed first: its agent starts again and the chat goes on where it was.
   */
  open(id: string): void {
    if (this._pending) {
      return; // (one session at a time is being created or resumed)
    }
    const info = this._sessions.find(s => s.id === id);
    const same = this._conn?.id === id;
    if ((!same && info?.state === 'suspended') || (same && this._conn!.ended !== null)) {
      void this.resumeAndOpen(id); // (a 404 says it if it was deleted meanwhile)
      return;
    }
    this.connectTo(id);
    if (this._conn?.suspended) {
      void this.resume();
    }
  }

  /**
   * Reopen a suspended session: POST resume first, then connect (the socket replays the whole
   * transcript from the live session). Should the resume fail, the socket still shows the
   * stored transcript, and the error says why.
   */
  private async resumeAndOpen(id: string): Promise<boolean> {
    this._conn?.dispose();
    this._conn = null;
    this._log.replaceChildren();
    this.showError(null);
    this.setPending('resuming…', id);
    let ok = false;
    try {
      const session = await this.api.resumeSession(id);
      this._sessions = this._sessions.map(s => (s.id === session.id ? session : s));
      ok = true;
    } catch (e) {
      this.showError(e);
    } finally {
      this.setPending(null);
    }
    this.connectTo(id);
    void this.refreshUsage();
    return ok;
  }

  /** Show the session `id` in the chat, connecting its socket (the history is replayed). */
  private connectTo(id: string): void {
    if (this._conn?.id !== id) {
      this._conn?.dispose();
      const conn = new SessionConnection(this.api, id);
      this._conn = conn;
      this._commandsSeen = [];
      this._composer.clearImages();
      conn.changed.connect(() => this.schedule());
      conn.turnEnded.connect(() => {
        void this.refreshUsage();
        this.onTurnEnd?.();
      });
      conn.sessionEnded.connect(() => void this.refreshUsage()); // (its list entry goes)
      this._log.replaceChildren();
    }
    this.drawSessions();
    this.schedule();
  }

  /** Resume the current session (POST resume), then reconnect its socket. */
  async resume(): Promise<boolean> {
    const conn = this._conn;
    if (!conn || this._pending) {
      return false;
    }
    this.showError(null);
    this.setPending('resuming…');
    try {
      const session = await this.api.resumeSession(conn.id);
      this._sessions = this._sessions.map(s => (s.id === session.id ? session : s));
      conn.resumed(session);
      void this.refreshUsage();
      return true;
    } catch (e) {
      this.showError(e);
      return false;
    } finally {
      this.setPending(null);
    }
  }

  /**
   * Send `text` as a prompt to the current session, opening one with the default agent (or
   * reusing my live one) when the chat shows none, and resuming a suspended one first.
   */
  async sendText(text: string, images: ImageBlock[] = []): Promise<boolean> {
    if (!text.trim()) {
      return false;
    }
    if (this._pending) {
      // a session is being created or resumed: this text is for neither the one shown before
      // nor, behind one's back, the new one
      this.showError(`A session is ${this._pending.replace('…', '')}; send this again when it is ready.`);
      return false;
    }
    const conn = this._conn;
    if (conn && (conn.ended !== null || conn.view.state === 'stopped')) {
      // ended: closed (suspended, then it goes on where it was) or deleted (a new one then)
      const info = await this.api.session(conn.id).catch(() => null);
      if (info?.state === 'suspended' && !(await this.resumeAndOpen(conn.id))) {
        return false;
      }
    }
    if (!this._conn || this._conn.ended !== null || this._conn.view.state === 'stopped') {
      this.showError(null);
      const agent = this._agentSelect.value || this._defaultAgent;
      if (!(await this.creating(() => this.api.createSession(agent, false)))) {
        return false;
      }
    } else if (this._conn.suspended || this._conn.view.state === 'suspended') {
      if (!(await this.resume())) {
        return false;
      }
    }
    this._conn!.prompt(text, images);
    return true;
  }

  private async setModel(value: string): Promise<void> {
    const conn = this._conn;
    if (!conn) {
      return;
    }
    try {
      conn.setModels(modelState(await this.api.setModel(conn.id, value)));
      this.showError(null);
    } catch (e) {
      this.showError(e);
      this.schedule(); // back to the current one
    }
  }

  /** Close (suspend) a session: its agent stops, it stays in the list to reopen. */
  private async closeSession(id: string): Promise<void> {
    const conn = this._conn?.id === id ? this._conn : null;
    conn?.closing(true); // (its socket's close then means suspended: typing resumes it)
    try {
      const session = await this.api.closeSession(id);
      this._sessions = this._sessions.map(s => (s.id === session.id ? session : s));
      this.drawSessions();
      await this.refreshUsage();
    } catch (e) {
      this.showError(e);
    } finally {
      // (the server ends the socket before it answers; a close still on its way is rare)
      window.setTimeout(() => conn?.closing(false), 2000);
    }
  }

  /** Delete a session, after asking: its agent stops and its history is forgotten. */
  private async deleteSession(id: string): Promise<void> {
    const info = this._sessions.find(s => s.id === id);
    const answer = await showDialog({
      title: 'Delete this session?',
      body: `“${info?.title || 'New session'}” and its history will be gone for good.`,
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: 'Delete' })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await this.api.deleteSession(id);
      if (this._conn?.id === id) {
        this._conn.dispose();
        this._conn = null;
        this._log.replaceChildren();
      }
      this._sessions = this._sessions.filter(s => s.id !== id);
      this.drawSessions();
      await this.refreshUsage();
      this.draw();
    } catch (e) {
      this.showError(e);
    }
  }

  protected onAfterShow(): void {
    void this.refresh();
  }

  private setPending(what: string | null, sessionId: string | null = null): void {
    this._pending = what;
    this._pendingId = what ? sessionId : null;
    this.drawSessions();
    this._composer.setStarting(what !== null, what ?? undefined);
    this.draw();
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
    drawSessionList(this._sessionList, this._sessions, this._pendingId ?? this._conn?.id ?? null, {
      open: id => this.open(id),
      close: id => void this.closeSession(id),
      remove: id => void this.deleteSession(id)
    });
  }

  /** Redraw the chat from the current view. */
  draw(): void {
    const conn = this._conn;
    const view = conn?.view;
    this.node.classList.toggle('jp-mod-noSession', !view);
    this._composer.setBusy(!!view && view.busy, !!view && view.busy);
    const modeLabel = this._modeSelect.parentElement as HTMLElement;
    const modelLabel = this._modelSelect.parentElement as HTMLElement;
    if (!conn || !view) {
      this._status.textContent = this._pending ?? 'No session open: pick an agent and start one, or just type.';
      modeLabel.hidden = true;
      modelLabel.hidden = true;
      return;
    }
    const where =
      this._pending ??
      (conn.ended !== null
        ? 'ended'
        : conn.suspended
          ? 'suspended'
          : conn.connected
            ? view.state === 'starting'
              ? 'starting…'
              : view.state
            : 'reconnecting…');
    const context = view.context?.size ? ` · context ${view.context.used ?? 0}/${view.context.size}` : '';
    this._status.replaceChildren(
      h('span', { className: 'jp-AcpPanel-agentName' }, view.agentDisplayName || view.agent || '…'),
      ` · ${where}${view.error ? `: ${view.error}` : ''} · `,
      h('span', { className: 'jp-AcpPanel-tokens', 'data-testid': 'acp-session-tokens' },
        formatTokens(view.tokens.total_tokens)),
      context
    );
    // (a suspended or ended session has no agent to switch: reopening it comes first)
    const running = conn.ended === null && !conn.suspended && !NOT_RUNNING.has(view.state);
    this._modeSelect.disabled = !running;
    modeLabel.hidden = view.modes.length === 0;
    if (view.modes.length) {
      this._modeSelect.replaceChildren(
        ...view.modes.map(m => h('option', { value: m.id, selected: m.id === view.currentMode }, m.name))
      );
    }
    this.drawModels(view, modelLabel, running);
    if (view.commands !== this._commandsSeen) {
      this._commandsSeen = view.commands;
      this._composer.commandsChanged();
    }
    this.drawLog(view);
  }

  private drawModels(view: SessionView, label: HTMLElement, running: boolean): void {
    const models = view.models;
    label.hidden = !models || models.available.length === 0;
    if (!models) {
      return;
    }
    this._modelSelect.replaceChildren(
      ...models.available.map(m =>
        h('option', { value: m.value, title: m.description || undefined, selected: m.value === models.current }, m.name)
      )
    );
    this._modelSelect.value = models.current;
    this._modelSelect.disabled = !running || view.busy || !!this._pending;
  }

  private drawLog(view: SessionView): void {
    const log = this._log;
    const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    log.replaceChildren(...view.items.map(item => drawItem(item, view.workspace, this._conn)));
    if (view.busy) {
      log.append(h('div', { className: 'jp-AcpPanel-working' }, 'The agent is working…'));
    }
    if (atBottom) {
      log.scrollTop = log.scrollHeight;
    }
  }
}
