/**
 * Line diffs for tool-call cards: what an agent's edit changes, as hunks with line numbers.
 *
 * ACP's diff content carries the whole old and new text of a file. A card shows the changed
 * regions, not the file: jsdiff's `structuredPatch` (Myers' diff, 3 lines of context) gives the
 * hunks, each drawn with its `@@ -a,b +c,d @@` header and old/new line numbers, with
 * "⋯ N unchanged lines" rows for what lies between and around them. So two separate edits show
 * as two hunks, and the untouched middle is not shown as changed.
 *
 * Diffs are computed once per (old text, new text): a card redrawn while a reply streams must
 * not diff again. A diff too large to compute quickly (an edit distance over `MAX_EDIT`, over
 * `MAX_MS`, or huge files) falls back to the prefix/suffix summary of `diffLines`, and at most
 * `MAX_SHOWN` lines are drawn (the file itself is one click away in the file browser).
 */

import { structuredPatch } from 'diff';

import { h } from './dom';

/** One row of the prefix/suffix summary (the fallback): context, removed, added or skipped. */
export interface DiffLine {
  op: ' ' | '-' | '+' | '…';
  text: string;
}

/** One line of a hunk, with its number in the old file and in the new one (null: not there). */
export interface HunkLine {
  op: ' ' | '-' | '+';
  text: string;
  oldNo: number | null;
  newNo: number | null;
}

export interface Hunk {
  /** `@@ -oldStart,oldLines +newStart,newLines @@` */
  header: string;
  /** Unchanged lines between the previous hunk (or the file's start) and this one. */
  skippedBefore: number;
  lines: HunkLine[];
}

export interface Hunks {
  hunks: Hunk[];
  /** Unchanged lines after the last hunk (all of the file's lines when nothing changed). */
  skippedAfter: number;
}

/** Above this edit distance, or after this long (ms), jsdiff gives up (and the summary is
 * shown): a whole-file rewrite of thousands of lines would otherwise take seconds. */
const MAX_EDIT = 2000;
const MAX_MS = 100;
/** Files longer than this (in lines, old + new) are not diffed at all. */
const MAX_LINES = 50_000;
/** At most this many lines of a diff are drawn. */
export const MAX_SHOWN = 500;

const plural = (n: number, what: string): string => `${n} ${what}${n === 1 ? '' : 's'}`;

/** A text's lines: a final newline ends the last line, it is not an empty line of its own. */
function lines(text: string | null): string[] {
  return text ? text.replace(/\n$/, '').split('\n') : [];
}

/**
 * The prefix/suffix summary: common leading and trailing lines trimmed to `context`, the
 * middle shown as removed then added. Cheap and bounded; the fallback for huge diffs.
 */
export function diffLines(oldText: string | null, newText: string, context = 2): DiffLine[] {
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
    out.push({ op: '…', text: plural(from, 'unchanged line') });
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
    out.push({ op: '…', text: plural(a.length - to, 'unchanged line') });
  }
  return out;
}

/**
 * The hunks of the change from `oldText` (null: a new file) to `newText`, or null when the
 * diff is too large to compute (see `diffLines`).
 */
export function diffHunks(oldText: string | null, newText: string, context = 3): Hunks | null {
  const oldCount = lines(oldText).length;
  if (oldCount + lines(newText).length > MAX_LINES) {
    return null;
  }
  const patch = structuredPatch('a', 'b', oldText ?? '', newText, undefined, undefined, {
    context,
    maxEditLength: MAX_EDIT,
    timeout: MAX_MS
  });
  if (!patch) {
    return null;
  }
  const hunks: Hunk[] = [];
  let oldEnd = 0; // the last old line shown so far (1-based)
  for (const hunk of patch.hunks) {
    let oldNo = hunk.oldStart;
    let newNo = hunk.newStart;
    // an empty side starts "at line 0" in a unified diff: its first line is 1
    if (hunk.oldLines === 0) {
      oldNo++;
    }
    if (hunk.newLines === 0) {
      newNo++;
    }
    const out: HunkLine[] = [];
    for (const line of hunk.lines) {
      const op = line[0];
      const text = line.slice(1);
      if (op === ' ') {
        out.push({ op, text, oldNo: oldNo++, newNo: newNo++ });
      } else if (op === '-') {
        out.push({ op, text, oldNo: oldNo++, newNo: null });
      } else if (op === '+') {
        out.push({ op, text, oldNo: null, newNo: newNo++ });
      } // ('\ No newline at end of file': not a line of either file)
    }
    const first = hunk.oldLines === 0 ? hunk.oldStart + 1 : hunk.oldStart;
    hunks.push({
      header: `@@ -${hunk.oldStart},${hunk.oldLines} +${hunk.newStart},${hunk.newLines} @@`,
      skippedBefore: Math.max(0, first - 1 - oldEnd),
      lines: out
    });
    oldEnd = Math.max(oldEnd, oldNo - 1);
  }
  return { hunks, skippedAfter: Math.max(0, oldCount - oldEnd) };
}

