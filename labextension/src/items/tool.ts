/**
 * Tool-call cards and notebook edits.
 *
 * A card is a `<details>`: its summary says what the tool does and how it went, its body shows
 * the diffs, text and terminal output, and the notebook edits the call made. It is open when made
 * live (closed when made from a replayed history), and `open` is never written again, so what
 * the user opened or closed stays so. An update patches the summary and rebuilds only the body
 * parts whose content changed (a diff is drawn once per old/new text).
 */

import { diffBlock } from '../diff';
import { displayPath, h } from '../dom';
import { __ } from '../i18n';
import type { ItemView } from '../log';
import { editHeadline, NOTEBOOK_TOOL_PREFIX, NotebookEdit, outputsText } from '../notebookEdits';
import type { ChatItem, TerminalState, ToolContent, ToolItem } from '../view';
import type { EditActions, ItemContext } from './context';

const STATUS_LABEL: Record<string, string> = {
  pending: 'pending',
  in_progress: 'running',
  completed: 'done',
  failed: 'failed'
};

const EDIT_MARK: Record<string, string> = { run_cell: '▶', run_code: '▶', undo: '↶' };

/** Set a node's text only when it differs (no mutation otherwise). */
function setText(node: HTMLElement, text: string): void {
  if (node.textContent !== text) {
    node.textContent = text;
  }
}

/** Make `nodes` the children of `parent`, touching it only when they differ. */
function syncChildren(parent: HTMLElement, nodes: Node[]): void {
  const now = parent.childNodes;
  if (now.length === nodes.length && nodes.every((n, i) => now[i] === n)) {
    return;
  }
  parent.replaceChildren(...nodes);
}

/**
 * A notebook edit as a cell-level diff (the cell's source before → after), a run as its code
 * and outputs; an undoable one with its Undo button, or "Undone" once reverted.
 */
export function drawEdit(e: NotebookEdit, actions?: EditActions): HTMLElement {
  const run = e.tool === 'run_cell' || e.tool === 'run_code';
  const state = actions?.undoState(e.editId);
  const undone = e.undoneBy !== null;
  const parts: (HTMLElement | null)[] = [];
  if (run) {
    parts.push(h('pre', { className: 'jp-AcpNbEdit-code' }, h('code', {}, e.after ?? e.before ?? '')));
    const out = outputsText(e.outputs);
    if (out) {
      parts.push(h('pre', { className: 'jp-AcpNbEdit-outputs jp-AcpTool-output' }, out));
    }
  } else if ((e.before !== null || e.after !== null) && e.before !== e.after) {
    // (a move keeps the source: its line says where the cell went)
    parts.push(h('div', { className: 'jp-AcpDiff' }, diffBlock(e.before, e.after ?? '')));
  }
  let undo: HTMLElement | null = null;
  if (undone) {
    undo = h('span', { className: 'jp-AcpNbEdit-undone' }, __('Undone'));
  } else if (e.undoable && e.tool !== 'undo' && actions) {
    undo = h(
      'button',
      {
        className: 'jp-Button jp-mod-styled jp-AcpNbEdit-undo',
        'data-edit-id': e.editId,
        title: __('Put the cell back as it was before this edit'),
        disabled: !!state?.busy,
        onclick: () => actions.undo(e.editId)
      },
      state?.busy ? __('Undoing…') : __('Undo')
    );
  }
  return h(
    'div',
    {
      className: `jp-AcpNbEdit${undone ? ' jp-mod-undone' : ''}`,
      'data-edit-id': e.editId,
      'data-tool': e.tool
    },
    h(
      'div',
      { className: 'jp-AcpNbEdit-head' },
      h('span', { className: 'jp-AcpNbEdit-mark' }, EDIT_MARK[e.tool] ?? '✎'),
      h('span', { className: 'jp-AcpNbEdit-title' }, editHeadline(e)),
      undo
    ),
    ...parts,
    state?.error ? h('div', { className: 'jp-AcpNbEdit-error', role: 'alert' }, state.error) : null
  );
}

/** What a terminal's part of a card shows: its latest output, and how it ended. */
function terminalPart(id: string, state: TerminalState | undefined): HTMLElement {
  const exit = state?.exitStatus;
  const how = !state
    ? __('waiting for output…')
    : exit
      ? exit.signal
        ? __('killed by %1', exit.signal)
        : __('exit code %1', String(exit.exitCode ?? '?'))
      : __('running…');
  return h(
    'div',
    { className: 'jp-AcpTool-terminal', 'data-terminal-id': id },
    h(
      'div',
      { className: 'jp-AcpTool-terminalHead' },
      `${__('Terminal')} · ${how}${state?.truncated ? ` · ${__('older output dropped')}` : ''}`
    ),
    state ? h('pre', { className: 'jp-AcpTool-output jp-AcpTool-terminalOutput' }, state.output) : null
  );
}

/** Whether two contents show the same thing (a card's update re-sends all of them). */
function sameContent(a: ToolContent, b: ToolContent): boolean {
  if (a.type === 'diff' && b.type === 'diff') {
    return a.path === b.path && a.oldText === b.oldText && a.newText === b.newText;
  }
  if (a.type === 'text' && b.type === 'text') {
    return a.text === b.text;
  }
  return a.type === 'terminal' && b.type === 'terminal' && a.terminalId === b.terminalId;
}

