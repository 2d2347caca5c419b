/**
 * The reducer: a stream of session events (docs/api.md) → what the panel shows.
 */
import { describe, expect, it } from 'vitest';

import { formatTokens, reduce, reduceAll, TRUNCATED_NOTICE } from '../src/reducer';
import { ChatItem, emptyView, Frame, SessionView } from '../src/view';

let seq = 0;
function ev(type: string, data: any): Frame {
  seq += 1;
  return { type, seq, time: 1700000000 + seq, data };
}
const chunk = (text: string): Frame =>
  ev('session/update', { sessionUpdate: 'agent_message_chunk', content: { type: 'text', text } });

function hello(overrides: Record<string, unknown> = {}): Frame {
  return {
    type: 'hello',
    data: {
      id: 's1',
      agent: 'demo',
      agent_display_name: 'Demo agent',
      state: 'ready',
      error: null,
      turns: 0,
      tokens: { input_tokens: 0, output_tokens: 0, total_tokens: 0 },
      context: { used: null, size: null },
      modes: {
        currentModeId: 'default',
        availableModes: [
          { id: 'default', name: 'Ask first' },
          { id: 'yolo', name: 'Never ask' }
        ]
      },
      pending_permissions: [],
      last_seq: 0,
      ...overrides
    }
  };
}

function kinds(view: SessionView): string[] {
  return view.items.map(i => i.kind);
}

function only<K extends ChatItem['kind']>(view: SessionView, kind: K): Extract<ChatItem, { kind: K }>[] {
  return view.items.filter(i => i.kind === kind) as Extract<ChatItem, { kind: K }>[];
}

