/**
 * Messages: the user's (plain text, with the chips of what the server attached), the agent's and
 * its thoughts (Markdown, streamed: render/streaming.ts).
 */

import { fileIcon, imageIcon } from '@jupyterlab/ui-components';

import { formatBytes, h } from '../dom';
import { __ } from '../i18n';
import type { ItemView } from '../log';
import type { Attachment, ChatItem } from '../view';
import { addCodeToolbars } from '../render/codeActions';
import { StreamingMarkdown } from '../render/streaming';
import type { ItemContext } from './context';

type User = Extract<ChatItem, { kind: 'user' }>;
type Streamed = Extract<ChatItem, { kind: 'agent' | 'thought' }>;

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

export class UserView implements ItemView<User> {
  readonly node = h('div', { className: 'jp-AcpMsg jp-AcpMsg-user' });

  constructor(item: User) {
    this.update(item);
  }

  update(item: User): void {
    this.node.replaceChildren(item.text);
    if (item.attachments?.length) {
      this.node.append(attachmentChips(item.attachments));
    }
  }
}

/** An agent message or a thought: Markdown that grows while it streams. */
export class StreamedView implements ItemView<Streamed> {
  readonly node: HTMLElement;
  private readonly _md: StreamingMarkdown;
  private _text = '';

  constructor(item: Streamed, ctx: ItemContext) {
    const code = ctx.code;
    this._md = new StreamingMarkdown(
      ctx.markdown,
      code ? block => addCodeToolbars(block, code) : undefined,
      () => ctx.rendered?.()
    );
    if (item.kind === 'agent') {
      this.node = h('div', { className: 'jp-AcpMsg jp-AcpMsg-agent jp-RenderedHTMLCommon' }, this._md.node);
    } else {
      this.node = h(
        'details',
        { className: 'jp-AcpMsg jp-AcpMsg-thought' },
        h('summary', {}, __('Thinking')),
        h('div', { className: 'jp-RenderedHTMLCommon' }, this._md.node)
      );
    }
    this.update(item);
  }

  update(item: Streamed): void {
    this._text = item.text;
    this._md.set(item.text);
  }

  settle(): void {
    this._md.set(this._text, true);
  }

  /** Resolves when the text set so far is on screen. */
  idle(): Promise<void> {
    return this._md.idle();
  }

  dispose(): void {
    this._md.dispose();
  }
}
