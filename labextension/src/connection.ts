/**
 * One session's live connection: the WebSocket, the reduced view, and reconnection.
 *
 * The socket replays the session's history on connect; after a drop we reconnect with
 * `?since=<last seq seen>` so only what was missed is sent, and the reducer ignores anything
 * seen twice. Frames sent while the socket is (re)connecting are queued, so "send to agent"
 * works right after a session is created. A session that is gone (close code 4404: deleted,
 * culled when idle, or unknown) is said once in the chat, and never reconnected.
 *
 * A suspended session (stored, no agent running) also closes with 4404, after replaying its
 * transcript, with a reason starting "The session is suspended". That is not the end: the
 * connection waits (`suspended`), and `resumed()` (after the panel POSTed `resume`) reconnects
 * with `?since=` the last seq, since seqs continue across resumes.
 */

import { ISignal, Signal } from '@lumino/signaling';

import { AcpApi, ImageBlock } from './api';
import { reduce, reduceAll, withSession } from './reducer';
import { emptyView, Frame, SessionView } from './view';

/**
 * Close code of a session that does not exist for this user (docs/api.md): unknown, another
 * user's, or ended (deleted, culled when idle, server stopped). Reconnecting cannot help.
 */
export const GONE = 4404;

/** What the chat says when the server gave no reason with its 4404. */
export const GONE_MESSAGE = 'This session has ended (it was stopped, or cleaned up after being idle).';

/** How the server's 4404 reason starts for a session that is stored but not running. */
export const SUSPENDED_REASON = 'The session is suspended';

export function isSuspendedReason(reason: string): boolean {
  return reason.toLowerCase().startsWith(SUSPENDED_REASON.toLowerCase());
}

export class SessionConnection {
  private _view: SessionView = emptyView();
  private _socket: WebSocket | null = null;
  private _queue: string[] = [];
  private _retry = 0;
  private _timer: number | null = null;
  private _disposed = false;
  private _changed = new Signal<this, SessionView>(this);
  private _turnEnded = new Signal<this, void>(this);
  private _ended = new Signal<this, string>(this);
  private _connected = false;
  private _endedWith: string | null = null;
  private _suspended = false;
  private _resumed = false;
  /** This socket's hello said `suspended` (it only replays, then closes with 4404). */
  private _helloSuspended = false;
  /** This socket's hello has come. */
  private _helloSeen = false;
  /** The panel is closing (suspending) this session: its 4404 means suspended, not gone. */
  private _closing = false;

  constructor(
    readonly api: AcpApi,
    readonly id: string
  ) {
    this.connect();
  }

  get view(): SessionView {
    return this._view;
  }

  /** Whether the socket is open (false while reconnecting). */
  get connected(): boolean {
    return this._connected;
  }

  /** Emitted after every applied frame (and on connection changes). */
  get changed(): ISignal<this, SessionView> {
    return this._changed;
  }

  /** Emitted when a turn ends (live, not on replay): time to refresh the usage counters. */
  get turnEnded(): ISignal<this, void> {
    return this._turnEnded;
  }

  /** Why the session is gone (the server's 4404 reason), or null while it exists. Final. */
  get ended(): string | null {
    return this._endedWith;
  }

  /** True while the session is suspended (no agent): `resumed()` brings the socket back. */
  get suspended(): boolean {
    return this._suspended;
  }

  /**
   * The session was resumed (POST resume answered): reconnect now if the server had closed the
   * socket as suspended, or as soon as it does (the close may still be on its way).
   */
  resumed(session?: unknown): void {
    if (this._disposed || this._endedWith !== null) {
      return;
    }
    if (session) {
      this._view = withSession(this._view, session);
      this._changed.emit(this._view);
    }
    if (this._suspended) {
      this._suspended = false;
      if (!this._socket) {
        this.connect();
      }
    } else if (this._socket && (!this._helloSeen || this._helloSuspended)) {
      // this socket may still be the suspended one: wait for its close, or a live hello
      this._resumed = true;
    }
    // (else: this socket's hello was already live, it is the resumed session's)
  }

  /**
   * This client is suspending the session (POST close): the server's 4404 that follows, with
   * whatever reason, leaves it suspended (resumable), not ended. `false` when the POST is done.
   */
  closing(on: boolean): void {
    this._closing = on;
  }

  /** Show the model choice the server answered with (POST model). */
  setModels(models: SessionView['models']): void {
    this._view = { ...this._view, models };
    this._changed.emit(this._view);
  }

  /** Emitted once when the server says the session is gone (4404), with its reason. */
  get sessionEnded(): ISignal<this, string> {
    return this._ended;
  }

