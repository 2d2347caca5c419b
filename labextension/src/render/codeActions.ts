/**
 * A toolbar under each code block of a rendered reply: Copy, Insert above, Insert below and
 * Replace active cell (the labels and behaviour Jupyter AI users know from @jupyter/chat). The
 * notebook is the one JupyterLab's notebook tracker calls current; without one, the notebook
 * buttons are disabled and their tooltip says why.
 */

import { Clipboard } from '@jupyterlab/apputils';
import type { INotebookTracker } from '@jupyterlab/notebook';

import { h } from '../dom';
import { __ } from '../i18n';

/** What the toolbar's buttons do (JupyterLab's notebook in the app, fakes in tests). */
export interface CodeActions {
  copy(code: string): Promise<void>;
  /** Why the notebook actions cannot run now (no notebook open), or null when they can. */
  unavailable(): string | null;
  insert(code: string, where: 'above' | 'below'): void;
  replace(code: string): void;
}

/** The refresh of every toolbar shown (their notebook buttons follow the current notebook). */
const REFRESH = 'acpRefresh';

/** The actions on the current notebook of `tracker` (none: only Copy works). */
export function notebookCodeActions(tracker: INotebookTracker | null): CodeActions {
  tracker?.currentChanged.connect(() => {
    for (const bar of document.querySelectorAll('.jp-AcpCode-toolbar')) {
      (bar as any)[REFRESH]?.();
    }
  });
  const current = () => {
    const panel = tracker?.currentWidget ?? null;
    return panel && panel.content.model ? panel.content : null;
  };
  return {
    async copy(code: string): Promise<void> {
      try {
        await navigator.clipboard.writeText(code);
      } catch {
        Clipboard.copyToSystem(code); // (no clipboard permission: the copy-event path)
      }
    },
    unavailable(): string | null {
      return current() ? null : __('Open a notebook to use this');
    },
    insert(code: string, where: 'above' | 'below'): void {
      const nb = current();
      if (!nb?.model) {
        return;
      }
      const active = Math.max(nb.activeCellIndex, 0);
      const index = nb.model.cells.length === 0 ? 0 : where === 'below' ? active + 1 : active;
      nb.model.sharedModel.insertCell(index, { cell_type: 'code', source: code } as any);
      nb.activeCellIndex = index;
    },
    replace(code: string): void {
      const nb = current();
      const cell = nb?.activeCell;
      if (!nb?.model) {
        return;
      }
      if (!cell) {
        this.insert(code, 'below');
        return;
      }
      cell.model.sharedModel.setSource(code);
    }
  };
}

/** The code of a rendered `<pre>` (the highlighter's spans joined), without the final newline. */
export function codeOf(pre: HTMLElement): string {
  return (pre.textContent ?? '').replace(/\n$/, '');
}

/** Add a toolbar after every code block of `host` that has none yet. */
export function addCodeToolbars(host: HTMLElement, actions: CodeActions): void {
  for (const pre of host.querySelectorAll('pre')) {
    const next = pre.nextElementSibling;
    if (next?.classList.contains('jp-AcpCode-toolbar')) {
      continue;
    }
    pre.after(codeToolbar(pre as HTMLElement, actions));
  }
}

function codeToolbar(pre: HTMLElement, actions: CodeActions): HTMLElement {
  const notebookButtons: HTMLButtonElement[] = [];
  const button = (label: string, title: string, run: (b: HTMLButtonElement) => void, notebook = true) => {
    const b = h('button', {
      type: 'button',
      className: 'jp-AcpCode-button',
      title,
      'aria-label': title
    }, label) as HTMLButtonElement;
    b.addEventListener('click', () => run(b));
    if (notebook) {
      notebookButtons.push(b);
    }
    return b;
  };
  const copy = button(
    __('Copy'),
    __('Copy the code'),
    b => {
      void actions.copy(codeOf(pre)).then(() => {
        b.textContent = __('Copied');
        window.setTimeout(() => (b.textContent = __('Copy')), 1500);
      });
    },
    false
  );
  const titles = new Map<HTMLButtonElement, string>();
  const bar = h(
    'div',
    { className: 'jp-AcpCode-toolbar', role: 'toolbar', 'aria-label': __('Code actions') },
    copy,
    button(__('Insert above'), __('Insert the code in a new cell above the active cell'), () =>
      actions.insert(codeOf(pre), 'above')
    ),
    button(__('Insert below'), __('Insert the code in a new cell below the active cell'), () =>
      actions.insert(codeOf(pre), 'below')
    ),
    button(__('Replace active cell'), __("Replace the active cell's source with the code"), () =>
      actions.replace(codeOf(pre))
    )
  );
  for (const b of notebookButtons) {
    titles.set(b, b.title);
  }
  // whether a notebook is open changes at any time: look when the pointer or focus gets here
  const refresh = () => {
    const why = actions.unavailable();
    for (const b of notebookButtons) {
      b.disabled = why !== null;
      b.title = why ?? titles.get(b) ?? '';
    }
  };
  bar.addEventListener('pointerenter', refresh);
  bar.addEventListener('focusin', refresh);
  (bar as any)[REFRESH] = refresh;
  refresh();
  return bar;
}
