/**
 * The agent's notebook tools (MCP server "jupyter") as the chat shows them: readable titles
 * for their calls, the `notebook:edit` records (docs/api.md) parsed, and the lines that
 * summarize a run's outputs. Pure: the reducer and the cards (items.ts) share it.
 */

import type { ChatItem, ToolItem } from './view';

export const str = (v: unknown, fallback = ''): string => (typeof v === 'string' ? v : fallback);

/**
 * One edit, run or undo of a notebook by the agent's notebook tools (event `notebook:edit`):
 * the cell's source before and after, so a card can show what changed and offer to undo it.
 */
export interface NotebookEdit {
  editId: string;
  /** insert_cell, replace_cell, move_cell, delete_cell, create_notebook, run_cell or undo */
  tool: string;
  path: string;
  cellId: string | null;
  cellType: string | null;
  index: number | null;
  before: string | null;
  after: string | null;
  /** run_cell: the outputs as the server summarized them */
  outputs: any[] | null;
  executionCount: number | null;
  status: string | null;
  /** tool "undo": the edit it reverted */
  undoes: string | null;
  undoable: boolean;
  /** The id of the undo record that reverted this edit (null: not undone). */
  undoneBy: string | null;
}

/** MCP tools of our notebook server, as agents name them (`_meta.toolName`). */
export const NOTEBOOK_TOOL_PREFIX = 'mcp__jupyter__';

/** The MCP tool name an agent gives a call (`_meta.toolName`), "" when none. */
export function toolName(call: any): string {
  return str(call?._meta?.toolName);
}

/** A readable title for a call of a notebook tool, e.g. "Insert a code cell into nb.ipynb". */
export function notebookToolTitle(tool: string, args: Record<string, unknown> | null): string {
  const path = str(args?.path);
  const of = path ? ` of ${path}` : ' of a notebook';
  const cellType = str(args?.cell_type);
  switch (tool) {
    case 'insert_cell':
      return `Insert a ${cellType ? cellType + ' ' : ''}cell into ${path || 'a notebook'}`;
    case 'replace_cell':
      return `Edit a cell${of}`;
    case 'move_cell':
      return `Move a cell${of}`;
    case 'delete_cell':
      return `Delete a cell${of}`;
    case 'create_notebook':
      return `Create ${path || 'a notebook'}`;
    case 'run_cell':
      return `Run a cell${of}`;
    case 'run_code':
      return `Run code in the kernel${of}`;
    case 'read_notebook':
      return `Read ${path || 'a notebook'}`;
    case 'list_notebooks':
      return 'List the notebooks';
    default:
      return `Notebook tool: ${tool}`;
  }
}

export function notebookEdit(d: any): NotebookEdit {
  const strOrNull = (v: unknown): string | null => (typeof v === 'string' ? v : null);
  const numOrNull = (v: unknown): number | null => (typeof v === 'number' && isFinite(v) ? v : null);
  return {
    editId: str(d?.edit_id),
    tool: str(d?.tool),
    path: str(d?.path),
    cellId: strOrNull(d?.cell_id),
    cellType: strOrNull(d?.cell_type),
    index: numOrNull(d?.index),
    before: strOrNull(d?.before),
    after: strOrNull(d?.after),
    outputs: Array.isArray(d?.outputs) ? d.outputs : null,
    executionCount: numOrNull(d?.execution_count),
    status: strOrNull(d?.status),
    undoes: strOrNull(d?.undoes),
    undoable: d?.undoable === true,
    undoneBy: null
  };
}

/**
 * The code a permission prompt shows before its buttons: what a notebook run would execute
 * (server-made, `_meta.jupyterAcp.notebookRun`), or the source a notebook tool would write.
 */
export function permissionCode(call: any): string | null {
  const input = call?.rawInput;
  if (call?._meta?.jupyterAcp?.notebookRun === true) {
    return str(input?.code);
  }
  if (toolName(call).startsWith(NOTEBOOK_TOOL_PREFIX)) {
    const code = input?.code ?? input?.source;
    return typeof code === 'string' ? code : null;
  }
  return null;
}

/** `rawOutput` as text to search for edit ids (only the start of a big one). */
export function outputText(raw: unknown): string {
  if (raw === undefined || raw === null) {
    return '';
  }
  const text = typeof raw === 'string' ? raw : JSON.stringify(raw) ?? '';
  return text.slice(0, 100_000);
}

/**
 * A notebook tool's card whose arguments never came (Qwen's `tool_call` has `rawInput: {}` and
 * the server answers its permission request itself) is titled from the edit it made.
 */
function titled(tool: ToolItem): ToolItem {
  const edit = tool.edits[0];
  if (tool.args || !edit || !tool.toolName.startsWith(NOTEBOOK_TOOL_PREFIX)) {
    return tool;
  }
  const args = { path: edit.path, ...(edit.cellType ? { cell_type: edit.cellType } : {}) };
  return { ...tool, title: notebookToolTitle(tool.toolName.slice(NOTEBOOK_TOOL_PREFIX.length), args) };
}

