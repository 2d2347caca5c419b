/**
 * The session connection: reconnects after a drop, but never to a session that is gone (4404).
 */
import { describe, expect, it, vi } from 'vitest';

import { GONE, GONE_MESSAGE, SessionConnection } from '../src/connection';
import { FakeSocket, fakeApi, useFakeSockets } from './fakeSocket';

const api = fakeApi;
const hello = { type: 'hello', data: { id: 's1', agent: 'demo', state: 'ready', last_seq: 0 } };
const REASON = 'The session has ended: it was stopped, cleaned up after being idle, or the server stopped';

describe('SessionConnection', () => {
  useFakeSockets();

  it('reconnects after a drop, with ?since= the last event seen', () => {
    const conn = new SessionConnection(api, 's1');
    const first = FakeSocket.made[0];
    first.open();
    first.frames(hello, { type: 'state', seq: 1, data: { state: 'ready' } }, { type: 'history:end', data: {} });
    first.closed(1006);
    expect(conn.connected).toBe(false);
    expect(conn.ended).toBeNull();
    vi.advanceTimersByTime(500);
    expect(FakeSocket.made.map(s => s.url)).toEqual(['ws://x/s1?since=0', 'ws://x/s1?since=1']);
    conn.dispose();
  });

  it('stops on 4404: says the server\'s reason once in the chat, and never reconnects', () => {
    const conn = new SessionConnection(api, 's1');
    const ended: string[] = [];
    conn.sessionEnded.connect((_, reason) => ended.push(reason));
    const socket = FakeSocket.made[0];
    socket.open();
    socket.frames(hello, { type: 'history:end', data: {} });
    // a deleted session: its last event, then the close
    socket.frames({ type: 'state', seq: 1, data: { state: 'stopped', error: null } });
    socket.closed(GONE, REASON);
    vi.advanceTimersByTime(60_000);
    expect(FakeSocket.made).toHaveLength(1);
    expect(ended).toEqual([REASON]);
    expect(conn.ended).toBe(REASON);
    expect(conn.connected).toBe(false);
    expect(conn.view.state).toBe('stopped');
    expect(conn.view.items.filter(i => i.kind === 'error')).toMatchObject([{ kind: 'error', message: REASON }]);
    // a prompt to it goes nowhere (the panel starts a new session instead)
    conn.prompt('hello?');
    expect(socket.sent).toEqual([]);
    conn.dispose();
  });

  it('says so for an unknown session too, with its own words when the server gave none', () => {
    const conn = new SessionConnection(api, 'nope');
    FakeSocket.made[0].open();
    FakeSocket.made[0].closed(GONE);
    vi.advanceTimersByTime(60_000);
    expect(FakeSocket.made).toHaveLength(1);
    expect(conn.ended).toBe(GONE_MESSAGE);
    expect(conn.view.items).toMatchObject([{ kind: 'error', message: GONE_MESSAGE }]);
    conn.dispose();
  });
});
