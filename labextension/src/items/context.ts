/**
 * What the views of chat items need from the panel: where the session's workspace is, its
 * connection (to answer a permission), the terminals' output, the Markdown renderer, the code
 * toolbar's actions and the notebook edits' undo. Read through functions, so that a view made
 * once always sees the panel's current state.
 */

import type { SessionConnection } from '../connection';
import type { TerminalState } from '../view';
import type { CodeActions } from '../render/codeActions';
import type { MarkdownRenderer } from '../render/markdown';

/** What a notebook edit's Undo button needs from the panel (its state lives there, not in the view). */
export interface EditActions {
  undo(editId: string): void;
  /** The undo asked for `editId`: under way, failed (the server's sentence) or done; undefined: none. */
  undoState(editId: string): { busy: boolean; error: string | null } | undefined;
}

export interface ItemContext {
  workspace(): string;
  connection(): SessionConnection | null;
  terminals(): Record<string, TerminalState>;
  /** True while the session's history is replayed (cards made then start closed). */
  replaying(): boolean;
  markdown: MarkdownRenderer;
  code: CodeActions | null;
  edits?: EditActions;
  /** A view's content changed after its update (an async render landed): follow the log down. */
  rendered?(): void;
}