describe('reduce', () => {
  it('takes the session, its modes and tokens from hello, and replays until history:end', () => {
    seq = 0;
    let view = reduce(emptyView(), hello({ tokens: { input_tokens: 3, output_tokens: 4, total_tokens: 7 } }));
    expect(view.id).toBe('s1');
    expect(view.agentDisplayName).toBe('Demo agent');
    expect(view.state).toBe('ready');
    expect(view.tokens.total_tokens).toBe(7);
    expect(view.modes.map(m => m.id)).toEqual(['default', 'yolo']);
    expect(view.currentMode).toBe('default');
    expect(view.replaying).toBe(true);
    view = reduce(view, { type: 'history:end', data: { last_seq: 0 } });
    expect(view.replaying).toBe(false);
  });

  it('streams agent chunks into one message per turn, after the prompt', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      hello(),
      ev('chat:message', { text: 'hello agent', turn: 1 }),
      ev('state', { state: 'busy', error: null }),
      chunk('Hel'),
      chunk('lo '),
      chunk('**world**'),
      ev('session/update', { sessionUpdate: 'agent_message_chunk', content: { type: 'text', text: '' } })
    ]);
    expect(kinds(view)).toEqual(['user', 'agent']);
    expect(only(view, 'user')[0].text).toBe('hello agent');
    expect(only(view, 'agent')[0].text).toBe('Hello **world**');
    expect(view.busy).toBe(true);
    expect(view.lastSeq).toBe(seq);
  });

  it('keeps thoughts apart from the reply', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('session/update', { sessionUpdate: 'agent_thought_chunk', content: { type: 'text', text: 'hmm ' } }),
      ev('session/update', { sessionUpdate: 'agent_thought_chunk', content: { type: 'text', text: 'ok' } }),
      chunk('Answer')
    ]);
    expect(kinds(view)).toEqual(['thought', 'agent']);
    expect(only(view, 'thought')[0].text).toBe('hmm ok');
  });

  it('builds a tool-call card and updates it in place, with its diff', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('session/update', {
        sessionUpdate: 'tool_call',
        toolCallId: 'write-1',
        title: 'Write hello.txt',
        kind: 'edit',
        status: 'pending',
        locations: [{ path: '/ws/hello.txt' }, { path: '/ws/hello.txt' }]
      }),
      chunk('writing…'),
      ev('session/update', {
        sessionUpdate: 'tool_call_update',
        toolCallId: 'write-1',
        status: 'completed',
        content: [{ type: 'diff', path: '/ws/hello.txt', oldText: null, newText: 'hi' }]
      })
    ]);
    expect(kinds(view)).toEqual(['tool', 'agent']);
    const [tool] = only(view, 'tool');
    expect(tool.title).toBe('Write hello.txt');
    expect(tool.toolKind).toBe('edit');
    expect(tool.status).toBe('completed');
    expect(tool.locations).toEqual(['/ws/hello.txt']);
    expect(tool.content).toEqual([{ type: 'diff', path: '/ws/hello.txt', oldText: null, newText: 'hi' }]);
  });

  it('shows text output of a tool call and an update for an unseen call as a new card', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('session/update', {
        sessionUpdate: 'tool_call_update',
        toolCallId: 'sh-1',
        title: 'ls',
        kind: 'execute',
        status: 'in_progress',
        content: [{ type: 'content', content: { type: 'text', text: 'a.txt\n' } }]
      })
    ]);
    const [tool] = only(view, 'tool');
    expect(tool.status).toBe('in_progress');
    expect(tool.content).toEqual([{ type: 'text', text: 'a.txt\n' }]);
  });

  it('replaces the plan of the current turn instead of stacking copies', () => {
    seq = 0;
    const plan = (status: string) =>
      ev('session/update', {
        sessionUpdate: 'plan',
        entries: [
          { content: 'read', priority: 'high', status: 'completed' },
          { content: 'write', priority: 'medium', status }
        ]
      });
    let view = reduceAll(emptyView(), [ev('chat:message', { text: 'go', turn: 1 }), plan('pending'), plan('completed')]);
    expect(kinds(view)).toEqual(['user', 'plan']);
    expect(only(view, 'plan')[0].entries[1].status).toBe('completed');
    view = reduceAll(view, [ev('chat:message', { text: 'again', turn: 2 }), plan('in_progress')]);
    expect(kinds(view)).toEqual(['user', 'plan', 'user', 'plan']);
  });

  it('shows a permission prompt with the agent options, then how it was answered', () => {
    seq = 0;
    let view = reduceAll(emptyView(), [
      ev('permission:request', {
        request_id: 'r1',
        tool_call: { toolCallId: 'write-1', title: 'Write hello.txt', kind: 'edit' },
        options: [
          { optionId: 'allow', name: 'Allow', kind: 'allow_once' },
          { optionId: 'reject', name: 'Reject', kind: 'reject_once' }
        ]
      })
    ]);
    expect(view.pendingPermissions).toEqual(['r1']);
    let [prompt] = only(view, 'permission');
    expect(prompt.title).toBe('Write hello.txt');
    expect(prompt.options.map(o => [o.optionId, o.name, o.kind])).toEqual([
      ['allow', 'Allow', 'allow_once'],
      ['reject', 'Reject', 'reject_once']
    ]);
    expect(prompt.resolved).toBeNull();
    view = reduce(view, ev('permission:resolved', { request_id: 'r1', outcome: 'selected', option_id: 'allow', by: 'user' }));
    [prompt] = only(view, 'permission');
    expect(view.pendingPermissions).toEqual([]);
    expect(prompt.resolved).toEqual({ outcome: 'selected', optionId: 'allow', by: 'user' });
  });

  it('shows prompts still pending at connect time (from hello) once, even when replayed', () => {
    seq = 0;
    const request = {
      request_id: 'r9',
      tool_call: { title: 'Run ls', kind: 'execute' },
      options: [{ optionId: 'ok', name: 'Run', kind: 'allow_once' }]
    };
    const view = reduceAll(emptyView(), [hello({ pending_permissions: [request] }), ev('permission:request', request)]);
    expect(only(view, 'permission')).toHaveLength(1);
    expect(view.pendingPermissions).toEqual(['r9']);
  });

  it('counts tokens of turns ended after hello on top of the hello totals', () => {
    seq = 0;
    const turnEnd = (total: number, turn: number) =>
      ev('chat:response', {
        text: 'x',
        stop_reason: 'end_turn',
        turn,
        duration: 0.25,
        usage: { input_tokens: total - 1, output_tokens: 1, total_tokens: total }
      });
    const history = [ev('chat:message', { text: 'a', turn: 1 }), turnEnd(10, 1)];
    // the server's totals at hello already include turn 1 (seq 2)
    let view = reduceAll(emptyView(), [
      hello({ tokens: { input_tokens: 9, output_tokens: 1, total_tokens: 10 }, turns: 1, last_seq: 2 }),
      ...history,
      { type: 'history:end', data: { last_seq: 2 } }
    ]);
    expect(view.tokens.total_tokens).toBe(10);
    view = reduceAll(view, [ev('chat:message', { text: 'b', turn: 2 }), turnEnd(5, 2)]);
    expect(view.tokens).toEqual({ input_tokens: 13, output_tokens: 2, total_tokens: 15 });
    expect(view.turns).toBe(2);
    const turns = only(view, 'turn');
    expect(turns.map(t => [t.stopReason, t.totalTokens])).toEqual([
      ['end_turn', 10],
      ['end_turn', 5]
    ]);
    expect(view.busy).toBe(false);
  });

  it('ignores events it has already applied, so a reconnect replay changes nothing', () => {
    seq = 0;
    const events = [ev('chat:message', { text: 'hi', turn: 1 }), chunk('one '), chunk('two')];
    const first = reduceAll(emptyView(), [hello(), ...events]);
    const again = reduceAll(first, [hello({ last_seq: 3 }), ...events, { type: 'history:end', data: {} }]);
    expect(again.items).toEqual(first.items);
    expect(only(again, 'agent')[0].text).toBe('one two');
    // and a later event after the replay is applied
    const more = reduce(again, chunk(' three'));
    expect(only(more, 'agent')[0].text).toBe('one two three');
  });

  it('says once where the server had dropped older events, then replays the rest', () => {
    seq = 40;
    const kept = [ev('chat:message', { text: 'later', turn: 9 }), chunk('... [3,145,728 bytes dropped by the server]')];
    const view = reduceAll(emptyView(), [
      hello({ last_seq: 42 }),
      { type: 'history:truncated', data: { dropped: 40, first_seq: 41 } },
      ...kept,
      { type: 'history:end', data: { last_seq: 42 } }
    ]);
    expect(kinds(view)).toEqual(['notice', 'user', 'agent']);
    expect(only(view, 'notice')[0].text).toBe(TRUNCATED_NOTICE);
    expect(view.lastSeq).toBe(42); // (the marker has no seq: resuming starts after the last event)
  });

  it('tracks context usage, mode changes and available commands', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      hello(),
      ev('session/update', { sessionUpdate: 'usage_update', used: 120, size: 8192 }),
      ev('session/update', { sessionUpdate: 'current_mode_update', currentModeId: 'yolo' }),
      ev('session/update', {
        sessionUpdate: 'available_commands_update',
        availableCommands: [{ name: 'write', description: 'write a file' }]
      })
    ]);
    expect(view.context).toEqual({ used: 120, size: 8192 });
    expect(view.currentMode).toBe('yolo');
    expect(view.commands).toEqual([{ name: 'write', description: 'write a file' }]);
    expect(view.items).toEqual([]);
  });

  it('shows errors in the words of the server: session events and socket-only replies', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('state', { state: 'error', error: 'The agent ran out of memory' }),
      ev('error', { message: 'The agent stopped during the turn: killed', turn: 1 }),
      { type: 'error', data: { message: 'The agent is still answering the previous message', status: 409 } },
      ev('cancel', {})
    ]);
    expect(view.state).toBe('error');
    expect(view.error).toBe('The agent ran out of memory');
    expect(view.items).toEqual([
      { kind: 'error', key: 'err:2', message: 'The agent stopped during the turn: killed' },
      { kind: 'error', key: 'err:x1', message: 'The agent is still answering the previous message' },
      { kind: 'notice', key: 'note:3', text: 'Cancel requested' }
    ]);
  });

  it("shows a turn's error inside that turn: before its end, which ends the turn", () => {
    // the server sends a failed turn's `error` before its `chat:response` (docs/api.md)
    seq = 0;
    const view = reduceAll(reduce(emptyView(), hello()), [
      { type: 'history:end', data: {} },
      ev('chat:message', { text: 'hi', turn: 1 }),
      ev('state', { state: 'busy', error: null }),
      chunk('Half a repl'),
      ev('error', { message: 'The agent stopped during the turn: killed', turn: 1 }),
      ev('chat:response', { text: 'Half a repl', stop_reason: 'error', turn: 1, usage: { total_tokens: 7 } }),
      ev('state', { state: 'error', error: 'killed' })
    ]);
    expect(kinds(view)).toEqual(['user', 'agent', 'error', 'turn']);
    expect(only(view, 'error')[0].message).toBe('The agent stopped during the turn: killed');
    expect(only(view, 'turn')[0].stopReason).toBe('error');
    expect(view.busy).toBe(false);
    expect(view.turns).toBe(1);
  });

  it('never changes its input and tolerates junk frames', () => {
    seq = 0;
    const start = reduce(emptyView(), hello());
    const frozen = JSON.stringify(start);
    reduce(start, chunk('x'));
    expect(JSON.stringify(start)).toBe(frozen);
    expect(reduce(start, { type: 'pong' })).toBe(start);
    expect(reduce(start, null as unknown as Frame)).toBe(start);
    expect(reduce(start, ev('session/update', { sessionUpdate: 'something_new' })).items).toEqual([]);
  });
});

