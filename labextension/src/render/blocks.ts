/**
 * Where a streamed Markdown text can be cut into blocks that will never change again.
 *
 * A streaming reply is rendered as sealed blocks (each rendered once) plus a tail (re-rendered as
 * chunks arrive), so the work per chunk depends on the tail, not on the reply's length. A cut is
 * only safe where Markdown cannot join what comes before with what comes after: at the start of a
 * line that follows a blank line outside a code fence or a `$$` block, and that is neither indented
 * nor a list marker (those can continue a list across the blank line). The line after the blank
 * must be complete, since its first characters alone ("1" of "1. item") do not tell.
 *
 * Pure, so that it is unit-tested without a browser.
 */

const FENCE = /^ {0,3}(`{3,}|~{3,})/;
const LIST_OR_INDENT = /^(?:[ \t]|[-*+](?:[ \t]|$)|\d{1,9}[.)](?:[ \t]|$))/;

/**
 * The offsets, after `from`, at which a complete block of `text` ends (each is the start of the
 * next block's first line). `from` must be 0 or an offset this function returned for a prefix of
 * `text`: scanning starts there outside any fence, so the work is the text after `from`.
 */
export function sealPoints(text: string, from = 0): number[] {
  const points: number[] = [];
  let fence: { char: string; len: number } | null = null;
  let math = false;
  let prevBlank = false;
  let pos = from;
  for (;;) {
    const nl = text.indexOf('\n', pos);
    if (nl < 0) {
      break; // the last line is still arriving
    }
    const line = text.slice(pos, nl);
    const trimmed = line.trim();
    const blank = trimmed === '';
    if (!fence && !math && prevBlank && !blank && !LIST_OR_INDENT.test(line)) {
      points.push(pos);
    }
    if (fence) {
      const close = FENCE.exec(line);
      if (close && close[1][0] === fence.char && close[1].length >= fence.len && line.trim() === close[1]) {
        fence = null;
      }
    } else if (math) {
      if (trimmed.endsWith('$$')) {
        math = false;
      }
    } else {
      const open = FENCE.exec(line);
      if (open) {
        fence = { char: open[1][0], len: open[1].length };
      } else if (trimmed.startsWith('$$') && (trimmed.length < 4 || !trimmed.slice(2).includes('$$'))) {
        math = true;
      }
    }
    prevBlank = blank;
    pos = nl + 1;
  }
  return points;
}

/** The end of the last complete block of `text` (`from` when none was completed after it). */
export function sealPoint(text: string, from = 0): number {
  const points = sealPoints(text, from);
  return points.length ? points[points.length - 1] : from;
}

/** `text` cut at its seal points: the sealed blocks, then the tail (possibly empty). */
export function splitBlocks(text: string): { blocks: string[]; tail: string } {
  const blocks: string[] = [];
  let start = 0;
  for (const p of sealPoints(text)) {
    blocks.push(text.slice(start, p));
    start = p;
  }
  return { blocks, tail: text.slice(start) };
}
