// @vitest-environment jsdom
/**
 * Tool-call diffs: real hunks (jsdiff) with line numbers, the untouched middle left out,
 * computed once per texts, and the summary fallback.
 */
import { describe, expect, it } from 'vitest';

import { diffBlock, diffHunks, diffLines, MAX_SHOWN } from '../src/diff';

const twenty = Array.from({ length: 20 }, (_, i) => `line ${i + 1}`).join('\n') + '\n';
const edited = twenty.replace('line 3\n', 'THREE\n').replace('line 17\n', 'SEVENTEEN\n');

describe('diffHunks', () => {
  it('gives two hunks for two separate edits, without the untouched middle', () => {
    const diff = diffHunks(twenty, edited)!;
    expect(diff.hunks.map(h => h.header)).toEqual(['@@ -1,6 +1,6 @@', '@@ -14,7 +14,7 @@']);
    const shown = diff.hunks.flatMap(h => h.lines.map(l => l.text));
    for (const n of [8, 9, 10, 11, 12]) {
      expect(shown).not.toContain(`line ${n}`);
    }
    expect(diff.hunks[0].skippedBefore).toBe(0);
    expect(diff.hunks[1].skippedBefore).toBe(7); // lines 7..13
    expect(diff.skippedAfter).toBe(0);
    expect(diff.hunks[0].lines.filter(l => l.op !== ' ')).toEqual([
      { op: '-', text: 'line 3', oldNo: 3, newNo: null },
      { op: '+', text: 'THREE', oldNo: null, newNo: 3 }
    ]);
    expect(diff.hunks[1].lines[0]).toEqual({ op: ' ', text: 'line 14', oldNo: 14, newNo: 14 });
  });

  it('numbers a new file from 1 and counts unchanged lines after the last hunk', () => {
    const created = diffHunks(null, 'a\nb\n')!;
    expect(created.hunks).toHaveLength(1);
    expect(created.hunks[0].lines).toEqual([
      { op: '+', text: 'a', oldNo: null, newNo: 1 },
      { op: '+', text: 'b', oldNo: null, newNo: 2 }
    ]);
    const early = diffHunks(twenty, twenty.replace('line 2\n', 'TWO\n'))!;
    expect(early.skippedAfter).toBe(20 - 5);
    expect(diffHunks('same\n', 'same\n')).toEqual({ hunks: [], skippedAfter: 1 });
  });
});

describe('diffBlock', () => {
  it('draws hunks with headers, gutters and "unchanged lines" rows', () => {
    const el = diffBlock(twenty, edited);
    const hunks = el.querySelectorAll('.jp-AcpDiff-hunk');
    expect(hunks).toHaveLength(2);
    expect(hunks[0].querySelector('.jp-AcpDiff-hunkHead')!.textContent).toBe('@@ -1,6 +1,6 @@');
    expect([...el.querySelectorAll('.jp-AcpDiff-skip')].map(e => e.textContent)).toEqual(['⋯ 7 unchanged lines']);
    const add = el.querySelector('.jp-AcpDiff-add')!;
    expect(add.textContent).toBe('+ THREE'); // the gutter is drawn by CSS from data attributes
    expect(add.querySelector('.jp-AcpDiff-no')!.getAttribute('data-new')).toBe('3');
    expect(el.textContent).not.toContain('line 10');
  });

  it('computes a diff once and hands out copies', () => {
    const a = diffBlock(twenty, edited);
    const b = diffBlock(twenty, edited);
    expect(a).not.toBe(b);
    expect(a.isEqualNode(b)).toBe(true);
  });

  it('caps what it draws', () => {
    const big = Array.from({ length: MAX_SHOWN + 100 }, (_, i) => `n${i}`).join('\n');
    const el = diffBlock(null, big);
    expect(el.querySelectorAll('.jp-AcpDiff-add')).toHaveLength(MAX_SHOWN);
    expect(el.lastElementChild!.textContent).toBe('⋯ 100 more lines not shown');
  });
});

describe('diffLines (the summary fallback)', () => {
  it('trims the common prefix and suffix', () => {
    expect(diffLines('a\nb\nc\n', 'a\nB\nc\n', 0)).toEqual([
      { op: '…', text: '1 unchanged line' },
      { op: '-', text: 'b' },
      { op: '+', text: 'B' },
      { op: '…', text: '1 unchanged line' }
    ]);
  });
});

describe('a diff too large to compute', () => {
  it('falls back to the summary, quickly', () => {
    const a = Array.from({ length: 5000 }, (_, i) => `a ${i}`).join('\n');
    const b = Array.from({ length: 3000 }, (_, i) => `b ${i}`).join('\n');
    expect(diffHunks(a, b)).toBeNull();
    const el = diffBlock(a, b);
    expect(el.classList.contains('jp-mod-summary')).toBe(true);
    expect(el.querySelectorAll('.jp-AcpDiff-line')).toHaveLength(MAX_SHOWN + 1);
  });
});
