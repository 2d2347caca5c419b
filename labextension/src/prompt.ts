/**
 * What "Send selection / cell to agent" sends: the selected text of the active notebook cell or
 * editor (the whole cell or file when nothing is selected), fenced and labelled with where it
 * comes from so the agent knows which file it is looking at.
 */

import type { CodeEditor } from '@jupyterlab/codeeditor';
import type { IEditorTracker } from '@jupyterlab/fileeditor';
import type { INotebookTracker } from '@jupyterlab/notebook';
import type { Widget } from '@lumino/widgets';

/** The prompt for `text` taken from `path` (pure; unit-tested). */
export function formatSelection(text: string, path: string, language: string, what: string): string {
  const fence = text.includes('```') ? '~~~' : '```';
  return `Here is ${what} of \`${path}\`:\n\n${fence}${language}\n${text.replace(/\n$/, '')}\n${fence}\n`;
}

/** The selected text of `editor`, or null when the selection is empty. */
function selectedText(editor: CodeEditor.IEditor | null | undefined): string | null {
  if (!editor) {
    return null;
  }
  const range = editor.getSelection();
  const start = editor.getOffsetAt(range.start);
  const end = editor.getOffsetAt(range.end);
  if (start === end) {
    return null;
  }
  return editor.model.sharedModel.getSource().slice(Math.min(start, end), Math.max(start, end));
}

/** The prompt for the current widget, or null when it is neither a notebook nor an editor. */
export function selectionPrompt(
  current: Widget | null,
  notebooks: INotebookTracker | null,
  editors: IEditorTracker | null
): string | null {
  const notebook = notebooks?.currentWidget;
  if (notebook && current === notebook) {
    const cell = notebook.content.activeCell;
    if (!cell) {
      return null;
    }
    const selected = selectedText(cell.editor);
    const source = selected ?? cell.model.sharedModel.getSource();
    if (!source.trim()) {
      return null;
    }
    const index = notebook.content.activeCellIndex + 1;
    const language = cell.model.type === 'code' ? 'python' : 'markdown';
    const what = selected ? `a selection from cell ${index}` : `cell ${index}`;
    return formatSelection(source, notebook.context.path, language, what);
  }
  const editor = editors?.currentWidget;
  if (editor && current === editor) {
    const ed = editor.content.editor;
    const selected = selectedText(ed);
    const source = selected ?? ed.model.sharedModel.getSource();
    if (!source.trim()) {
      return null;
    }
    const ext = editor.context.path.split('.').pop() ?? '';
    return formatSelection(source, editor.context.path, /^[\w+-]+$/.test(ext) ? ext : '',
      selected ? 'a selection' : 'the content');
  }
  return null;
}
