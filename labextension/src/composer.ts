/**
 * The chat input: a textarea with slash-command and `@file` completion, images pasted or dropped
 * in (shown as thumbnails until sent), and the Send / Cancel buttons.
 *
 * It knows nothing of sessions: the panel gives it a host to ask for the commands, the files
 * under a prefix, whether the agent takes images, and to send. While a session is being created
 * or resumed the input is disabled ("starting…"), so nothing typed then can land in the wrong
 * session.
 */

import { ImageBlock } from './api';
import { applyChoice, Choice, completionAt, CompletionQuery, matchCommands } from './completion';
import { formatBytes, h } from './dom';
import { __ } from './i18n';
import { Command } from './view';

/** The server's limits for images in a prompt (docs/api.md). */
export const MAX_IMAGES = 4;
export const MAX_IMAGE_BYTES = 5 * 1024 * 1024;
export const IMAGE_TYPES = ['image/png', 'image/jpeg', 'image/gif', 'image/webp'];

export interface ComposerHost {
  commands(): Command[];
  /** Workspace paths under `prefix` (empty when no session is open). */
  files(prefix: string): Promise<string[]>;
  /** Whether the current agent takes images; null when no session is open. */
  acceptsImages(): boolean | null;
  agentName(): string;
  /** Send; false when it could not (the text and images go back into the input). */
  submit(text: string, images: ImageBlock[]): Promise<boolean>;
  cancel(): void;
  /** Say something to the user (null clears it). */
  error(message: string | null): void;
}

interface PendingImage extends ImageBlock {
  name: string;
  size: number;
}

/** Which key sends (the `sendKey` setting): Enter alone, or Ctrl/Cmd+Enter (Enter is then a
 * new line). Ctrl/Cmd+Enter always sends, and Shift+Enter is always a new line. */
export type SendKey = 'Enter' | 'Mod-Enter';

let sendKey: SendKey = 'Enter';
const composers = new Set<Composer>();

/** Use `key` to send, in every composer (index.ts calls it when the setting changes). */
export function setSendKey(key: SendKey): void {
  sendKey = key === 'Mod-Enter' ? 'Mod-Enter' : 'Enter';
  for (const c of composers) {
    c.refreshPlaceholder();
  }
}

export function getSendKey(): SendKey {
  return sendKey;
}

const IS_MAC = typeof navigator !== 'undefined' && /Mac|iPhone|iPad/.test(navigator.platform ?? '');

function placeholder(): string {
  return sendKey === 'Enter'
    ? __('Ask the agent… (Enter sends, Shift+Enter for a new line; / for commands, @ for files)')
    : __(
        'Ask the agent… (%1+Enter sends, Enter for a new line; / for commands, @ for files)',
        IS_MAC ? 'Cmd' : 'Ctrl'
      );
}

export class Composer {
  readonly node: HTMLElement;
  readonly input: HTMLTextAreaElement;
  private _send: HTMLButtonElement;
  private _cancel: HTMLButtonElement;
  private _popup: HTMLElement;
  private _tray: HTMLElement;
  private _images: PendingImage[] = [];
  private _query: CompletionQuery | null = null;
  private _choices: Choice[] = [];
  private _active = 0;
  private _generation = 0;
  private _timer = 0;
  private _starting = false;
  private _hadFocus = false;

  constructor(private readonly host: ComposerHost) {
    this.input = h('textarea', {
      className: 'jp-mod-styled jp-AcpPanel-input',
      placeholder: placeholder(),
      rows: '3',
      'aria-autocomplete': 'list',
      onkeydown: ev => this.onKey(ev as KeyboardEvent),
      oninput: () => this.update(),
      onkeyup: ev => {
        if (['ArrowLeft', 'ArrowRight', 'Home', 'End'].includes((ev as KeyboardEvent).key)) {
          this.update(); // the caret moved into or out of a word to complete
        }
      },
      onclick: () => this.update(),
      onblur: () => window.setTimeout(() => this.close(), 150),
      onpaste: ev => this.onPaste(ev as ClipboardEvent),
      ondragover: ev => this.onDragOver(ev as DragEvent),
      ondrop: ev => this.onDrop(ev as DragEvent)
    }) as HTMLTextAreaElement;
    this._popup = h('ul', { className: 'jp-AcpCompleter', role: 'listbox', hidden: true });
    this._tray = h('div', { className: 'jp-AcpComposer-images', hidden: true });
    this._send = h(
      'button',
      { className: 'jp-Button jp-mod-styled jp-mod-accept', onclick: () => void this.submit() },
      __('Send')
    ) as HTMLButtonElement;
    this._cancel = h(
      'button',
      { className: 'jp-Button jp-mod-styled jp-mod-warn', onclick: () => this.host.cancel() },
      __('Cancel')
    ) as HTMLButtonElement;
    this.node = h(
      'div',
      { className: 'jp-AcpPanel-composer' },
      this._popup,
      this._tray,
      this.input,
      h('div', { className: 'jp-AcpPanel-row' }, this._cancel, this._send)
    );
    composers.add(this);
  }

