// @vitest-environment jsdom
/**
 * Streaming Markdown: where a growing text can be cut into blocks that never change again, and
 * the renderer that shows sealed blocks once and re-renders only the tail.
 */
import { describe, expect, it } from 'vitest';

import { sealPoint, sealPoints, splitBlocks } from '../src/render/blocks';
import { MarkdownRenderer } from '../src/render/markdown';
import { StreamingMarkdown } from '../src/render/streaming';

describe('sealPoints', () => {
  it('cuts after a blank line before a complete, unindented line', () => {
    const text = 'Para one\nstill one\n\nPara two\n\nPara three\n';
    expect(splitBlocks(text)).toEqual({ blocks: ['Para one\nstill one\n\n', 'Para two\n\n'], tail: 'Para three\n' });
    expect(splitBlocks('Para one\n\nPara tw')).toEqual({ blocks: [], tail: 'Para one\n\nPara tw' });
    // the line after the blank must be complete: "1" could still become "1. item"
    expect(sealPoints('a\n\n1')).toEqual([]);
    expect(sealPoints('a\n\n1. item\n')).toEqual([]);
  });

  it('never cuts inside a code fence, even at blank lines', () => {
    const text = 'Intro\n\n```python\nx = 1\n\n\ny = 2\n```\n\nAfter\n';
    const { blocks, tail } = splitBlocks(text);
    expect(blocks).toEqual(['Intro\n\n', '```python\nx = 1\n\n\ny = 2\n```\n\n']);
    expect(tail).toBe('After\n');
    // an unclosed fence keeps everything after it in the tail
    expect(sealPoint('Intro\n\n~~~\na\n\nb\n')).toBe(7);
    // a longer closing fence closes; a shorter one or another char does not
    expect(sealPoints('````\n```\n\nx\n````\n\ny\n')).toEqual([18]);
  });

  it('never cuts inside a $$ block', () => {
    const text = 'Sum:\n\n$$\n\\int_0^1 x\n\ndx\n$$\n\nDone\n';
    expect(splitBlocks(text).blocks).toEqual(['Sum:\n\n', '$$\n\\int_0^1 x\n\ndx\n$$\n\n']);
    expect(sealPoints('a\n\n$$x$$\n\nb\n')).toEqual([3, 10]);
  });

  it('keeps loose lists and indented continuations together', () => {
    expect(sealPoints('- a\n\n- b\n\n  more of b\n\n* c\n+ d\n\n2) e\n')).toEqual([]);
    expect(sealPoints('- a\n\n- b\n\nText\n')).toEqual([10]);
    expect(sealPoints('code:\n\n    indented\n')).toEqual([]);
  });

  it('scans from an earlier seal point only', () => {
    const text = 'a\n\nb\n\nc\n\nd';
    const first = sealPoint(text.slice(0, 5));
    expect(first).toBe(3);
    expect(sealPoints(text, first)).toEqual([6]); // ("d" may still grow)
    expect(sealPoints(text + '\n', first)).toEqual([6, 9]);
  });
});

/** A renderer that shows the source as text and records what it rendered; each render waits a turn. */
function fakeRenderer(): MarkdownRenderer & { rendered: string[]; typeset_: string[] } {
  const rendered: string[] = [];
  const typeset_: string[] = [];
  return {
    rendered,
    typeset_,
    async render(source: string): Promise<HTMLElement> {
      rendered.push(source);
      await new Promise(r => setTimeout(r, 1));
      const div = document.createElement('div');
      const p = document.createElement('p');
      p.textContent = source;
      div.append(p);
      return div;
    },
    typeset(host: HTMLElement): void {
      typeset_.push(host.textContent ?? '');
    }
  };
}

describe('StreamingMarkdown', () => {
  it('renders each sealed block once and only the tail again', async () => {
    const r = fakeRenderer();
    const md = new StreamingMarkdown(r);
    document.body.append(md.node);
    let text = '';
    for (const chunk of ['First para', 'graph\n\nSec', 'ond\n\nThird', ' one']) {
      text += chunk;
      md.set(text);
      await md.idle();
    }
    const blocks = () => [...md.node.querySelectorAll('.jp-AcpMd-block')].map(b => b.textContent);
    expect(blocks()).toEqual(['First paragraph\n\n']);
    expect(md.node.querySelector('.jp-AcpMd-tail')!.textContent).toBe('Second\n\nThird one');
    // the first block's node is the same from its render on
    const first = md.node.querySelector('.jp-AcpMd-block')!;
    md.set(text + '\n\nFourth\n');
    await md.idle();
    expect(md.node.querySelector('.jp-AcpMd-block')).toBe(first);
    expect(blocks()).toEqual(['First paragraph\n\n', 'Second\n\n', 'Third one\n\n']);
    expect(r.rendered.filter(s => s === 'First paragraph\n\n')).toHaveLength(1);
    expect(r.rendered.filter(s => s === 'Second\n\n')).toHaveLength(1);
    // final: the tail is sealed too
    md.set(text + '\n\nFourth\n', true);
    await md.idle();
    expect([...md.node.querySelectorAll('.jp-AcpMd-block')].map(b => b.textContent)).toEqual([
      'First paragraph\n\n',
      'Second\n\n',
      'Third one\n\n',
      'Fourth\n'
    ]);
    expect(md.node.querySelector('.jp-AcpMd-tail')!.textContent).toBe('');
    expect(r.typeset_).toContain('Fourth\n');
    md.node.remove();
  });

  it('renders the latest text when chunks come faster than renders, in order', async () => {
    const r = fakeRenderer();
    const md = new StreamingMarkdown(r);
    let text = '';
    for (let i = 0; i < 50; i++) {
      text += `w${i} `;
      md.set(text);
    }
    await md.idle();
    expect(md.node.textContent).toBe(text);
    expect(r.rendered.length).toBeLessThan(5); // (coalesced, not one render per chunk)
  });

  it('renders a final text with link references once more, in one piece', async () => {
    const r = fakeRenderer();
    const md = new StreamingMarkdown(r);
    const text = 'See [the docs][d].\n\nMore text.\n\n[d]: https://example.org\n';
    md.set(text);
    await md.idle();
    md.set(text, true);
    await md.idle();
    expect(md.node.querySelectorAll('.jp-AcpMd-block')).toHaveLength(1);
    expect(md.node.textContent).toBe(text);
    expect(r.rendered).toContain(text);
  });

  it('starts over when the text is replaced rather than extended', async () => {
    const md = new StreamingMarkdown(fakeRenderer());
    md.set('Old block\n\nold tail');
    await md.idle();
    md.set('New text');
    await md.idle();
    expect(md.node.textContent).toBe('New text');
    expect(md.node.querySelectorAll('.jp-AcpMd-block')).toHaveLength(0);
  });
});