const update = (u: Record<string, unknown>): Frame => ev('session/update', u);
const keys = (view: SessionView): string[] => view.items.map(i => i.key);

describe('item keys and identity', () => {
  it('gives every item the key of the contract', () => {
    seq = 0;
    const view = reduceAll(reduce(emptyView(), hello({ pending_permissions: [{ request_id: 'rp', tool_call: {}, options: [] }] })), [
      { type: 'history:end', data: {} },
      ev('chat:message', { text: 'hi', turn: 1 }), // 1
      update({ sessionUpdate: 'agent_thought_chunk', content: { type: 'text', text: 'hm' } }), // 2
      update({ sessionUpdate: 'agent_thought_chunk', content: { type: 'text', text: 'm' } }), // 3
      chunk('Hel'), // 4
      chunk('lo'), // 5
      update({ sessionUpdate: 'plan', entries: [{ content: 'a' }] }), // 6
      update({ sessionUpdate: 'tool_call', toolCallId: 'c1', title: 'Write', kind: 'edit' }), // 7
      update({ sessionUpdate: 'plan', entries: [{ content: 'a' }, { content: 'b' }] }), // 8
      ev('permission:request', { request_id: 'r1', tool_call: { toolCallId: 'c1' }, options: [] }), // 9
      ev('notebook:edit', { edit_id: 'e1', tool: 'insert_cell', path: 'nb.ipynb' }), // 10
      ev('error', { message: 'x' }), // 11
      ev('cancel', {}), // 12
      ev('chat:response', { stop_reason: 'end_turn', turn: 1 }), // 13
      { type: 'history:truncated', data: {} }
    ]);
    expect(keys(view)).toEqual([
      'perm:rp',
      'u:1',
      't:2',
      'a:4',
      'plan:6',
      'tool:c1',
      'perm:r1',
      'edit:e1',
      'err:11',
      'note:12',
      'turn:13',
      'note:x11'
    ]);
    expect(only(view, 'plan')[0].entries).toHaveLength(2);
  });

  it('keeps the identity of every item a frame did not change', () => {
    seq = 0;
    let view = reduceAll(reduce(emptyView(), hello()), [
      ev('chat:message', { text: 'hi', turn: 1 }),
      update({ sessionUpdate: 'tool_call', toolCallId: 'c1', title: 'Write', kind: 'edit', status: 'pending' }),
      chunk('a')
    ]);
    const check = (frame: Frame, changed: string[]): void => {
      const before = view;
      view = reduce(view, frame);
      for (const item of view.items) {
        const old = before.items.find(i => i.key === item.key);
        if (changed.includes(item.key)) {
          expect(item).not.toBe(old);
        } else {
          expect(item).toBe(old);
        }
      }
    };
    check(chunk('b'), ['a:3']);
    check(update({ sessionUpdate: 'tool_call_update', toolCallId: 'c1', status: 'completed' }), ['tool:c1']);
    check(ev('permission:request', { request_id: 'r', tool_call: { toolCallId: 'zz' }, options: [] }), ['perm:r']);
    check(ev('permission:resolved', { request_id: 'r', outcome: 'selected', option_id: 'x' }), ['perm:r']);
    check(ev('notebook:edit', { edit_id: 'e1', tool: 'insert_cell', path: 'nb.ipynb', undoable: true }), ['edit:e1']);
    check(ev('notebook:edit', { edit_id: 'e2', tool: 'insert_cell', path: 'nb.ipynb', undoable: true }), ['edit:e2']);
    check(ev('notebook:edit', { edit_id: 'u1', tool: 'undo', undoes: 'e1', path: 'nb.ipynb' }), ['edit:e1', 'edit:u1']);
    check(ev('chat:response', { stop_reason: 'end_turn', turn: 1 }), [`turn:${seq}`]);
    expect(view.items.find(i => i.key === 'a:3')).toMatchObject({ text: 'ab' });
  });

  it('drops the key of an edit its tool card adopts', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      update({ sessionUpdate: 'tool_call', toolCallId: 'c', title: 't', kind: 'edit' }),
      ev('notebook:edit', { edit_id: 'e7', tool: 'insert_cell', path: 'nb.ipynb' }),
      update({ sessionUpdate: 'tool_call_update', toolCallId: 'c', rawOutput: { edit_id: 'e7' } })
    ]);
    expect(keys(view)).toEqual(['tool:c']);
  });
});

