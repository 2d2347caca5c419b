/**
 * The left-sidebar panel: pick an agent, see my sessions (live and suspended) and today's tokens,
 * and chat.
 *
 * Everything the chat shows comes from the session's reduced view (reducer.ts); this module
 * only draws it and turns clicks into API calls or socket frames. Drawing is batched to one
 * repaint per animation frame, and each repaint touches only what changed: the log is keyed
 * (log.ts: a new item gets a node, a changed one is patched in place, the others are left alone),
 * and the status line and the selects are redrawn only when what they show changed. The input
 * (completion, images) is composer.ts, the session list sessions.ts, the chat items items/.
 */

import { Dialog, showDialog } from '@jupyterlab/apputils';
import type { INotebookTracker } from '@jupyterlab/notebook';
import type { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import type { ITranslator } from '@jupyterlab/translation';
import { Widget } from '@lumino/widgets';

import { AcpApi, AcpApiError, AgentInfo, ImageBlock, SessionInfo, UsageInfo } from './api';
import { ChatBar, NOT_RUNNING } from './chatbar';
import { Composer } from './composer';
import { SessionConnection } from './connection';
import { h } from './dom';
import { __ } from './i18n';
import { createItemView, EditActions, ItemContext } from './items';
import { ChatLog } from './log';
import { formatTokens, modelState } from './reducer';
import { ChatItem, Command, SessionView } from './view';
import { notebookCodeActions } from './render/codeActions';
import { plainMarkdown, rendermimeMarkdown } from './render/markdown';
import { drawSessionList } from './sessions';

export { displayPath } from './dom';


/** The settings the panel follows (schema/plugin.json). */
export interface PanelSettings {
  /** The agent selected for "New session" ('' = the server's default). */
  defaultAgent?: string;
  /** Follow a streaming reply down when the reader is at the bottom. */
  autoScroll?: boolean;
}

/** What the application gives the panel (index.ts); all optional, so a bare panel works in tests. */
export interface AcpPanelOptions {
  api?: AcpApi;
  /** Called after each turn (e.g. to refresh the file browser: the agent writes behind its back). */
  onTurnEnd?: () => void;
  /** JupyterLab's renderers: Markdown as a Markdown cell shows it (without: plain text). */
  rendermime?: IRenderMimeRegistry | null;
  /** The notebooks, for the code blocks' Insert / Replace buttons (without: Copy only). */
  tracker?: INotebookTracker | null;
  translator?: ITranslator | null;
  /** The user's settings (`defaultAgent`, `autoScroll`; the send key is the composer's). */
  settings?: PanelSettings | null;
}

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
  private _autoScroll = true;
  private _preferredAgent = '';
  /** Whether the log was scrolled to its bottom last time it scrolled (then it follows the reply). */
  private _stick = true;
  /** Where the panel itself last scrolled the log to. */
  private _ownScroll = -1;
  /** Undos of notebook edits asked from this panel: under way, or failed with the server's reason. */
  private _undos = new Map<string, { busy: boolean; error: string | null }>();
  private readonly _editActions: EditActions = {
    undo: editId => void this.undoEdit(editId),
    undoState: editId => this._undos.get(editId)
  };

  private _agentSelect: HTMLSelectElement;
  private _sessionList: HTMLElement;
  private _usageLine: HTMLElement;
  private _banner: HTMLElement;
  private _bar: ChatBar;
  private _log: HTMLElement;
  private _chat: ChatLog<ChatItem>;
  /** The rows after the items: "starting…" while a session is created, "working…" during a turn. */
  private _starting: HTMLElement;
  private _working: HTMLElement;
  private _composer: Composer;
  private readonly onTurnEnd?: () => void;

  /**
   * @param options what the application gives (index.ts); an `AcpApi` as first argument and
   * `onTurnEnd` as second are still accepted
   */
  constructor(options?: AcpPanelOptions | AcpApi, onTurnEnd?: () => void) {
    super();
    const opts: AcpPanelOptions = options instanceof AcpApi ? { api: options } : { ...(options ?? {}) };
    this.api = opts.api ?? new AcpApi();
    this.onTurnEnd = opts.onTurnEnd ?? onTurnEnd;
    this._autoScroll = opts.settings?.autoScroll ?? true;
    this._preferredAgent = opts.settings?.defaultAgent ?? '';
    this.id = 'jupyter-acp-panel';
    this.addClass('jp-AcpPanel');
    this.title.caption = __('Coding agents');

    this._agentSelect = h('select', {
      className: 'jp-mod-styled jp-AcpPanel-agent',
      'aria-label': __('Agent')
    }) as HTMLSelectElement;
    this._sessionList = h('ul', { className: 'jp-AcpPanel-sessions', 'aria-label': 'My sessions' });
    this._usageLine = h('div', { className: 'jp-AcpPanel-usage', 'data-testid': 'acp-usage-today' });
    this._banner = h('div', { className: 'jp-AcpPanel-banner', role: 'alert' });
    this._bar = new ChatBar({
      setMode: id => this._conn?.setMode(id),
      setModel: value => void this.setModel(value)
    });
    this._log = h('div', { className: 'jp-AcpPanel-log', 'aria-live': 'polite' });
    this._starting = h('div', { className: 'jp-AcpPanel-starting', hidden: true }, __('New session — starting…'));
    this._working = h('div', { className: 'jp-AcpPanel-working', hidden: true }, __('The agent is working…'));
    // the last child is the scroll anchor: at the bottom, the browser keeps it in view as
    // content above it grows (renders are async, so they land after the draw scrolled)
    this._log.append(this._starting, this._working, h('div', { className: 'jp-AcpPanel-anchor' }));
    this._log.addEventListener('scroll', () => {
      const log = this._log;
      if (log.scrollTop !== this._ownScroll) {
        // the reader scrolled (ours lands where we put it, even if content grew since)
        this._stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      }
    });
    const ctx: ItemContext = {
      workspace: () => this._conn?.view.workspace ?? '',
      connection: () => this._conn,
      terminals: () => this._conn?.view.terminals ?? {},
      replaying: () => !!this._conn?.view.replaying,
      markdown: opts.rendermime ? rendermimeMarkdown(opts.rendermime, opts.translator ?? undefined) : plainMarkdown(),
      code: opts.rendermime ? notebookCodeActions(opts.tracker ?? null) : null,
      edits: this._editActions,
      rendered: () => this.followBottom()
    };
    this._chat = new ChatLog<ChatItem>(this._log, item => createItemView(item, ctx));
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
              title: __('Start a new session with the selected agent'),
              onclick: () => void this.newSession()
            },
            __('New session')
          )
        ),
        this._usageLine,
        this._sessionList
      ),
      this._banner,
      this._bar.node,
      this._log,
      this._composer.node
    );
    this.draw();
  }

  /** Take the user's settings (they can change while the panel is open). */
  configure(settings: PanelSettings): void {
    this._autoScroll = settings.autoScroll ?? true;
    const agent = settings.defaultAgent ?? '';
    if (agent !== this._preferredAgent) {
      this._preferredAgent = agent;
      if (this._agents.some(a => a.name === agent && a.available)) {
        this._agentSelect.value = agent;
      }
    }
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
        this.showError(__('No agent can run here: %1', agents.agents.map(a => `${a.display_name}: ${a.reason}`).join('; ')));
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
    if (this._pending) {
      return null;
    }
    this.showError(null);
    const name = agent ?? (this._agentSelect.value || this._defaultAgent);
    // the session shown so far goes at once: nothing typed from now on can reach it
    this.dropConnection();
    return this.creating(() => this.api.createSession(name, true));
  }

  /** Stop showing the current session (its socket closes; the session itself goes on). */
  private dropConnection(): void {
    this._conn?.dispose();
    this._conn = null;
    this._chat.clear();
    this.drawSessions();
    this.draw();
  }

  /**
   * Create a session (the input is off meanwhile: what one types then must not go to the
   * session shown before, nor to the new one behind one's back), then open it.
   */
  private async creating(create: () => Promise<SessionInfo>): Promise<SessionInfo | null> {
    if (this._pending) {
      return null;
    }
    this.setPending(__('starting…'));
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
    this.dropConnection();
    this.showError(null);
    this.setPending(__('resuming…'), id);
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
      this._undos.clear();
      this._composer.clearImages();
      conn.changed.connect(() => this.schedule());
      conn.turnEnded.connect(() => {
        void this.refreshUsage();
        this.onTurnEnd?.();
      });
      conn.sessionEnded.connect(() => void this.refreshUsage()); // (its list entry goes)
      this._chat.clear();
      this._stick = true;
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
    this.setPending(__('resuming…'));
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
      this.showError(__('A session is on its way (%1); send this again when it is ready.', this._pending));
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

  /**
   * Undo one of the agent's notebook edits (its card's button). The card shows "Undone" when
   * the server's `notebook:edit` record of the undo arrives; a conflict shows the server's reason.
   */
  async undoEdit(editId: string): Promise<boolean> {
    const conn = this._conn;
    if (!conn || this._undos.get(editId)?.busy) {
      return false;
    }
    this._undos.set(editId, { busy: true, error: null });
    this.refreshEdit(editId);
    try {
      await this.api.undoNotebookEdit(conn.id, editId);
      return true; // (the button stays "Undoing…" until the undo's record marks the edit undone)
    } catch (e) {
      this._undos.set(editId, { busy: false, error: e instanceof Error ? e.message : String(e) });
      return false;
    } finally {
      this.refreshEdit(editId);
    }
  }

  /** Redraw the items showing the notebook edit `editId` (its undo state is the panel's). */
  private refreshEdit(editId: string): void {
    this._chat.refresh(
      i =>
        (i.kind === 'notebookEdit' && i.edit.editId === editId) ||
        (i.kind === 'tool' && i.edits.some(e => e.editId === editId))
    );
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
      this._bar.resetModels();
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
      title: __('Delete this session?'),
      body: __('“%1” and its history will be gone for good.', info?.title || __('New session')),
      buttons: [Dialog.cancelButton(), Dialog.warnButton({ label: __('Delete') })]
    });
    if (!answer.button.accept) {
      return;
    }
    try {
      await this.api.deleteSession(id);
      if (this._conn?.id === id) {
        this._conn.dispose();
        this._conn = null;
        this._chat.clear();
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
    const preferred = this._agents.some(a => a.name === this._preferredAgent && a.available) ? this._preferredAgent : '';
    const selected = this._agentSelect.value || preferred || this._defaultAgent || '';
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

  /** Redraw the chat from the current view (only the parts whose inputs changed). */
  draw(): void {
    const conn = this._conn;
    const view = conn?.view;
    this.node.classList.toggle('jp-mod-noSession', !view);
    this._composer.setBusy(!!view && view.busy, !!view && view.busy);
    this._starting.hidden = !(this._pending && !this._pendingId && !conn);
    if (!conn || !view) {
      this._bar.showText(this._pending ?? __('No session open: pick an agent and start one, or just type.'));
      this._working.hidden = true;
      return;
    }
    this._bar.show(conn, view, this._pending);
    if (view.commands !== this._commandsSeen) {
      this._commandsSeen = view.commands;
      this._composer.commandsChanged();
    }
    this.drawLog(view);
  }

  private drawLog(view: SessionView): void {
    const log = this._log;
    this._stick ||= log.scrollHeight - log.scrollTop - log.clientHeight < 40;
    this._chat.update(view.items, view.busy);
    this._working.hidden = !view.busy;
    this.followBottom();
  }

  /**
   * Keep the log at its bottom while content lands, if the reader was there (they scrolled
   * nowhere else) and is not selecting text in it.
   */
  private followBottom(): void {
    const log = this._log;
    if (!this._autoScroll || !this._stick) {
      return;
    }
    const selection = document.getSelection();
    if (selection && !selection.isCollapsed && log.contains(selection.anchorNode)) {
      return;
    }
    if (log.scrollHeight - log.scrollTop - log.clientHeight > 1) {
      log.scrollTop = log.scrollHeight;
      this._ownScroll = log.scrollTop;
    }
  }
}
