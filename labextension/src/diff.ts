/**
 * Line diffs for tool-call cards: what an agent's edit changes, as `-` / `+` / context lines.
 *
 * ACP's diff content carries the whole old and new text of a file. A card should show the
 * changed region, not the file, so common leading and trailing lines are trimmed to a little
 * context and the middle is shown as removed then added (good enough for a glance; the file
 * itself is one click away in the file browser).
 */

export interface DiffLine {
  op: ' ' | '-' | '+' | '…';
  text: string;
}

export function diffLines(oldText: string | null, newText: string, context = 2): DiffLine[] {
  // a final newline ends the last line; it is not an empty line of its own
  const lines = (text: string | null): string[] => (text ? text.replace(/\n$/, '').split('\n') : []);
  const a = lines(oldText);
  const b = lines(newText);
  let start = 0;
  while (start < a.length && start < b.length && a[start] === b[start]) {
    start++;
  }
  let endA = a.length;
  let endB = b.length;
  while (endA > start && endB > start && a[endA - 1] === b[endB - 1]) {
    endA--;
    endB--;
  }
  const out: DiffLine[] = [];
  const from = Math.max(0, start - context);
  if (from > 0) {
    out.push({ op: '…', text: `${from} unchanged line${from === 1 ? '' : 's'}` });
  }
  for (let i = from; i < start; i++) {
    out.push({ op: ' ', text: a[i] });
  }
  for (let i = start; i < endA; i++) {
    out.push({ op: '-', text: a[i] });
  }
  for (let i = start; i < endB; i++) {
    out.push({ op: '+', text: b[i] });
  }
  const to = Math.min(a.length, endA + context);
  for (let i = endA; i < to; i++) {
    out.push({ op: ' ', text: a[i] });
  }
  if (a.length > to) {
    const rest = a.length - to;
    out.push({ op: '…', text: `${rest} unchanged line${rest === 1 ? '' : 's'}` });
  }
  return out;
}
