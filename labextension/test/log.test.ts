// @vitest-environment jsdom
/**
 * The keyed chat log: new items get a node in place, changed ones are patched in place, gone ones
 * are removed, and nothing else is touched (a selection, an open <details> survive a stream).
 */
import { describe, expect, it, vi } from 'vitest';

// (JupyterLab's icon and clipboard modules do not load in jsdom; the views only need these)
vi.mock('@jupyterlab/ui-components', () => {
  const icon = { element: () => document.createElement('span') };
  return { fileIcon: icon, imageIcon: icon };
});
vi.mock('@jupyterlab/apputils', () => ({ Clipboard: { copyToSystem: () => undefined } }));
vi.mock('@jupyterlab/rendermime', () => ({ renderMarkdown: async () => undefined }));

import { createItemView, ItemContext } from '../src/items';
import { ChatLog, ItemView } from '../src/log';
import { reduce } from '../src/reducer';
import { ChatItem, emptyView, Frame, SessionView } from '../src/view';
import { plainMarkdown } from '../src/render/markdown';

interface Row {
  key: string;
  text: string;
}

function rowLog(host: HTMLElement, settled: string[] = []): ChatLog<Row> {
  return new ChatLog<Row>(host, (row): ItemView<Row> => {
    const node = document.createElement('div');
    node.textContent = row.text;
    return {
      node,
      update: r => {
        node.textContent = r.text;
      },
      settle: () => {
        settled.push(node.textContent ?? '');
      }
    };
  });
}

/** Records every mutation under `host`, by the top-level child it happened in. */
function watch(host: HTMLElement): { touched: () => Set<Node>; stop: () => void } {
  const records: MutationRecord[] = [];
  const observer = new MutationObserver(rs => records.push(...rs));
  observer.observe(host, { childList: true, subtree: true, characterData: true, attributes: true });
  return {
    touched: () => {
      const out = new Set<Node>();
      for (const r of [...records.splice(0), ...observer.takeRecords()]) {
        let n: Node | null = r.target;
        while (n && n.parentNode !== host) {
          n = n.parentNode;
        }
        out.add(n ?? host);
      }
      return out;
    },
    stop: () => observer.disconnect()
  };
}