describe('terminal:output', () => {
  const term = (id: string, output: string, exit: unknown = null): Frame =>
    ev('terminal:output', { terminal_id: id, output, truncated: false, exit_status: exit });

  it('keeps the latest output and re-emits the card that shows it', () => {
    seq = 0;
    let view = reduceAll(emptyView(), [
      update({
        sessionUpdate: 'tool_call',
        toolCallId: 'c',
        title: 'ls',
        kind: 'execute',
        content: [{ type: 'terminal', terminalId: 't1' }]
      }),
      chunk('x')
    ]);
    const [card, text] = view.items;
    view = reduce(view, term('t1', 'a\n'));
    expect(view.terminals.t1).toEqual({ output: 'a\n', truncated: false, exitStatus: null });
    expect(view.items[0]).not.toBe(card);
    expect(view.items[0].key).toBe('tool:c');
    expect(view.items[1]).toBe(text);
    view = reduce(view, term('t1', 'a\nb\n', { exit_code: 0, signal: null }));
    expect(view.terminals.t1.output).toBe('a\nb\n');
    expect(view.terminals.t1.exitStatus).toEqual({ exitCode: 0, signal: null });
  });

  it('stores the output of a terminal no card shows yet', () => {
    seq = 0;
    const before = reduce(emptyView(), chunk('x'));
    const view = reduce(before, term('t9', 'later'));
    expect(view.items).toBe(before.items);
    expect(view.terminals.t9.output).toBe('later');
  });
});

