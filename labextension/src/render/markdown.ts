/**
 * Markdown as a JupyterLab Markdown cell shows it: through the application's rendermime registry
 * (its sanitizer, since agent text is untrusted; its Markdown parser, which highlights fenced code
 * with CodeMirror's languages; its LaTeX typesetter; its link handler).
 *
 * `renderMarkdown` is called directly rather than through a `RenderedMarkdown` widget, so that the
 * chat owns its nodes: each call renders into a fresh detached element, which the caller swaps in
 * once it is current (results of async renders can arrive out of order). MathJax needs attached
 * nodes, so typesetting is a separate step the caller runs after the swap.
 */

import { renderMarkdown } from '@jupyterlab/rendermime';
import type { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import type { ITranslator } from '@jupyterlab/translation';

import { plainBlock } from '../dom';

/** What the chat needs from a Markdown renderer (rendermime in JupyterLab, plain text in tests). */
export interface MarkdownRenderer {
  /** `source` rendered into a new detached element (a `div`). */
  render(source: string): Promise<HTMLElement>;
  /** Typeset the math in `host` (attached to the document); a no-op without a typesetter. */
  typeset(host: HTMLElement): void;
}

/** The renderer of a JupyterLab application. */
export function rendermimeMarkdown(rm: IRenderMimeRegistry, translator?: ITranslator): MarkdownRenderer {
  return {
    async render(source: string): Promise<HTMLElement> {
      const host = document.createElement('div');
      await renderMarkdown({
        host,
        source,
        trusted: false, // agent text: the sanitizer runs
        sanitizer: rm.sanitizer,
        resolver: null,
        linkHandler: rm.linkHandler,
        latexTypesetter: rm.latexTypesetter,
        markdownParser: rm.markdownParser,
        shouldTypeset: false, // (typeset once attached: see typeset)
        translator
      });
      return host;
    },
    typeset(host: HTMLElement): void {
      if (!rm.latexTypesetter || !host.isConnected) {
        return;
      }
      try {
        const done = rm.latexTypesetter.typeset(host) as unknown;
        if (done instanceof Promise) {
          done.catch(console.warn);
        }
      } catch (e) {
        console.warn(e);
      }
    }
  };
}

/**
 * A renderer without rendermime (a panel built without an application, unit tests): the text as
 * text, its lines kept. Never HTML.
 */
export function plainMarkdown(): MarkdownRenderer {
  return {
    async render(source: string): Promise<HTMLElement> {
      return plainBlock(source);
    },
    typeset(): void {
      // nothing to typeset
    }
  };
}
