/**
 * Issue 18 in the reducer and the connection: the session model's new fields, attachments of
 * a prompt, live command and model updates, and a suspended session's socket that comes back
 * after `resume` with `?since=` (seqs continue across resumes).
 */
import { describe, expect, it, vi } from 'vitest';

import { GONE, SessionConnection } from '../src/connection';
import { reduceAll } from '../src/reducer';
import { emptyView } from '../src/view';
import { FakeSocket, fakeApi, useFakeSockets } from './fakeSocket';

const models = {
  config_id: 'model',
  current: 'demo-small',
  available: [
    { value: 'demo-small', name: 'Demo small', description: 'fast' },
    { value: 'demo-large', name: 'Demo large', description: null }
  ]
};

describe('reduce (issue 18 fields)', () => {
  it('takes title, commands, prompt capabilities and models from hello', () => {
    const view = reduceAll(emptyView(), [
      {
        type: 'hello',
        data: {
          id: 's1', agent: 'demo', state: 'suspended', title: 'first prompt', restore: 'load',
          available_commands: [{ name: 'recall', description: 'what you said', input: null },
            { name: 'write', description: 'write', input: { hint: 'path text' } }],
          prompt_capabilities: { image: true, audio: false, embeddedContext: true },
          models
        }
      }
    ]);
    expect(view.title).toBe('first prompt');
    expect(view.restore).toBe('load');
    expect(view.commands).toEqual([
      { name: 'recall', description: 'what you said' },
      { name: 'write', description: 'write', hint: 'path text' }
    ]);
    expect(view.promptCapabilities).toEqual({ image: true, audio: false, embeddedContext: true });
    expect(view.models?.current).toBe('demo-small');
    expect(view.models?.available.map(m => m.value)).toEqual(['demo-small', 'demo-large']);
    const none = reduceAll(emptyView(), [{ type: 'hello', data: { id: 's2', models: null } }]);
    expect(none.models).toBeNull();
    expect(none.promptCapabilities.image).toBe(false);
  });

  it('shows attachments of a prompt, follows command and model updates', () => {
    const view = reduceAll(emptyView(), [
      { type: 'hello', data: { id: 's1', state: 'ready', models } },
      {
        type: 'chat:message', seq: 1,
        data: { text: 'read @notes.md', turn: 1,
          attachments: [{ type: 'resource', name: 'notes.md', uri: 'file:///w/notes.md', size: 12 }] }
      },
      { type: 'session/update', seq: 2, data: { sessionUpdate: 'available_commands_update',
        availableCommands: [{ name: 'recall', description: 'r', input: { hint: 'nothing' } }] } },
      { type: 'session/update', seq: 3, data: { sessionUpdate: 'config_option_update',
        configOptions: [{ id: 'model', currentValue: 'demo-large' }] } }
    ]);
    expect(view.items).toEqual([{
      kind: 'user', key: 'u:1', text: 'read @notes.md', turn: 1,
      attachments: [{ type: 'resource', name: 'notes.md', uri: 'file:///w/notes.md', size: 12 }]
    }]);
    expect(view.title).toBe('read @notes.md');
    expect(view.commands).toEqual([{ name: 'recall', description: 'r', hint: 'nothing' }]);
    expect(view.models?.current).toBe('demo-large');
  });
});

const api = fakeApi;
const SUSPENDED = 'The session is suspended: resume it to go on';

