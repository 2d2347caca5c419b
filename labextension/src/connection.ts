/**
 * One session's live connection: the WebSocket, the reduced view, and reconnection.
 *
 * The socket replays the session's history on connect; after a drop we reconnect with
 * `?since=<last seq seen>` so only what was missed is sent, and the reducer ignores anything
 * seen twice. Frames sent while the socket is (re)connecting are queued, so "send to agent"
 * works right after a session is created.
 */

import { ISignal, Signal } from '@lumino/signaling';

import { AcpApi } from './api';
import { emptyView, Frame, reduce, SessionView } from './reducer';

/** Close code the server uses for an unknown or foreign session (docs/api.md). */
const GONE = 4404;

export class SessionConnection {
  private _view: SessionView = emptyView();
  private _socket: WebSocket | null = null;
  private _queue: string[] = [];
  private _retry = 0;
  private _timer: number | null = null;
  private _disposed = false;
  private _changed = new Signal<this, SessionView>(this);
  private _turnEnded = new Signal<this, void>(this);
  private _connected = false;

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

  send(frame: Record<string, unknown>): void {
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
        this.apply({
          type: 'error',
          data: { message: 'This session no longer exists (it was ended or cleaned up after being idle).' }
        });
        this._view = { ...this._view, state: 'stopped' };
        this._changed.emit(this._view);
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
