/**
 * One chat item (reducer.ts's ChatItem) as DOM: messages, tool-call cards with diffs, plans,
 * permission prompts, turn footers. A user message shows what the server attached to it (the
 * files its `@path` mentions named, images) as chips.
 */

import { fileIcon, imageIcon } from '@jupyterlab/ui-components';

import { SessionConnection } from './connection';
import { diffLines } from './diff';
import { displayPath, formatBytes, h } from './dom';
import { renderMarkdown } from './markdown';
import { Attachment, ChatItem, formatTokens } from './reducer';

const STATUS_LABEL: Record<string, string> = {
  pending: 'pending',
  in_progress: 'running',
  completed: 'done',
  failed: 'failed'
};

/** The chips under a user message: one per attachment, with its kind and size. */
export function attachmentChips(attachments: Attachment[]): HTMLElement {
  return h(
    'div',
    { className: 'jp-AcpChips' },
    ...attachments.map(a =>
      h(
        'span',
        {
          className: `jp-AcpChip jp-AcpChip-${a.type}`,
          title: [a.uri ?? a.name, a.mime_type, formatBytes(a.size)].filter(Boolean).join(' · ')
        },
        (a.type === 'image' ? imageIcon : fileIcon).element({ tag: 'span', className: 'jp-AcpChip-icon' }),
        a.name,
        h('span', { className: 'jp-AcpChip-size' }, ` ${formatBytes(a.size)}`)
      )
    )
  );
}

export function drawItem(item: ChatItem, workspace: string, conn: SessionConnection | null): HTMLElement {
  switch (item.kind) {
    case 'user':
      return h(
        'div',
        { className: 'jp-AcpMsg jp-AcpMsg-user' },
        item.text,
        item.attachments?.length ? attachmentChips(item.attachments) : null
      );
    case 'agent': {
      const el = h('div', { className: 'jp-AcpMsg jp-AcpMsg-agent jp-RenderedHTMLCommon' });
      el.innerHTML = renderMarkdown(item.text); // escaped by construction (markdown.ts)
      return el;
    }
    case 'thought':
      return h(
        'details',
        { className: 'jp-AcpMsg jp-AcpMsg-thought' },
        h('summary', {}, 'Thinking'),
        item.text
      );
    case 'tool':
      return h(
        'div',
        { className: `jp-AcpTool jp-AcpTool-${item.status}` },
        h(
          'div',
          { className: 'jp-AcpTool-head' },
          h('span', { className: 'jp-AcpTool-kind' }, item.toolKind),
          h('span', { className: 'jp-AcpTool-title' }, item.title),
          h('span', { className: 'jp-AcpTool-status' }, STATUS_LABEL[item.status] ?? item.status)
        ),
        ...(() => {
          // a location that is also a diff's path is shown once, above its diff
          const shown = new Set(item.content.map(c => (c.type === 'diff' ? c.path : '')));
          const where = item.locations.filter(l => !shown.has(l)).map(l => displayPath(l, workspace));
          return where.length ? [h('div', { className: 'jp-AcpTool-where' }, where.join(', '))] : [];
        })(),
        ...item.content.map(c => {
          if (c.type === 'diff') {
            return h(
              'div',
              { className: 'jp-AcpDiff' },
              h('div', { className: 'jp-AcpDiff-path' }, displayPath(c.path, workspace)),
              h(
                'pre',
                {},
                ...diffLines(c.oldText, c.newText).map(l =>
                  h('div', { className: `jp-AcpDiff-line jp-AcpDiff-${l.op === '…' ? 'skip' : l.op === '+' ? 'add' : l.op === '-' ? 'del' : 'ctx'}` },
                    `${l.op} ${l.text}`)
                )
              )
            );
          }
          if (c.type === 'text') {
            return h('pre', { className: 'jp-AcpTool-output' }, c.text);
          }
          return h('div', { className: 'jp-AcpTool-output' }, `terminal ${c.terminalId}`);
        })
      );
    case 'plan':
      return h(
        'div',
        { className: 'jp-AcpPlan' },
        h('div', { className: 'jp-AcpPlan-head' }, 'Plan'),
        h(
          'ol',
          {},
          ...item.entries.map(e =>
            h('li', { className: `jp-AcpPlan-${e.status}`, title: `${e.priority} priority` }, e.content)
          )
        )
      );
    case 'permission': {
      const resolved = item.resolved;
      let footer: HTMLElement;
      if (resolved) {
        const chosen = item.options.find(o => o.optionId === resolved.optionId);
        const what =
          resolved.outcome === 'selected' && chosen ? `Answered: ${chosen.name}` : 'No answer (cancelled)';
        footer = h('div', { className: 'jp-AcpPermission-done' }, resolved.by === 'user' ? what : `${what} by ${resolved.by}`);
      } else {
        footer = h(
          'div',
          { className: 'jp-AcpPanel-row' },
          ...item.options.map(o =>
            h(
              'button',
              {
                className: `jp-Button jp-mod-styled ${o.kind.startsWith('allow') ? 'jp-mod-accept' : 'jp-mod-warn'}`,
                'data-option-id': o.optionId,
                onclick: () => conn?.answer(item.requestId, o.optionId)
              },
              o.name
            )
          )
        );
      }
      return h(
        'div',
        { className: 'jp-AcpPermission' + (resolved ? '' : ' jp-mod-pending') },
        h('div', { className: 'jp-AcpPermission-head' }, `The agent asks permission: ${item.title}`),
        footer
      );
    }
    case 'turn':
      return h(
        'div',
        { className: 'jp-AcpTurn' },
        [
          item.stopReason === 'end_turn' ? 'Turn done' : `Turn ended: ${item.stopReason.replace(/_/g, ' ')}`,
          item.totalTokens ? formatTokens(item.totalTokens) : '',
          item.duration !== null ? `${item.duration.toFixed(1)} s` : ''
        ]
          .filter(Boolean)
          .join(' · ')
      );
    case 'error':
      return h('div', { className: 'jp-AcpMsg jp-AcpMsg-error', role: 'alert' }, item.message);
    case 'notice':
      return h('div', { className: 'jp-AcpTurn' }, item.text);
  }
}