describe('formatTokens', () => {
  it('groups digits and pluralises', () => {
    expect(formatTokens(1)).toBe('1 token');
    expect(formatTokens(1234)).toBe('1,234 tokens');
  });
});

describe('reduceAll', () => {
  /** A deterministic pseudo-random stream: chunks of both kinds (some empty, some links, some
   * replayed), tool calls, prompts and turn ends, in the shapes the server sends. */
  function stream(seed: number, n: number): Frame[] {
    let x = seed;
    const rand = (k: number): number => {
      x = (x * 1103515245 + 12345) % 2147483648;
      return x % k;
    };
    const frames: Frame[] = [hello()];
    let s = 0;
    for (let i = 0; i < n; i++) {
      const r = rand(20);
      const at = r === 0 && s > 2 ? s - 1 - rand(3) : ++s; // sometimes a seq already seen
      const frame = (type: string, data: any): Frame => ({ type, seq: at, time: 1700000000 + at, data });
      if (r < 9) {
        const text = ['', 'a', 'bc ', '\n', '**x**'][rand(5)];
        frames.push(frame('session/update', { sessionUpdate: 'agent_message_chunk', content: { type: 'text', text } }));
      } else if (r < 12) {
        frames.push(frame('session/update', { sessionUpdate: 'agent_thought_chunk', content: { type: 'text', text: 't' } }));
      } else if (r < 13) {
        const content = { type: 'resource_link', name: 'f', uri: 'file:///w/f' };
        frames.push(frame('session/update', { sessionUpdate: 'agent_message_chunk', content }));
      } else if (r < 15) {
        frames.push(frame('session/update', { sessionUpdate: 'tool_call', toolCallId: `c${rand(3)}`, title: 'x', status: 'pending' }));
      } else if (r < 17) {
        frames.push(frame('chat:message', { text: 'q' }));
      } else if (r < 18) {
        frames.push(frame('chat:response', { stop_reason: 'end_turn', usage: { total_tokens: 3 } }));
      } else {
        frames.push(frame('session/update', { sessionUpdate: 'agent_message_chunk' })); // no content
      }
    }
    frames.push({ type: 'history:end', data: {} });
    return frames;
  }

  it('gives the same view as reducing frame by frame, keys included', () => {
    for (let seed = 1; seed <= 200; seed++) {
      const frames = stream(seed, 60);
      const one = frames.reduce(reduce, emptyView());
      const all = reduceAll(emptyView(), frames);
      expect(all).toEqual(one);
      // and split at any point (two socket messages), on top of an earlier view
      const cut = seed % frames.length;
      expect(reduceAll(reduceAll(emptyView(), frames.slice(0, cut)), frames.slice(cut))).toEqual(one);
    }
  });

  it('appends a run of chunks at once and leaves the earlier items alone', () => {
    const before = reduceAll(emptyView(), [hello(), ev('chat:message', { text: 'q' }), chunk('a')]);
    const after = reduceAll(before, [chunk('b'), chunk(''), chunk('c')]);
    expect(after.items.map(i => (i.kind === 'agent' ? i.text : i.kind))).toEqual(['user', 'abc']);
    expect(after.items[0]).toBe(before.items[0]);
    expect(reduceAll(after, [])).toBe(after);
  });
});
