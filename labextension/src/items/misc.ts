/**
 * The items that change rarely and are small: the plan, a permission prompt, a turn's footer,
 * errors and notices. Their views redraw their own node's content when their item changes (the
 * node itself stays, so the log never moves it).
 */

import { h } from '../dom';
import { __ } from '../i18n';
import type { ItemView } from '../log';
import { formatTokens } from '../reducer';
import { ChatItem } from '../view';
import type { ItemContext } from './context';

type Of<K extends ChatItem['kind']> = Extract<ChatItem, { kind: K }>;

/** A view whose node is redrawn whole from its item (outer element kept). */
export class RedrawView<T extends ChatItem> implements ItemView<T> {
  readonly node: HTMLElement;

  constructor(
    item: T,
    private readonly _draw: (item: T) => HTMLElement
  ) {
    this.node = _draw(item);
  }

  update(item: T): void {
    const fresh = this._draw(item);
    this.node.className = fresh.className;
    for (const attr of [...fresh.attributes]) {
      if (this.node.getAttribute(attr.name) !== attr.value) {
        this.node.setAttribute(attr.name, attr.value);
      }
    }
    this.node.replaceChildren(...fresh.childNodes);
  }
}

export function drawPlan(item: Of<'plan'>): HTMLElement {
  return h(
    'div',
    { className: 'jp-AcpPlan' },
    h('div', { className: 'jp-AcpPlan-head' }, __('Plan')),
    h(
      'ol',
      {},
      ...item.entries.map(e =>
        h('li', { className: `jp-AcpPlan-${e.status}`, title: __('%1 priority', e.priority) }, e.content)
      )
    )
  );
}

export function drawPermission(item: Of<'permission'>, ctx: ItemContext): HTMLElement {
  const resolved = item.resolved;
  let footer: HTMLElement;
  if (resolved) {
    const chosen = item.options.find(o => o.optionId === resolved.optionId);
    const what =
      resolved.outcome === 'selected' && chosen ? __('Answered: %1', chosen.name) : __('No answer (cancelled)');
    footer = h(
      'div',
      { className: 'jp-AcpPermission-done' },
      resolved.by === 'user' ? what : __('%1 by %2', what, resolved.by)
    );
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
            onclick: () => ctx.connection()?.answer(item.requestId, o.optionId)
          },
          o.name
        )
      )
    );
  }
  return h(
    'div',
    { className: 'jp-AcpPermission' + (resolved ? '' : ' jp-mod-pending') },
    h('div', { className: 'jp-AcpPermission-head' }, __('The agent asks permission: %1', item.title)),
    item.code !== null ? h('pre', { className: 'jp-AcpPermission-code' }, h('code', {}, item.code)) : null,
    footer
  );
}

export function drawTurn(item: Of<'turn'>): HTMLElement {
  return h(
    'div',
    { className: 'jp-AcpTurn' },
    [
      item.stopReason === 'end_turn' ? __('Turn done') : __('Turn ended: %1', item.stopReason.replace(/_/g, ' ')),
      item.totalTokens ? formatTokens(item.totalTokens) : '',
      item.duration !== null ? `${item.duration.toFixed(1)} s` : ''
    ]
      .filter(Boolean)
      .join(' · ')
  );
}

export function drawError(item: Of<'error'>): HTMLElement {
  return h('div', { className: 'jp-AcpMsg jp-AcpMsg-error', role: 'alert' }, item.message);
}

export function drawNotice(item: Of<'notice'>): HTMLElement {
  return h('div', { className: 'jp-AcpTurn jp-AcpNotice' }, item.text);
}
