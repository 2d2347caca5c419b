/**
 * The agent's notebook tools in the chat: readable card titles from `_meta.toolName` and the
 * arguments (Qwen sends them only with the permission request), `notebook:edit` records put on
 * the card whose output names their `edit_id` (else shown on their own), undo marks, and the
 * code a run's permission prompt shows.
 */
import { describe, expect, it } from 'vitest';

import { editHeadline, notebookEdit, outputsText } from '../src/notebookEdits';
import { notebookToolTitle, reduceAll } from '../src/reducer';
import { ChatItem, emptyView, Frame, SessionView } from '../src/view';

let seq = 0;
function ev(type: string, data: any): Frame {
  seq += 1;
  return { type, seq, data };
}
const update = (data: any): Frame => ev('session/update', data);

function only<K extends ChatItem['kind']>(view: SessionView, kind: K): Extract<ChatItem, { kind: K }>[] {
  return view.items.filter(i => i.kind === kind) as Extract<ChatItem, { kind: K }>[];
}

function record(overrides: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    edit_id: 'e1a2b3c4d5',
    tool: 'insert_cell',
    path: 'nb.ipynb',
    cell_id: '3f2a1b2c-0000',
    cell_type: 'code',
    live: true,
    index: 0,
    before: null,
    after: '1+1',
    outputs: null,
    execution_count: null,
    status: null,
    undoes: null,
    undoable: true,
    ...overrides
  };
}

const qwenMeta = { toolName: 'mcp__jupyter__insert_cell', provenance: 'mcp', serverId: 'jupyter' };