function skipRow(text: string): HTMLElement {
  return h('div', { className: 'jp-AcpDiff-line jp-AcpDiff-skip' }, `⋯ ${text}`);
}

const OP_CLASS = { ' ': 'ctx', '-': 'del', '+': 'add', '…': 'skip' } as const;

/** A diff line's row: the line numbers are drawn by CSS from data attributes, so that the
 * row's text (what a copy takes) is the line itself. */
function lineRow(l: HunkLine): HTMLElement {
  return h(
    'div',
    { className: `jp-AcpDiff-line jp-AcpDiff-${OP_CLASS[l.op]}` },
    h('span', {
      className: 'jp-AcpDiff-no',
      'data-old': l.oldNo === null ? '' : String(l.oldNo),
      'data-new': l.newNo === null ? '' : String(l.newNo),
      'aria-hidden': 'true'
    }),
    `${l.op} ${l.text}`
  );
}

function build(oldText: string | null, newText: string): HTMLElement {
  const pre = h('pre', { className: 'jp-AcpDiff-body' });
  const diff = diffHunks(oldText, newText);
  let budget = MAX_SHOWN;
  let hidden = 0;
  if (diff === null) {
    pre.classList.add('jp-mod-summary');
    for (const l of diffLines(oldText, newText)) {
      if (budget-- > 0) {
        pre.append(
          l.op === '…'
            ? skipRow(l.text)
            : h('div', { className: `jp-AcpDiff-line jp-AcpDiff-${OP_CLASS[l.op]}` }, `${l.op} ${l.text}`)
        );
      } else {
        hidden++;
      }
    }
  } else {
    for (const hunk of diff.hunks) {
      if (budget <= 0) {
        hidden += hunk.lines.length;
        continue;
      }
      if (hunk.skippedBefore > 0) {
        pre.append(skipRow(plural(hunk.skippedBefore, 'unchanged line')));
      }
      const block = h('div', { className: 'jp-AcpDiff-hunk' }, h('div', { className: 'jp-AcpDiff-hunkHead' }, hunk.header));
      for (const l of hunk.lines) {
        if (budget-- > 0) {
          block.append(lineRow(l));
        } else {
          hidden++;
        }
      }
      pre.append(block);
    }
    if (diff.skippedAfter > 0 && hidden === 0) {
      pre.append(skipRow(plural(diff.skippedAfter, 'unchanged line')));
    }
  }
  if (hidden > 0) {
    pre.append(skipRow(`${plural(hidden, 'more line')} not shown`));
  }
  return pre;
}

/** Built diffs by old text, then new text (strings hash once in V8: a lookup is cheap). */
const cache = new Map<string | null, Map<string, HTMLElement>>();
let cached = 0;
const CACHE_SIZE = 1000;

/**
 * A diff as a `<pre class="jp-AcpDiff-body">`: hunks (`.jp-AcpDiff-hunk`, a
 * `.jp-AcpDiff-hunkHead` header, then `.jp-AcpDiff-line` rows `.jp-AcpDiff-{ctx,del,add}` whose
 * text is "OP LINE", with a `.jp-AcpDiff-no` gutter carrying `data-old` / `data-new`) and
 * `.jp-AcpDiff-skip` rows. Computed once per texts; each call returns a fresh copy to insert.
 */
export function diffBlock(oldText: string | null, newText: string): HTMLElement {
  let byNew = cache.get(oldText);
  let el = byNew?.get(newText);
  if (!el) {
    el = build(oldText, newText);
    if (cached >= CACHE_SIZE) {
      cache.clear();
      cached = 0;
    }
    if (!byNew) {
      byNew = new Map();
      cache.set(oldText, byNew);
    }
    byNew.set(newText, el);
    cached++;
  }
  return el.cloneNode(true) as HTMLElement;
}