  /** Stop following the send-key setting (the panel is gone). */
  dispose(): void {
    composers.delete(this);
  }

  /** The hint in the empty input says which key sends (unless a session is starting). */
  refreshPlaceholder(): void {
    if (!this._starting) {
      this.input.placeholder = placeholder();
    }
  }

  /** A turn is running: Send is off, Cancel is on. */
  setBusy(busy: boolean, canCancel: boolean): void {
    this._send.disabled = busy || this._starting;
    this._cancel.disabled = !canCancel;
  }

  /** A session is being created or resumed: nothing can be typed or sent until it is there. */
  setStarting(starting: boolean, label = 'starting…'): void {
    const refocus = !starting && this._starting && this._hadFocus;
    if (starting && !this._starting) {
      this._hadFocus = document.activeElement === this.input;
    }
    this._starting = starting;
    this.input.disabled = starting;
    this._send.disabled = starting;
    this.input.placeholder = starting ? label : placeholder();
    this.node.classList.toggle('jp-mod-starting', starting);
    if (starting) {
      this.close();
    } else if (refocus) {
      this.input.focus(); // (a disabled input loses the focus; give it back)
    }
  }

  get starting(): boolean {
    return this._starting;
  }

  /** The session's commands changed (available_commands_update): refresh an open list. */
  commandsChanged(): void {
    if (this._query?.kind === 'command') {
      this.update();
    }
  }

  /** Forget the images waiting to be sent (another session was opened). */
  clearImages(): void {
    this._images = [];
    this.drawImages();
  }

  async submit(): Promise<void> {
    if (this._starting) {
      return;
    }
    const text = this.input.value;
    if (!text.trim()) {
      if (this._images.length) {
        this.host.error('Add a few words to go with the image.');
      }
      return;
    }
    const pending = this._images;
    const images = pending.map(({ mime_type, data }) => ({ mime_type, data }));
    this.input.value = '';
    this._images = [];
    this.drawImages();
    this.close();
    if (!(await this.host.submit(text, images)) && !this.input.value) {
      this.input.value = text; // not sent (the banner says why): nothing typed is lost
      this._images = pending;
      this.drawImages();
    }
  }

  // -- completion -----------------------------------------------------------------------------

  private onKey(key: KeyboardEvent): void {
    if (this._query && this._choices.length) {
      if (key.key === 'ArrowDown' || key.key === 'ArrowUp') {
        key.preventDefault();
        const n = this._choices.length;
        this._active = (this._active + (key.key === 'ArrowDown' ? 1 : n - 1)) % n;
        this.drawPopup();
        return;
      }
      if ((key.key === 'Tab' || key.key === 'Enter') && !key.shiftKey && !key.isComposing) {
        key.preventDefault();
        this.pick(this._choices[this._active].value);
        return;
      }
      if (key.key === 'Escape') {
        key.preventDefault();
        key.stopPropagation();
        this.close();
        return;
      }
    }
    if (key.key === 'Enter' && !key.shiftKey && !key.isComposing) {
      const mod = key.ctrlKey || key.metaKey;
      if (mod || sendKey === 'Enter') {
        key.preventDefault();
        void this.submit();
      } // (else: Enter is a new line, as in the textarea)
    }
  }

  private pick(value: string): void {
    const q = this._query;
    if (!q) {
      return;
    }
    const next = applyChoice(this.input.value, q, value);
    this.input.value = next.text;
    this.input.setSelectionRange(next.caret, next.caret);
    this.input.focus();
    this.close();
    if (q.kind === 'file' && value.endsWith('/')) {
      this.update(); // walk into the directory
    }
  }

  private close(): void {
    this._query = null;
    this._choices = [];
    this._generation++;
    this._popup.hidden = true;
    this.input.removeAttribute('aria-activedescendant');
  }