describe('notebook tool cards', () => {
  it('titles a Qwen call from its permission arguments and attaches the edit its output names', () => {
    seq = 0;
    const args = { path: 'nb.ipynb', index: 0, cell_type: 'code', source: '1+1' };
    const view = reduceAll(emptyView(), [
      update({
        sessionUpdate: 'tool_call',
        toolCallId: 'c1',
        title: 'insert_cell (jupyter MCP Server)',
        kind: 'other',
        status: 'pending',
        rawInput: {},
        _meta: { ...qwenMeta, phase: 'preparing' }
      }),
      ev('permission:request', {
        request_id: 'r1',
        tool_call: { toolCallId: 'c1', title: JSON.stringify(args), kind: 'other', rawInput: args, _meta: qwenMeta },
        options: [{ optionId: 'allow', name: 'Allow', kind: 'allow_once' }]
      }),
      // the record comes before the tool's result: shown on its own until the result names it
      ev('notebook:edit', record())
    ]);
    const [card] = only(view, 'tool');
    expect(card.title).toBe('Insert a code cell into nb.ipynb');
    expect(card.args).toEqual(args);
    expect(only(view, 'permission')[0].title).toBe('Insert a code cell into nb.ipynb');
    expect(only(view, 'permission')[0].code).toBe('1+1');
    expect(only(view, 'notebookEdit').map(i => i.edit.editId)).toEqual(['e1a2b3c4d5']);

    const done = reduceAll(view, [
      update({
        sessionUpdate: 'tool_call_update',
        toolCallId: 'c1',
        status: 'completed',
        content: [{ type: 'content', content: { type: 'text', text: '{"edit_id":"e1a2b3c4d5","cell_id":"3f2a1b2c-0000"}' } }],
        rawOutput: '{"edit_id":"e1a2b3c4d5","cell_id":"3f2a1b2c-0000"}'
      })
    ]);
    expect(only(done, 'notebookEdit')).toEqual([]);
    const [after] = only(done, 'tool');
    expect(after.title).toBe('Insert a code cell into nb.ipynb'); // (not the raw JSON, not "insert_cell (…)")
    expect(after.status).toBe('completed');
    expect(after.edits.map(e => [e.tool, e.before, e.after, e.undoable])).toEqual([['insert_cell', null, '1+1', true]]);
  });

  it('puts a record on a card whose output already names it, and matches rawOutput objects', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      update({
        sessionUpdate: 'tool_call',
        toolCallId: 'd1',
        title: 'jupyter: replace_cell',
        kind: 'edit',
        rawInput: { path: 'sub/a.ipynb', cell_id: 'abc', source: 'x = 2' },
        _meta: { toolName: 'mcp__jupyter__replace_cell' }
      }),
      update({ sessionUpdate: 'tool_call_update', toolCallId: 'd1', status: 'completed', rawOutput: { edit_id: 'e2' } }),
      ev('notebook:edit', record({ edit_id: 'e2', tool: 'replace_cell', path: 'sub/a.ipynb', before: 'x = 1', after: 'x = 2' }))
    ]);
    const [card] = only(view, 'tool');
    expect(card.title).toBe('Edit a cell of sub/a.ipynb');
    expect(card.edits.map(e => e.editId)).toEqual(['e2']);
    expect(only(view, 'notebookEdit')).toEqual([]);
  });

  it('shows a record no card names on its own, and marks it undone when its undo arrives', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('notebook:edit', record()),
      ev('notebook:edit', record({ edit_id: 'u1', tool: 'undo', undoes: 'e1a2b3c4d5', before: '1+1', after: null, undoable: false }))
    ]);
    const edits = only(view, 'notebookEdit').map(i => i.edit);
    expect(edits.map(e => [e.editId, e.undoneBy])).toEqual([
      ['e1a2b3c4d5', 'u1'],
      ['u1', null]
    ]);
  });

  it('marks an edit undone on its card too, and ignores a replayed record', () => {
    seq = 0;
    const frames = [
      update({ sessionUpdate: 'tool_call', toolCallId: 'c1', title: 't', _meta: { toolName: 'mcp__jupyter__delete_cell' } }),
      update({
        sessionUpdate: 'tool_call_update',
        toolCallId: 'c1',
        status: 'completed',
        content: [{ type: 'content', content: { type: 'text', text: 'deleted, edit_id e9' } }]
      }),
      ev('notebook:edit', record({ edit_id: 'e9', tool: 'delete_cell', before: 'print(1)', after: null }))
    ];
    let view = reduceAll(emptyView(), frames);
    view = reduceAll(view, frames); // a reconnect's replay: same seqs, nothing doubles
    view = reduceAll(view, [ev('notebook:edit', record({ edit_id: 'u9', tool: 'undo', undoes: 'e9', undoable: false }))]);
    const [card] = only(view, 'tool');
    expect(card.title).toBe('Delete a cell of nb.ipynb'); // (no arguments came: titled from its edit)
    expect(card.edits.map(e => [e.editId, e.undoneBy])).toEqual([['e9', 'u9']]);
    expect(only(view, 'notebookEdit').map(i => i.edit.tool)).toEqual(['undo']);
  });

  it("keeps other agents' tool cards as they were", () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      update({ sessionUpdate: 'tool_call', toolCallId: 'x', title: 'Read file', kind: 'read', rawInput: { path: 'a' } }),
      update({ sessionUpdate: 'tool_call_update', toolCallId: 'x', title: 'Read a.txt', status: 'completed' })
    ]);
    const [card] = only(view, 'tool');
    expect([card.title, card.toolName, card.edits]).toEqual(['Read a.txt', '', []]);
  });
});