describe('SessionConnection on a suspended session', () => {
  useFakeSockets();

  function replaySuspended(socket: FakeSocket): void {
    socket.open();
    socket.frames(
      { type: 'hello', data: { id: 's1', state: 'suspended', last_seq: 7 } },
      { type: 'chat:message', seq: 6, data: { text: 'earlier', turn: 1 } },
      { type: 'chat:response', seq: 7, data: { turn: 1 } },
      { type: 'history:end', data: {} }
    );
  }

  it('shows the transcript, waits without reconnecting, and comes back after resume with ?since=', () => {
    const conn = new SessionConnection(api, 's1');
    replaySuspended(FakeSocket.made[0]);
    FakeSocket.made[0].closed(GONE, SUSPENDED);
    vi.advanceTimersByTime(60_000);
    expect(FakeSocket.made).toHaveLength(1);
    expect(conn.suspended).toBe(true);
    expect(conn.ended).toBeNull();
    expect(conn.view.state).toBe('suspended');
    expect(conn.view.items.map(i => i.kind)).toEqual(['user', 'turn']); // no error for a suspension
    conn.resumed();
    expect(FakeSocket.made.map(s => s.url)).toEqual(['ws://x/s1?since=0', 'ws://x/s1?since=7']);
    const next = FakeSocket.made[1];
    next.open();
    next.frames({ type: 'hello', data: { id: 's1', state: 'ready', last_seq: 9 } },
      { type: 'state', seq: 8, data: { state: 'ready' } }, { type: 'history:end', data: {} });
    expect(conn.suspended).toBe(false);
    expect(conn.view.state).toBe('ready');
    conn.prompt('again', [{ mime_type: 'image/png', data: 'AAAA' }]);
    expect(JSON.parse(next.sent[0])).toEqual({
      type: 'chat:message', message: 'again', images: [{ mime_type: 'image/png', data: 'AAAA' }]
    });
    conn.dispose();
  });

  it('sends at once when the socket connected after the resume had begun (its hello is live)', () => {
    const conn = new SessionConnection(api, 's1');
    const socket = FakeSocket.made[0];
    socket.open();
    socket.frames({ type: 'hello', data: { id: 's1', state: 'starting', last_seq: 9, modes: null } },
      { type: 'history:end', data: {} });
    // POST resume answers after this socket's (live) hello: what the agent offers comes with it
    conn.resumed({ id: 's1', state: 'ready', modes: { currentModeId: 'default', availableModes: [{ id: 'default', name: 'Ask' }] },
      available_commands: [{ name: 'recall', description: 'r', input: null }], models });
    expect(conn.view.modes).toEqual([{ id: 'default', name: 'Ask' }]);
    expect(conn.view.commands.map(c => c.name)).toEqual(['recall']);
    expect(conn.view.models?.current).toBe('demo-small');
    conn.prompt('/recall');
    expect(socket.sent.map(t => JSON.parse(t).message)).toEqual(['/recall']);
    expect(FakeSocket.made).toHaveLength(1);
    conn.dispose();
  });

  it('takes the 4404 after its own Close for a suspension, whatever the reason says', () => {
    const conn = new SessionConnection(api, 's1');
    const socket = FakeSocket.made[0];
    socket.open();
    socket.frames({ type: 'hello', data: { id: 's1', state: 'ready', last_seq: 3 } }, { type: 'history:end', data: {} });
    conn.closing(true);
    socket.closed(GONE, 'The session has ended; unless it was deleted, it is listed as suspended');
    expect(conn.ended).toBeNull();
    expect(conn.suspended).toBe(true);
    expect(conn.view.items.filter(i => i.kind === 'error')).toEqual([]);
    conn.closing(false);
    conn.resumed();
    expect(FakeSocket.made.map(s => s.url)).toEqual(['ws://x/s1?since=0', 'ws://x/s1?since=0']);
    conn.dispose();
  });

  it('reconnects at once when resume answered before the suspended socket closed', () => {
    const conn = new SessionConnection(api, 's1');
    replaySuspended(FakeSocket.made[0]);
    conn.resumed();
    expect(FakeSocket.made).toHaveLength(1);
    conn.prompt('typed while resuming'); // not to the socket that only replays
    expect(FakeSocket.made[0].sent).toEqual([]);
    FakeSocket.made[0].closed(GONE, SUSPENDED);
    expect(FakeSocket.made.map(s => s.url)).toEqual(['ws://x/s1?since=0', 'ws://x/s1?since=7']);
    expect(conn.suspended).toBe(false);
    FakeSocket.made[1].open();
    expect(FakeSocket.made[1].sent.map(t => JSON.parse(t).message)).toEqual(['typed while resuming']);
    conn.dispose();
  });
});
