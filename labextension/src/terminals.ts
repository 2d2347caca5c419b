/**
 * Terminal output in the chat (event `terminal:output`, docs/api.md): the reducer keeps each
 * terminal's latest output on the view, and the tool cards that show a terminal are re-emitted
 * (a new object, same key) so the log redraws just those.
 */

import type { ChatItem, SessionView } from './view';
import { str } from './notebookEdits';

/** A terminal's latest output (event `terminal:output`): the whole kept output, replaced each time. */
export interface TerminalState {
  output: string;
  truncated: boolean;
  exitStatus: { exitCode: number | null; signal: string | null } | null;
}

/**
 * A terminal's latest output (`terminal:output` carries all of it so far): keep it on the view
 * and give every tool card showing that terminal a new object, so the log redraws just those.
 * An unknown terminal's output is kept for a card that names it later.
 */
export function applyTerminalOutput(view: SessionView, data: any): SessionView {
  const id = str(data?.terminal_id);
  if (!id) {
    return view;
  }
  const exit = data?.exit_status;
  const state: TerminalState = {
    output: str(data?.output),
    truncated: data?.truncated === true,
    exitStatus:
      exit && typeof exit === 'object'
        ? {
            exitCode: typeof exit.exit_code === 'number' ? exit.exit_code : null,
            signal: typeof exit.signal === 'string' ? exit.signal : null
          }
        : null
  };
  const shows = (i: ChatItem): boolean =>
    i.kind === 'tool' && i.content.some(c => c.type === 'terminal' && c.terminalId === id);
  return {
    ...view,
    terminals: { ...view.terminals, [id]: state },
    items: view.items.some(shows) ? view.items.map(i => (shows(i) ? { ...i } : i)) : view.items
  };
}
