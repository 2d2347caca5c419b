// @vitest-environment jsdom
/**
 * The pure rendering helpers: the code blocks' toolbar and the "send selection" prompt.
 */
import { describe, expect, it, vi } from 'vitest';

vi.mock('@jupyterlab/apputils', () => ({ Clipboard: { copyToSystem: () => undefined } }));

import { addCodeToolbars, CodeActions, codeOf } from '../src/render/codeActions';
import { formatSelection } from '../src/prompt';

function fakeActions(notebook: boolean): CodeActions & { calls: string[] } {
  const calls: string[] = [];
  return {
    calls,
    copy: async code => {
      calls.push(`copy ${code}`);
    },
    unavailable: () => (notebook ? null : 'Open a notebook to use this'),
    insert: (code, where) => calls.push(`insert ${where} ${code}`),
    replace: code => calls.push(`replace ${code}`)
  };
}

function rendered(): HTMLElement {
  const host = document.createElement('div');
  // (as the highlighter leaves it: spans inside code, a final newline)
  host.innerHTML =
    '<p>Run:</p><pre><code class="language-python"><span class="tok-keyword">import</span> os\nprint(1)\n</code></pre><p>done</p>';
  return host;
}

describe('code block toolbar', () => {
  it('offers Copy, Insert above / below and Replace active cell on each code block, once', async () => {
    const host = rendered();
    const actions = fakeActions(true);
    addCodeToolbars(host, actions);
    addCodeToolbars(host, actions);
    const bars = host.querySelectorAll('.jp-AcpCode-toolbar');
    expect(bars).toHaveLength(1);
    expect(bars[0].previousElementSibling!.tagName).toBe('PRE');
    const buttons = [...bars[0].querySelectorAll('button')];
    expect(buttons.map(b => b.textContent)).toEqual(['Copy', 'Insert above', 'Insert below', 'Replace active cell']);
    expect(buttons.every(b => !b.disabled)).toBe(true);
    for (const b of buttons) {
      b.click();
    }
    await Promise.resolve();
    expect(actions.calls).toEqual([
      'copy import os\nprint(1)',
      'insert above import os\nprint(1)',
      'insert below import os\nprint(1)',
      'replace import os\nprint(1)'
    ]);
  });

  it('disables the notebook buttons, saying why, when no notebook is open', () => {
    const host = rendered();
    addCodeToolbars(host, fakeActions(false));
    const [copy, ...notebook] = [...host.querySelectorAll('.jp-AcpCode-toolbar button')] as HTMLButtonElement[];
    expect(copy.disabled).toBe(false);
    expect(notebook.map(b => [b.disabled, b.title])).toEqual([
      [true, 'Open a notebook to use this'],
      [true, 'Open a notebook to use this'],
      [true, 'Open a notebook to use this']
    ]);
  });

  it('takes the code without its final newline', () => {
    const pre = document.createElement('pre');
    pre.textContent = 'x = 1\n';
    expect(codeOf(pre)).toBe('x = 1');
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