  /** Look at the text around the caret and show (or hide) the completion list. */
  private update(): void {
    const caret = this.input.selectionStart ?? this.input.value.length;
    const q = this.input.selectionEnd === caret ? completionAt(this.input.value, caret) : null;
    if (!q) {
      this.close();
      return;
    }
    if (q.kind === 'command') {
      this.show(q, matchCommands(this.host.commands(), q.query));
      return;
    }
    // files: ask the server, a moment after the last key; answers to older queries are dropped
    const generation = ++this._generation;
    window.clearTimeout(this._timer);
    this._timer = window.setTimeout(() => {
      this.host.files(q.query).then(
        files => {
          if (generation === this._generation) {
            this.show(q, files.map(f => ({ value: f, detail: f.endsWith('/') ? 'folder' : '' })));
          }
        },
        () => {
          if (generation === this._generation) {
            this.close();
          }
        }
      );
    }, 120);
  }

  private show(q: CompletionQuery, choices: Choice[]): void {
    const same = this._query?.kind === q.kind && this._query.start === q.start;
    this._query = q;
    this._choices = choices;
    if (!same || this._active >= choices.length) {
      this._active = 0;
    }
    if (!choices.length) {
      this._popup.hidden = true;
      return;
    }
    this.drawPopup();
  }

  private drawPopup(): void {
    const kind = this._query?.kind ?? 'command';
    this._popup.replaceChildren(
      ...this._choices.map((c, i) =>
        h(
          'li',
          {
            id: `jp-AcpCompleter-${i}`,
            className: 'jp-AcpCompleter-item' + (i === this._active ? ' jp-mod-active' : ''),
            role: 'option',
            'aria-selected': i === this._active ? 'true' : 'false',
            'data-value': c.value,
            // mousedown, not click: the textarea keeps the focus (and its caret)
            onmousedown: ev => {
              ev.preventDefault();
              this.pick(c.value);
            }
          },
          h('span', { className: 'jp-AcpCompleter-name' }, kind === 'command' ? `/${c.value}` : c.value),
          c.detail ? h('span', { className: 'jp-AcpCompleter-detail' }, c.detail) : null
        )
      )
    );
    this._popup.hidden = false;
    this.input.setAttribute('aria-activedescendant', `jp-AcpCompleter-${this._active}`);
    this._popup.children[this._active]?.scrollIntoView?.({ block: 'nearest' });
  }

  // -- images ---------------------------------------------------------------------------------

  private onPaste(ev: ClipboardEvent): void {
    const files = Array.from(ev.clipboardData?.files ?? []).filter(f => f.type.startsWith('image/'));
    if (files.length) {
      ev.preventDefault();
      void this.addImages(files);
    }
  }

  private onDragOver(ev: DragEvent): void {
    if (Array.from(ev.dataTransfer?.items ?? []).some(i => i.kind === 'file')) {
      ev.preventDefault();
    }
  }

  private onDrop(ev: DragEvent): void {
    const files = Array.from(ev.dataTransfer?.files ?? []);
    if (files.length) {
      ev.preventDefault();
      void this.addImages(files);
    }
  }

  /** Take images for the next message, if the agent accepts them (else say why not). */
  async addImages(files: File[]): Promise<void> {
    const accepts = this.host.acceptsImages();
    if (accepts === null) {
      this.host.error('Start a session before adding images.');
      return;
    }
    if (!accepts) {
      this.host.error(`${this.host.agentName() || 'This agent'} does not accept images.`);
      return;
    }
    for (const file of files) {
      if (!IMAGE_TYPES.includes(file.type)) {
        this.host.error(`${file.name || 'This file'} is not an image the agent can take (PNG, JPEG, GIF or WebP).`);
        continue;
      }
      if (file.size > MAX_IMAGE_BYTES) {
        this.host.error(`${file.name || 'The image'} is too large (${formatBytes(file.size)}; at most 5 MB).`);
        continue;
      }
      if (this._images.length >= MAX_IMAGES) {
        this.host.error(`At most ${MAX_IMAGES} images go with one message.`);
        break;
      }
      const data = await readBase64(file);
      this._images.push({ mime_type: file.type, data, name: file.name || 'pasted image', size: file.size });
      this.host.error(null);
    }
    this.drawImages();
  }

  private drawImages(): void {
    this._tray.hidden = this._images.length === 0;
    this._tray.replaceChildren(
      ...this._images.map((img, i) =>
        h(
          'figure',
          { className: 'jp-AcpThumb', title: `${img.name} · ${formatBytes(img.size)}` },
          h('img', { src: `data:${img.mime_type};base64,${img.data}`, alt: img.name }),
          h(
            'button',
            {
              className: 'jp-AcpThumb-remove',
              title: 'Remove this image',
              'aria-label': 'Remove image',
              onclick: () => {
                this._images.splice(i, 1);
                this.drawImages();
              }
            },
            '×'
          )
        )
      )
    );
  }
}

/** A file's bytes as base64 (no `data:` prefix). */
function readBase64(file: File): Promise<string> {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(String(reader.result).replace(/^data:[^,]*,/, ''));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