describe('notebook run permission', () => {
  it('shows the code the server will run in the kernel', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('permission:request', {
        request_id: 'r9',
        tool_call: {
          toolCallId: 'nb-run-ab12',
          title: 'Run a cell of nb.ipynb in your kernel',
          kind: 'execute',
          rawInput: { code: 'print(6 * 7)', path: 'nb.ipynb' },
          content: [{ type: 'content', content: { type: 'text', text: '```python\nprint(6 * 7)\n```' } }],
          _meta: { jupyterAcp: { notebookRun: true } }
        },
        options: [
          { optionId: 'allow', name: 'Run in my kernel', kind: 'allow_once' },
          { optionId: 'reject', name: "Don't run", kind: 'reject_once' }
        ]
      })
    ]);
    const [p] = only(view, 'permission');
    expect([p.title, p.toolKind, p.code]).toEqual(['Run a cell of nb.ipynb in your kernel', 'execute', 'print(6 * 7)']);
    expect(view.pendingPermissions).toEqual(['r9']);
  });

  it('shows no code for an ordinary permission', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      ev('permission:request', { request_id: 'r1', tool_call: { toolCallId: 'c', title: 'Write x', kind: 'execute', rawInput: { code: 'rm' } }, options: [] })
    ]);
    expect(only(view, 'permission')[0].code).toBeNull();
  });
});

describe('notebook edit text', () => {
  it('titles every tool', () => {
    const args = { path: 'nb.ipynb' };
    expect(
      ['insert_cell', 'replace_cell', 'move_cell', 'delete_cell', 'create_notebook', 'run_cell', 'run_code', 'read_notebook', 'list_notebooks', 'zap'].map(t =>
        notebookToolTitle(t, args)
      )
    ).toEqual([
      'Insert a cell into nb.ipynb',
      'Edit a cell of nb.ipynb',
      'Move a cell of nb.ipynb',
      'Delete a cell of nb.ipynb',
      'Create nb.ipynb',
      'Run a cell of nb.ipynb',
      'Run code in the kernel of nb.ipynb',
      'Read nb.ipynb',
      'List the notebooks',
      'Notebook tool: zap'
    ]);
  });

  it('says what an edit did, and summarizes a run', () => {
    expect(editHeadline(notebookEdit(record()))).toBe('Inserted code cell 3f2a1b2c into nb.ipynb at 0');
    const run = notebookEdit(
      record({
        tool: 'run_cell',
        before: 'print(42)',
        after: 'print(42)',
        status: 'ok',
        execution_count: 3,
        outputs: [
          { type: 'stream', name: 'stdout', text: '42\n' },
          { type: 'execute_result', mime: ['text/plain'], text: '7' },
          { type: 'display_data', mime: ['image/png'], text: '' },
          { type: 'error', ename: 'ValueError', evalue: 'bad' }
        ]
      })
    );
    expect(editHeadline(run)).toBe('Ran code cell 3f2a1b2c of nb.ipynb [3]: ok');
    expect(outputsText(run.outputs)).toBe('42\n7\n[image/png]\nValueError: bad');
    expect(outputsText(null)).toBe('');
  });

  it('parses a record defensively', () => {
    const e = notebookEdit({ edit_id: 'x', tool: 'move_cell', path: 'nb.ipynb', index: 'two', undoable: 'yes' });
    expect([e.index, e.undoable, e.before, e.cellId, e.undoneBy]).toEqual([null, false, null, null, null]);
  });
});

describe('a Qwen card whose permission the server answered', () => {
  it('is titled from the edit it made, and stays so on later updates', () => {
    seq = 0;
    const view = reduceAll(emptyView(), [
      update({
        sessionUpdate: 'tool_call',
        toolCallId: 'q1',
        title: 'insert_cell (jupyter MCP Server)',
        kind: 'other',
        rawInput: {},
        _meta: qwenMeta
      }),
      ev('notebook:edit', record({ cell_type: 'markdown' })),
      update({ sessionUpdate: 'tool_call_update', toolCallId: 'q1', status: 'in_progress', rawOutput: 'edit e1a2b3c4d5' }),
      update({ sessionUpdate: 'tool_call_update', toolCallId: 'q1', status: 'completed', title: 'insert_cell (jupyter MCP Server)' })
    ]);
    const [card] = only(view, 'tool');
    expect([card.title, card.status, card.edits.length]).toEqual(['Insert a markdown cell into nb.ipynb', 'completed', 1]);
  });
});
