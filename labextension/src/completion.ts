/**
 * What the composer completes, as pure functions (unit-tested without a browser):
 *
 * - a slash command: "/" at the very start of the input, the caret still in that first word;
 *   the choices are the session's `available_commands`, sent back as plain text "/name args";
 * - a file mention: "@" at the start or after whitespace; the choices are workspace paths from
 *   `GET sessions/ID/files?prefix=`. A path with whitespace is written `@"a b.txt"`, as the
 *   server reads it. A directory keeps the completion open so one can walk down into it.
 */

import { Command } from './view';

export interface CompletionQuery {
  kind: 'command' | 'file';
  /** What was typed after "/" or "@" (without an opening quote). */
  query: string;
  /** The range of the input the choice replaces. */
  start: number;
  end: number;
}

export interface Choice {
  /** What the list shows, and what is inserted (a command's name, a path). */
  value: string;
  detail: string;
}

/** The completion the caret is in, or null. */
export function completionAt(text: string, caret: number): CompletionQuery | null {
  const before = text.slice(0, caret);
  // the rest of the word under the caret is replaced too
  const after = /^\S*/.exec(text.slice(caret))![0];
  const command = /^\/(\S*)$/.exec(before);
  if (command) {
    return { kind: 'command', query: command[1], start: 0, end: caret + after.length };
  }
  const quoted = /(^|\s)@"([^"\n]*)$/.exec(before);
  if (quoted) {
    const start = quoted.index + quoted[1].length;
    const rest = /^[^"\n]*"?/.exec(text.slice(caret))![0];
    return { kind: 'file', query: quoted[2], start, end: caret + rest.length };
  }
  const mention = /(^|\s)@([^\s"@]*)$/.exec(before);
  if (mention) {
    const start = mention.index + mention[1].length;
    return { kind: 'file', query: mention[2], start, end: caret + after.length };
  }
  return null;
}

/** The commands matching `query`: name prefix first, then the others containing it. */
export function matchCommands(commands: Command[], query: string): Choice[] {
  const q = query.toLowerCase();
  const starts = commands.filter(c => c.name.toLowerCase().startsWith(q));
  const contains = commands.filter(c => !c.name.toLowerCase().startsWith(q) && c.name.toLowerCase().includes(q));
  return [...starts, ...contains].map(c => ({
    value: c.name,
    detail: [c.description, c.hint ? `(${c.hint})` : ''].filter(Boolean).join(' ')
  }));
}

/** How a path is written in a message: `@path`, or `@"a b.txt"` when it has whitespace. */
export function mentionText(path: string, open = false): string {
  if (!/[\s"]/.test(path)) {
    return `@${path}`;
  }
  return open ? `@"${path}` : `@"${path}"`;
}

/**
 * Put `choice` in place of the query: the new text and where the caret goes. A command or a
 * file is followed by a space; a directory is not (its completion continues).
 */
export function applyChoice(text: string, q: CompletionQuery, choice: string): { text: string; caret: number } {
  let insert: string;
  if (q.kind === 'command') {
    insert = `/${choice} `;
  } else if (choice.endsWith('/')) {
    insert = mentionText(choice, true);
  } else {
    insert = mentionText(choice) + ' ';
  }
  const tail = text.slice(q.end);
  const joined = insert.endsWith(' ') && tail.startsWith(' ') ? insert.slice(0, -1) : insert;
  return { text: text.slice(0, q.start) + joined + tail, caret: q.start + insert.length };
}
