/**
 * One session's live connection: the WebSocket, the reduced view, and reconnection.
 *
 * The socket replays the session's history on connect; after a drop we reconnect with
 * `?since=<last seq seen>` so only what was missed is sent, and the reducer ignores anything
 * seen twice. Frames sent while the socket is (re)connecting are queued, so "send to agent"
 * works right after a session is created. A session that is gone (close code 4404: deleted,
 * culled when idle, or unknown) is said once in the chat, and never reconnected.
 */

import { ISignal, Signal } from '@lumino/signaling';

import { AcpApi } from './api';
import { emptyView, Frame, reduce, SessionView } from './reducer';

/**
 * Close code of a session that does not exist for this user (docs/api.md): unknown, another
 * user's, or ended (deleted, culled when idle, server stopped). Reconnecting cannot help.
 */
export const GONE = 4404;

/** What the chat says when the server gave no reason with its 4404. */
export const GONE_MESSAGE = 'This session has ended (it was stopped, or cleaned up after being idle).';

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

  /** Emitted once when the server says the session is gone (4404), with its reason. */
  get sessionEnded(): ISignal<this, string> {
    return this._ended;
  }

  send(frame: Record<string, unknown>): void {
    if (this._endedWith !== null) {
      return; // nobody will ever read it (the panel starts a new session for a prompt)
    }
    const text = JSON.stringify(frame);
    if (this._socket && this._socket.readyState === WebSocket.OPEN) {
      this._socket.send(text);
    } else {
      this._queue.push(text);
    }
  }

  prompt(message: string): void {
    this.send({ type: 'chat:message', message });
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

  private apply(frame: Frame): void {
    const before = this._view;
    this._view = reduce(before, frame);
    if (frame.type === 'chat:response' && !this._view.replaying && this._view !== before) {
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
    this.apply({ type: 'error', data: { message: reason } });
    this._view = { ...this._view, state: 'stopped', busy: false, pendingPermissions: [] };
    this._changed.emit(this._view);
    this._ended.emit(reason);
  }

  private connect(): void {
    if (this._disposed) {
      return;
    }
    const socket = new WebSocket(this.api.socketUrl(this.id, this._view.lastSeq));
    this._socket = socket;
    socket.onopen = () => {
      this._connected = true;
      this._retry = 0;
      for (const text of this._queue.splice(0)) {
        socket.send(text);
      }
      this._changed.emit(this._view);
    };
    socket.onmessage = msg => {
      try {
        // ?batch=1: a burst of events arrives as one frame, an array in order
        const data = JSON.parse(String(msg.data)) as Frame | Frame[];
        for (const frame of Array.isArray(data) ? data : [data]) {
          this.apply(frame);
        }
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