interface Part {
  content: ToolContent;
  /** For a terminal: the output it was drawn from; for text: whether it was folded. */
  drawnFrom: TerminalState | undefined | boolean;
  node: HTMLElement;
}

export class ToolView implements ItemView<ToolItem> {
  readonly node: HTMLDetailsElement;
  private readonly _kind = h('span', { className: 'jp-AcpTool-kind' });
  private readonly _title = h('span', { className: 'jp-AcpTool-title' });
  private readonly _status = h('span', { className: 'jp-AcpTool-status' });
  private readonly _body = h('div', { className: 'jp-AcpTool-body' });
  private _where: { text: string; node: HTMLElement } | null = null;
  private _parts: Part[] = [];
  /** The edits' nodes, redrawn when the edit or its undo state changes. */
  private _edits = new Map<string, { edit: NotebookEdit; state: string; node: HTMLElement }>();

  constructor(
    item: ToolItem,
    private readonly _ctx: ItemContext
  ) {
    this.node = h(
      'details',
      { 'data-tool-call-id': item.toolCallId },
      h('summary', { className: 'jp-AcpTool-head' }, this._kind, this._title, this._status),
      this._body
    ) as HTMLDetailsElement;
    this.node.open = !_ctx.replaying(); // (only here: the user's choice is kept after)
    this.update(item);
  }

  update(item: ToolItem): void {
    const className = `jp-AcpTool jp-AcpTool-${item.status}`;
    if (this.node.className !== className) {
      this.node.className = className;
    }
    setText(this._kind, item.toolKind);
    setText(this._title, item.title);
    setText(this._status, STATUS_LABEL[item.status] ?? item.status);
    const workspace = this._ctx.workspace();
    const nodes: HTMLElement[] = [];
    // a location that is also a diff's path is shown once, above its diff
    const shown = new Set(item.content.map(c => (c.type === 'diff' ? c.path : '')));
    const where = item.locations
      .filter(l => !shown.has(l))
      .map(l => displayPath(l, workspace))
      .join(', ');
    if (where) {
      if (this._where?.text !== where) {
        this._where = { text: where, node: h('div', { className: 'jp-AcpTool-where' }, where) };
      }
      nodes.push(this._where.node);
    }
    const terminals = this._ctx.terminals();
    // a notebook tool's result is JSON for the agent: the edits below say it for people
    const fold = item.toolName.startsWith(NOTEBOOK_TOOL_PREFIX) && item.edits.length > 0;
    this._parts = item.content.map((c, i) => {
      const old = this._parts[i];
      const drawnFrom = c.type === 'terminal' ? terminals[c.terminalId] : c.type === 'text' ? fold : undefined;
      if (old && sameContent(old.content, c) && old.drawnFrom === drawnFrom) {
        nodes.push(old.node);
        return old;
      }
      const node = this._draw(c, workspace, terminals, fold);
      nodes.push(node);
      return { content: c, drawnFrom, node };
    });
    const edits = new Map<string, { edit: NotebookEdit; state: string; node: HTMLElement }>();
    for (const e of item.edits) {
      const state = JSON.stringify(this._ctx.edits?.undoState(e.editId) ?? null);
      const old = this._edits.get(e.editId);
      const drawn = old && old.edit === e && old.state === state ? old : { edit: e, state, node: drawEdit(e, this._ctx.edits) };
      edits.set(e.editId, drawn);
      nodes.push(drawn.node);
    }
    this._edits = edits;
    syncChildren(this._body, nodes);
  }

  private _draw(
    c: ToolContent,
    workspace: string,
    terminals: Record<string, TerminalState>,
    fold: boolean
  ): HTMLElement {
    if (c.type === 'diff') {
      return h(
        'div',
        { className: 'jp-AcpDiff' },
        h('div', { className: 'jp-AcpDiff-path' }, displayPath(c.path, workspace)),
        diffBlock(c.oldText, c.newText)
      );
    }
    if (c.type === 'text') {
      const out = h('pre', { className: 'jp-AcpTool-output' }, c.text);
      return fold ? h('details', { className: 'jp-AcpTool-result' }, h('summary', {}, __('Result')), out) : out;
    }
    return terminalPart(c.terminalId, terminals[c.terminalId]);
  }
}

/** A notebook edit no tool card claimed (yet): drawn alone, redrawn when it changes. */
export class NotebookEditView implements ItemView<Extract<ChatItem, { kind: 'notebookEdit' }>> {
  readonly node = h('div', { className: 'jp-AcpTool jp-AcpTool-notebookEdit' });

  constructor(
    item: Extract<ChatItem, { kind: 'notebookEdit' }>,
    private readonly _ctx: ItemContext
  ) {
    this.update(item);
  }

  update(item: Extract<ChatItem, { kind: 'notebookEdit' }>): void {
    this.node.replaceChildren(drawEdit(item.edit, this._ctx.edits));
  }
}
