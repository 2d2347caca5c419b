import { afterEach, beforeEach, vi } from 'vitest';

import type { AcpApi } from '../src/api';

/**
 * A WebSocket that a test drives (open, deliver frames, close with a code), shared by the
 * connection tests. Install it with `vi.stubGlobal('WebSocket', FakeSocket)`.
 */
export class FakeSocket {
  static readonly CONNECTING = 0;
  static readonly OPEN = 1;
  static readonly CLOSED = 3;
  static made: FakeSocket[] = [];
  readyState = FakeSocket.CONNECTING;
  sent: string[] = [];
  onopen: (() => void) | null = null;
  onmessage: ((msg: { data: string }) => void) | null = null;
  onclose: ((event: { code: number; reason: string }) => void) | null = null;

  constructor(readonly url: string) {
    FakeSocket.made.push(this);
  }

  send(text: string): void {
    this.sent.push(text);
  }

  close(): void {
    this.readyState = FakeSocket.CLOSED;
  }

  open(): void {
    this.readyState = FakeSocket.OPEN;
    this.onopen?.();
  }

  frames(...frames: unknown[]): void {
    this.onmessage?.({ data: JSON.stringify(frames) });
  }

  /** What the server's close does (code and reason as the browser reports them). */
  closed(code: number, reason = ''): void {
    this.readyState = FakeSocket.CLOSED;
    this.onclose?.({ code, reason });
  }
}


/** An API whose only use here is the socket URL (`?since=` visible to the tests). */
export const fakeApi = { socketUrl: (id: string, since: number) => `ws://x/${id}?since=${since}` } as unknown as AcpApi;

/** In a `describe`: fake timers and `FakeSocket` as the WebSocket, fresh for each test. */
export function useFakeSockets(): void {
  beforeEach(() => {
    FakeSocket.made = [];
    vi.useFakeTimers();
    vi.stubGlobal('window', globalThis);
    vi.stubGlobal('WebSocket', FakeSocket);
  });
  afterEach(() => {
    vi.useRealTimers();
    vi.unstubAllGlobals();
  });
}