describe('ChatLog', () => {
  it('inserts, patches in place and removes by key, touching nothing else', () => {
    const host = document.createElement('div');
    const tail = document.createElement('p'); // a row the log does not manage, kept last
    host.append(tail);
    const log = rowLog(host);
    const a = { key: 'a', text: 'A' };
    const b = { key: 'b', text: 'B' };
    const c = { key: 'c', text: 'C' };
    log.update([a, b, c]);
    expect([...host.children].map(n => n.textContent)).toEqual(['A', 'B', 'C', '']);
    const [na, nb, nc] = [log.nodeOf('a')!, log.nodeOf('b')!, log.nodeOf('c')!];

    const w = watch(host);
    const b2 = { key: 'b', text: 'B2' };
    log.update([a, b2, c]);
    expect(w.touched()).toEqual(new Set([nb]));
    expect(log.nodeOf('b')).toBe(nb);

    // a new item between two known ones, and one removed (an edit adopted by its card)
    const x = { key: 'x', text: 'X' };
    log.update([a, x, c]);
    expect([...host.children].map(n => n.textContent)).toEqual(['A', 'X', 'C', '']);
    expect(log.nodeOf('a')).toBe(na);
    expect(log.nodeOf('c')).toBe(nc);
    const touched = w.touched();
    expect(touched.has(na) || touched.has(nc)).toBe(false);
    w.stop();
    expect(log.size).toBe(3);
    log.clear();
    expect([...host.children]).toEqual([tail]);
  });

  it('shows any sequence of lists right, whether only the tail changed or not', () => {
    // (random edits: append, patch the last, patch or insert or remove in the middle; the log
    // takes a shortcut when the earlier items are the same objects, and must agree with the rest)
    const host = document.createElement('div');
    const tail = document.createElement('p');
    host.append(tail);
    const log = rowLog(host);
    let x = 7;
    const rand = (k: number): number => {
      x = (x * 1103515245 + 12345) % 2147483648;
      return x % k;
    };
    let items: Row[] = [];
    let next = 0;
    for (let step = 0; step < 500; step++) {
      const r = rand(10);
      const at = rand(items.length + 1);
      items = items.slice();
      if (r < 3 || !items.length) {
        items.push({ key: `k${next++}`, text: `new${step}` });
      } else if (r < 6) {
        items[items.length - 1] = { ...items[items.length - 1], text: `last${step}` };
      } else if (r < 7 && at < items.length) {
        items[at] = { ...items[at], text: `mid${step}` };
      } else if (r < 8) {
        items.splice(at, 0, { key: `k${next++}`, text: `ins${step}` });
      } else if (at < items.length) {
        items.splice(at, 1);
      }
      log.update(items);
      expect([...host.children].map(n => n.textContent)).toEqual([...items.map(i => i.text), '']);
      expect(items.every(i => log.nodeOf(i.key)?.textContent === i.text)).toBe(true);
      expect(log.size).toBe(items.length);
    }
  });

  it('visits only the changed tail while a reply streams', () => {
    const host = document.createElement('div');
    let made = 0;
    const log = new ChatLog<Row>(host, row => {
      made++;
      const node = document.createElement('div');
      node.textContent = row.text;
      return { node, update: r => void (node.textContent = r.text) };
    });
    const items: Row[] = Array.from({ length: 1000 }, (_, i) => ({ key: `k${i}`, text: `${i}` }));
    log.update(items);
    const host2 = vi.spyOn(host, 'insertBefore');
    const get = vi.spyOn(Map.prototype, 'get');
    log.update([...items.slice(0, -1), { key: 'k999', text: 'more' }]);
    log.update([...items.slice(0, -1), { key: 'k999', text: 'more' }, { key: 'k1000', text: 'new' }]);
    expect(get.mock.calls.length).toBeLessThan(10); // (not one lookup per item)
    get.mockRestore();
    expect(host2).toHaveBeenCalledTimes(1); // the new one only
    expect(made).toBe(1001);
    expect(host.lastChild?.textContent).toBe('new');
  });

  it('settles every item but the streaming last one', () => {
    const host = document.createElement('div');
    const settled: string[] = [];
    const log = rowLog(host, settled);
    log.update([{ key: 'a', text: 'A' }], true);
    expect(settled).toEqual([]);
    log.update([{ key: 'a', text: 'A' }, { key: 'b', text: 'B' }], true);
    expect(settled).toEqual(['A']);
    const items = [{ key: 'a', text: 'A' }, { key: 'b', text: 'B' }];
    log.update(items, false);
    expect(settled.sort()).toEqual(['A', 'A', 'B']); // (a new object for a: patched, settled again)
    log.update(items, false);
    expect(settled).toHaveLength(3);
  });
});

let seq = 0;
const ev = (type: string, data: any): Frame => ({ type, seq: ++seq, data });
const chunk = (text: string): Frame =>
  ev('session/update', { sessionUpdate: 'agent_message_chunk', content: { type: 'text', text } });