/** Whether the card's output (text content or rawOutput) names the edit `id`. */
function mentions(tool: ToolItem, id: string): boolean {
  return !!id && (tool.output.includes(id) || tool.content.some(c => c.type === 'text' && c.text.includes(id)));
}

/**
 * Move the edits shown on their own whose id the card at `at` names into that card: the
 * `notebook:edit` event comes before the tool's result, which is what names it.
 */
export function adoptEdits(items: ChatItem[], at: number): ChatItem[] {
  const tool = items[at] as ToolItem;
  const adopted: NotebookEdit[] = [];
  const rest = items.filter(i => {
    if (i.kind === 'notebookEdit' && mentions(tool, i.edit.editId)) {
      adopted.push(i.edit);
      return false;
    }
    return true;
  });
  if (!adopted.length) {
    const card = titled(tool);
    return card === tool ? items : items.map(i => (i === tool ? card : i));
  }
  const known = new Set(tool.edits.map(e => e.editId));
  const card = titled({ ...tool, edits: [...tool.edits, ...adopted.filter(e => !known.has(e.editId))] });
  return rest.map(i => (i === tool ? card : i));
}

/** Apply a `notebook:edit` record: onto the card whose output names it, else as its own item. */
export function applyNotebookEdit(items: ChatItem[], data: any): ChatItem[] {
  const edit = notebookEdit(data);
  if (!edit.editId) {
    return items;
  }
  const undone = edit.tool === 'undo' ? edit.undoes : null;
  const mark = (e: NotebookEdit): NotebookEdit => (undone && e.editId === undone ? { ...e, undoneBy: edit.editId } : e);
  // (only the item holding the undone edit becomes a new object: the others keep their identity)
  let out = undone
    ? items.map(i =>
        i.kind === 'notebookEdit' && i.edit.editId === undone
          ? { ...i, edit: mark(i.edit) }
          : i.kind === 'tool' && i.edits.some(e => e.editId === undone)
            ? { ...i, edits: i.edits.map(mark) }
            : i
      )
    : items;
  const at = out.findIndex(i => i.kind === 'tool' && mentions(i, edit.editId));
  if (at >= 0) {
    const tool = out[at] as ToolItem;
    if (!tool.edits.some(e => e.editId === edit.editId)) {
      out = out.slice();
      out[at] = titled({ ...tool, edits: [...tool.edits, edit] });
    }
    return out;
  }
  return [...out, { kind: 'notebookEdit', key: `edit:${edit.editId}`, edit }];
}


const shortId = (id: string | null): string => (id ? id.slice(0, 8) : '');

/** One line saying what an edit did, e.g. "Inserted code cell 3f2a1b2c into nb.ipynb at 0". */
export function editHeadline(e: NotebookEdit): string {
  const cell = [e.cellType, 'cell', shortId(e.cellId)].filter(Boolean).join(' ');
  const at = e.index !== null ? ` at ${e.index}` : '';
  switch (e.tool) {
    case 'insert_cell':
      return `Inserted ${cell} into ${e.path}${at}`;
    case 'replace_cell':
      return `Edited ${cell} of ${e.path}`;
    case 'move_cell':
      return `Moved ${cell} of ${e.path}${e.index !== null ? ` to ${e.index}` : ''}`;
    case 'delete_cell':
      return `Deleted ${cell} of ${e.path}`;
    case 'create_notebook':
      return `Created ${e.path}`;
    case 'run_cell':
    case 'run_code': {
      const count = e.executionCount !== null ? ` [${e.executionCount}]` : '';
      return `Ran ${e.cellId ? cell : 'code'} of ${e.path}${count}: ${e.status ?? 'done'}`;
    }
    case 'undo':
      return `Undid an edit of ${e.path}${e.cellId ? ` (${cell})` : ''}`;
    default:
      return `${e.tool} ${e.path}`;
  }
}

/** A run's outputs as text: streams and plain text as they are, errors as "ename: evalue". */
export function outputsText(outputs: any[] | null): string {
  const lines: string[] = [];
  for (const o of outputs ?? []) {
    const type = str(o?.type, str(o?.output_type));
    if (type === 'error') {
      lines.push(`${str(o?.ename)}: ${str(o?.evalue)}`);
    } else {
      const text = o?.text ?? o?.data?.['text/plain'];
      const plain = Array.isArray(text) ? text.join('') : str(text);
      const mime = Array.isArray(o?.mime) ? o.mime.join(', ') : '';
      lines.push(plain ? plain.replace(/\n$/, '') : `[${mime || type}]`);
    }
  }
  return lines.join('\n');
}