  send(frame: Record<string, unknown>): void {
    if (this._endedWith !== null) {
      return; // nobody will ever read it (the panel starts a new session for a prompt)
    }
    const text = JSON.stringify(frame);
    // a suspended session's socket only replays: hold frames for the socket after `resume`
    const waiting = this._suspended || this._resumed || this._helloSuspended;
    if (!waiting && this._socket && this._socket.readyState === WebSocket.OPEN) {
      this._socket.send(text);
    } else {
      this._queue.push(text);
    }
  }

  prompt(message: string, images: ImageBlock[] = []): void {
    this.send(images.length ? { type: 'chat:message', message, images } : { type: 'chat:message', message });
  }

  cancel(): void {
    this.send({ type: 'cancel' });
  }

  answer(requestId: string, optionId: string | null): void {
    this.send({ type: 'permission:answer', request_id: requestId, option_id: optionId });
  }

  setMode(modeId: string): void {
    this.send({ type: 'mode', mode_id: modeId });
  }

  dispose(): void {
    this._disposed = true;
    if (this._timer !== null) {
      window.clearTimeout(this._timer);
    }
    const socket = this._socket;
    this._socket = null;
    socket?.close();
    Signal.clearData(this);
  }

  /**
   * Apply the frames of one socket message (under `?batch=1` a burst of events comes as one):
   * reduced together (`reduceAll` appends a run of streamed chunks at once), then one `changed`.
   */
  private apply(frames: readonly Frame[]): void {
    const before = this._view;
    let view = before;
    let start = 0;
    let turnEnded = false;
    for (let k = 0; k < frames.length; k++) {
      const frame = frames[k];
      if (frame?.type === 'hello') {
        this._helloSeen = true;
        this._helloSuspended = frame.data?.state === 'suspended';
        if (!this._helloSuspended) {
          this._resumed = false; // live again: a later suspension is a new one
          this.flush();
        }
      } else if (frame?.type === 'chat:response') {
        // (alone: whether this very frame ended a live turn, not a replayed or repeated one)
        view = reduceAll(view, frames.slice(start, k));
        const prev = view;
        view = reduce(view, frame);
        turnEnded ||= !view.replaying && view !== prev;
        start = k + 1;
      }
    }
    this._view = reduceAll(view, frames.slice(start));
    if (turnEnded) {
      this._turnEnded.emit();
    }
    if (this._view !== before) {
      this._changed.emit(this._view);
    }
  }

  /** The session is gone: say so once in the chat, and stop (no reconnect, queue dropped). */
  private end(reason: string): void {
    this._endedWith = reason;
    this._queue = [];
    this.apply([{ type: 'error', data: { message: reason } }]);
    this._view = { ...this._view, state: 'stopped', busy: false, pendingPermissions: [] };
    this._changed.emit(this._view);
    this._ended.emit(reason);
  }

  private flush(): void {
    const socket = this._socket;
    if (socket && socket.readyState === WebSocket.OPEN && !this._suspended && !this._resumed) {
      for (const text of this._queue.splice(0)) {
        socket.send(text);
      }
    }
  }

  private connect(): void {
    if (this._disposed) {
      return;
    }
    this._helloSuspended = false;
    this._helloSeen = false;
    const socket = new WebSocket(this.api.socketUrl(this.id, this._view.lastSeq));
    this._socket = socket;
    socket.onopen = () => {
      this._connected = true;
      this._retry = 0;
      this.flush();
      this._changed.emit(this._view);
    };
    socket.onmessage = msg => {
      try {
        // ?batch=1: a burst of events arrives as one frame, an array in order
        const data = JSON.parse(String(msg.data)) as Frame | Frame[];
        this.apply(Array.isArray(data) ? data : [data]);
      } catch (e) {
        console.error('jupyter-acp: bad frame', e);
      }
    };
    socket.onclose = event => {
      if (this._socket !== socket) {
        return; // disposed or replaced
      }
      this._connected = false;
      this._socket = null;
      if (event.code === GONE && (this._closing || isSuspendedReason(event.reason || ''))) {
        if (this._resumed) {
          this._resumed = false; // resumed meanwhile: come back at once for the rest
          this.connect();
          return;
        }
        this._suspended = true; // (frames sent meanwhile wait for the socket after `resume`)
        this._view = { ...this._view, state: 'suspended', busy: false, pendingPermissions: [], replaying: false };
        this._changed.emit(this._view);
        return;
      }
      if (event.code === GONE) {
        this.end(event.reason || GONE_MESSAGE);
        return;
      }
      // back off 0.5, 1, 2, 4, 8 s then every 10 s; history since the last seq is replayed
      const delay = Math.min(500 * 2 ** this._retry, 10000);
      this._retry++;
      this._changed.emit(this._view);
      this._timer = window.setTimeout(() => {
        this._timer = null;
        this.connect();
      }, delay);
    };
  }
}