describe('ChatLog with the item views', () => {
  const ctx = (view: () => SessionView): ItemContext => ({
    workspace: () => view().workspace,
    connection: () => null,
    terminals: () => view().terminals,
    replaying: () => view().replaying,
    markdown: plainMarkdown(),
    code: null
  });

  it('keeps a selection and an open <details> while a reply streams', async () => {
    seq = 0;
    let view = emptyView();
    const host = document.createElement('div');
    document.body.append(host);
    const log = new ChatLog<ChatItem>(host, item => createItemView(item, ctx(() => view)));
    const apply = (...frames: Frame[]) => {
      for (const f of frames) {
        view = reduce(view, f);
      }
      log.update(view.items, true);
    };
    apply(
      ev('chat:message', { text: 'hello there', turn: 1 }),
      ev('session/update', {
        sessionUpdate: 'tool_call',
        toolCallId: 't1',
        title: 'Write a.txt',
        kind: 'edit',
        status: 'completed',
        content: [{ type: 'diff', path: '/w/a.txt', oldText: 'a\n', newText: 'b\n' }]
      }),
      ev('session/update', { sessionUpdate: 'agent_thought_chunk', content: { type: 'text', text: 'hmm' } })
    );
    const user = host.querySelector('.jp-AcpMsg-user')!;
    const card = host.querySelector('details.jp-AcpTool') as HTMLDetailsElement;
    const thought = host.querySelector('details.jp-AcpMsg-thought') as HTMLDetailsElement;
    expect(card.open).toBe(true); // (made live)
    card.open = false;
    thought.open = true;
    const range = document.createRange();
    range.setStart(user.firstChild!, 0);
    range.setEnd(user.firstChild!, 5);
    document.getSelection()!.removeAllRanges();
    document.getSelection()!.addRange(range);

    apply(chunk('Start: '));
    await new Promise(r => setTimeout(r, 20)); // (the thought, no longer last, is finished)
    const w = watch(host);
    for (let i = 0; i < 200; i++) {
      apply(chunk(i % 20 === 19 ? `word ${i}\n\n` : `word ${i} `));
    }
    await new Promise(r => setTimeout(r, 20)); // (the renders are async)
    const touched = w.touched();
    w.stop();
    const agent = host.querySelector('.jp-AcpMsg-agent')!;
    expect([...touched]).toEqual([agent]);
    expect(document.getSelection()!.toString()).toBe('hello');
    expect(card.open).toBe(false);
    expect(thought.open).toBe(true);
    expect(host.querySelector('.jp-AcpTool')).toBe(card);
    view = reduce(view, ev('chat:response', { stop_reason: 'end_turn', turn: 1 }));
    log.update(view.items, false);
    await new Promise(r => setTimeout(r, 10));
    expect(agent.textContent).toContain('word 199');
    expect(agent.querySelectorAll('.jp-AcpMd-block').length).toBeGreaterThan(5);
    host.remove();
  });

  it('shows a terminal output in its card and removes an adopted edit', () => {
    seq = 0;
    let view = emptyView();
    const host = document.createElement('div');
    const log = new ChatLog<ChatItem>(host, item => createItemView(item, ctx(() => view)));
    const apply = (...frames: Frame[]) => {
      for (const f of frames) {
        view = reduce(view, f);
      }
      log.update(view.items, true);
    };
    apply(
      ev('session/update', {
        sessionUpdate: 'tool_call',
        toolCallId: 'sh',
        title: 'ls',
        kind: 'execute',
        status: 'in_progress',
        content: [{ type: 'terminal', terminalId: 'term1' }]
      })
    );
    const card = host.querySelector('.jp-AcpTool')!;
    expect(card.querySelector('.jp-AcpTool-terminal')!.textContent).toContain('waiting for output');
    apply(ev('terminal:output', { terminal_id: 'term1', output: 'a.txt\n', truncated: false, exit_status: null }));
    apply(
      ev('terminal:output', {
        terminal_id: 'term1',
        output: 'a.txt\nb.txt\n',
        truncated: false,
        exit_status: { exit_code: 0, signal: null }
      })
    );
    expect(host.querySelector('.jp-AcpTool')).toBe(card);
    expect(card.querySelector('pre.jp-AcpTool-terminalOutput')!.textContent).toBe('a.txt\nb.txt\n');
    expect(card.querySelector('.jp-AcpTool-terminalHead')!.textContent).toContain('exit code 0');

    apply(
      ev('session/update', { sessionUpdate: 'tool_call', toolCallId: 'nb', title: 'edit', kind: 'edit' }),
      ev('notebook:edit', { edit_id: 'e1', tool: 'insert_cell', path: 'nb.ipynb', after: 'x', undoable: true })
    );
    expect(host.querySelectorAll('.jp-AcpTool-notebookEdit')).toHaveLength(1);
    apply(ev('session/update', { sessionUpdate: 'tool_call_update', toolCallId: 'nb', rawOutput: { edit_id: 'e1' } }));
    expect(host.querySelectorAll('.jp-AcpTool-notebookEdit')).toHaveLength(0);
    expect(host.querySelectorAll('.jp-AcpNbEdit[data-edit-id="e1"]')).toHaveLength(1);
  });
});
