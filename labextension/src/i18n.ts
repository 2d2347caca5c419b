/**
 * The extension's strings through JupyterLab's translator: `__()` everywhere, the bundle set
 * once at activation (index.ts), so it is not threaded through every call. Until then (unit
 * tests, a bare panel) the English text is used, with `%1`… replaced as the bundle would.
 *
 * The domain is `jupyter_acp` (a language pack would ship `jupyter_acp.json` for it); with
 * JupyterLab's null translator, or no language pack, `__()` gives the English text back.
 */

import type { TranslationBundle } from '@jupyterlab/translation';

let bundle: TranslationBundle | null = null;

/** Use `trans` for every string from now on. */
export function setTranslation(trans: TranslationBundle | null): void {
  bundle = trans;
}

/** `msgid` translated, `%1`, `%2`… replaced by `args`. */
export function __(msgid: string, ...args: unknown[]): string {
  if (bundle) {
    return bundle.__(msgid, ...(args as any[]));
  }
  return msgid.replace(/%(\d+)/g, (m, n) => (args[Number(n) - 1] !== undefined ? String(args[Number(n) - 1]) : m));
}
