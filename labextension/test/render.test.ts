/**
 * The pure rendering helpers: safe Markdown, tool-call diffs, and the "send selection" prompt.
 */
import { describe, expect, it } from 'vitest';

import { diffLines } from '../src/diff';
import { escapeHtml, renderMarkdown } from '../src/markdown';
import { formatSelection } from '../src/prompt';

describe('renderMarkdown', () => {
  it('renders the common constructs', () => {
    expect(renderMarkdown('Hello **world**, `x < y` and *this*')).toBe(
      '<p>Hello <strong>world</strong>, <code>x &lt; y</code> and <em>this</em></p>'
    );
    expect(renderMarkdown('# Title\n\n- a\n- b\n\n1. one')).toBe(
      '<h3>Title</h3><ul><li>a</li><li>b</li></ul><ol><li>one</li></ol>'
    );
    expect(renderMarkdown('```python\nprint("<hi>")\n```')).toBe(
      '<pre data-lang="python"><code>print(&quot;&lt;hi&gt;&quot;)</code></pre>'
    );
  });

  it('never lets HTML from the agent through', () => {
    const html = renderMarkdown('<img src=x onerror=alert(1)> <script>alert(2)</script> **<b>x</b>**');
    expect(html).not.toMatch(/<img|<script|<b>/);
    expect(html).toContain('&lt;img src=x onerror=alert(1)&gt;');
  });

  it('links only http(s) and mailto targets', () => {
    expect(renderMarkdown('[docs](https://example.org/a?b=1&c=2)')).toBe(
      '<p><a href="https://example.org/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer">docs</a></p>'
    );
    expect(renderMarkdown('[bad](javascript:alert(1))')).not.toContain('<a ');
  });

  it('shows a code fence still being streamed as an open code block', () => {
    expect(renderMarkdown('Here:\n```\nline 1')).toBe('<p>Here:</p><pre><code>line 1</code></pre>');
  });

  it('keeps code spans literal', () => {
    expect(renderMarkdown('`**not bold**`')).toBe('<p><code>**not bold**</code></p>');
    expect(escapeHtml(`"'&`)).toBe('&quot;&#39;&amp;');
  });
});

describe('diffLines', () => {
  it('shows a new file as added lines', () => {
    expect(diffLines(null, 'a\nb')).toEqual([
      { op: '+', text: 'a' },
      { op: '+', text: 'b' }
    ]);
  });

  it('trims the unchanged part to a little context', () => {
    const old = ['1', '2', '3', '4', '5', '6', '7'].join('\n');
    const next = ['1', '2', '3', 'four', '5', '6', '7'].join('\n');
    expect(diffLines(old, next, 1)).toEqual([
      { op: '…', text: '2 unchanged lines' },
      { op: ' ', text: '3' },
      { op: '-', text: '4' },
      { op: '+', text: 'four' },
      { op: ' ', text: '5' },
      { op: '…', text: '2 unchanged lines' }
    ]);
  });

  it('does not show the final newline as an empty line', () => {
    expect(diffLines('', 'hi\n')).toEqual([{ op: '+', text: 'hi' }]);
    expect(diffLines('a\n', 'b\n')).toEqual([
      { op: '-', text: 'a' },
      { op: '+', text: 'b' }
    ]);
  });

  it('is empty when nothing changed', () => {
    expect(diffLines('same', 'same', 0)).toEqual([{ op: '…', text: '1 unchanged line' }]);
  });
});

describe('formatSelection', () => {
  it('fences the text and says where it comes from', () => {
    expect(formatSelection('x = 1\n', 'nb.ipynb', 'python', 'cell 2')).toBe(
      'Here is cell 2 of `nb.ipynb`:\n\n```python\nx = 1\n```\n'
    );
  });

  it('uses another fence when the text has one', () => {
    expect(formatSelection('```\ncode\n```', 'README.md', 'md', 'the content')).toContain('~~~md\n```\ncode\n```\n~~~');
  });
});
