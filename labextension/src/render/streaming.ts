/**
 * A Markdown text that grows while the agent streams it, rendered so that each chunk costs work
 * in proportion to the unfinished tail only.
 *
 * The text is cut at its seal points (blocks.ts): every block before the last seal point is
 * rendered once into its own `div.jp-AcpMd-block` and never touched again (so a selection or an
 * open `<details>` in it survives the rest of the stream); the rest, the tail, is re-rendered into
 * one `div.jp-AcpMd-tail` as text arrives. One render runs at a time: text that arrives meanwhile
 * is rendered next, in one go, so results never land out of order, and a generation counter drops
 * what was rendered for a text that was since replaced. When the message is final the tail is
 * sealed too. Sealed blocks get their math typeset and their code blocks decorated (toolbar) once
 * attached; the tail does not while it still changes. A final text with link reference
 * definitions (which Markdown resolves across blocks) is rendered once more in one piece.
 */

import { plainBlock } from '../dom';
import { sealPoints } from './blocks';
import type { MarkdownRenderer } from './markdown';

/** A link reference definition (`[id]: url`): a use in another block needs the whole text. */
const REFERENCE = /^ {0,3}\[[^\]]+\]:\s*\S/m;

export class StreamingMarkdown {
  readonly node: HTMLElement;
  private readonly _tail: HTMLElement;
  private _text = '';
  private _final = false;
  /** Length of the text already rendered as sealed blocks (and that text). */
  private _sealed = 0;
  private _sealedText = '';
  private _generation = 0;
  private _dirty = false;
  private _running: Promise<void> | null = null;
  private _disposed = false;
  /** The final text was rendered in one piece (see REFERENCE). */
  private _whole = false;

  /**
   * @param _decorate called once on each sealed block (e.g. the code blocks' toolbar)
   * @param _rendered called after each swap (the log follows the reply down)
   */
  constructor(
    private readonly _renderer: MarkdownRenderer,
    private readonly _decorate?: (block: HTMLElement) => void,
    private readonly _rendered?: () => void
  ) {
    this.node = document.createElement('div');
    this.node.className = 'jp-AcpMd';
    this._tail = document.createElement('div');
    this._tail.className = 'jp-AcpMd-tail';
    this.node.append(this._tail);
  }

  /** The whole text so far; `final` once no more will come (the tail is sealed then). */
  set(text: string, final = false): void {
    if (text === this._text && final === this._final) {
      return;
    }
    if (!text.startsWith(this._sealedText)) {
      // replaced, not extended: start over (renders under way are dropped by the generation)
      this._generation++;
      this._whole = false;
      this._sealed = 0;
      this._sealedText = '';
      this._tail.replaceChildren();
      for (const block of [...this.node.querySelectorAll(':scope > .jp-AcpMd-block')]) {
        block.remove();
      }
    }
    this._text = text;
    this._final = final;
    this._dirty = true;
    if (!this._running) {
      this._running = this._pump().finally(() => {
        this._running = null;
      });
    }
  }

  /** Resolves when what was set so far is rendered (tests, the turn end). */
  async idle(): Promise<void> {
    while (this._running) {
      await this._running;
    }
  }

  dispose(): void {
    this._disposed = true;
  }

  private async _pump(): Promise<void> {
    while (this._dirty && !this._disposed) {
      this._dirty = false;
      const generation = this._generation;
      const text = this._text;
      const from = this._sealed;
      const points = sealPoints(text, from);
      if (this._final && text.length > (points.length ? points[points.length - 1] : from)) {
        points.push(text.length);
      }
      const sources: string[] = [];
      let start = from;
      for (const p of points) {
        sources.push(text.slice(start, p));
        start = p;
      }
      const tailSource = text.slice(start);
      let blocks: HTMLElement[];
      let tail: HTMLElement | null;
      try {
        [blocks, tail] = await Promise.all([
          Promise.all(sources.map(s => this._renderer.render(s))),
          tailSource ? this._renderer.render(tailSource) : Promise.resolve(null)
        ]);
      } catch (e) {
        console.warn('jupyter-acp: Markdown rendering failed', e);
        blocks = sources.map(s => plainBlock(s));
        tail = tailSource ? plainBlock(tailSource) : null;
      }
      if (generation !== this._generation || this._disposed) {
        continue; // the text was replaced meanwhile (that set `_dirty` again)
      }
      for (const block of blocks) {
        block.classList.add('jp-AcpMd-block');
        this.node.insertBefore(block, this._tail);
      }
      if (tail) {
        this._tail.replaceChildren(...tail.childNodes);
      } else if (this._tail.firstChild) {
        this._tail.replaceChildren();
      }
      this._sealed = start;
      this._sealedText = text.slice(0, start);
      for (const block of blocks) {
        this._decorate?.(block);
        this._renderer.typeset(block);
      }
      this._rendered?.();
      if (this._final && !this._dirty && !this._whole && REFERENCE.test(text)) {
        await this._renderWhole(text, generation);
      }
    }
  }

  /** Replace the blocks by `text` rendered in one piece (so references resolve across blocks). */
  private async _renderWhole(text: string, generation: number): Promise<void> {
    this._whole = true;
    let whole: HTMLElement;
    try {
      whole = await this._renderer.render(text);
    } catch (e) {
      console.warn('jupyter-acp: Markdown rendering failed', e);
      return;
    }
    if (generation !== this._generation || this._disposed || this._text !== text) {
      return;
    }
    whole.classList.add('jp-AcpMd-block');
    for (const block of [...this.node.querySelectorAll(':scope > .jp-AcpMd-block')]) {
      block.remove();
    }
    this.node.insertBefore(whole, this._tail);
    this._decorate?.(whole);
    this._renderer.typeset(whole);
    this._rendered?.();
  }
}
