/**
 * The status line's words go through JupyterLab's translator (a language pack translates them).
 */
import { afterEach, describe, expect, it, vi } from 'vitest';

vi.mock('@jupyterlab/ui-components', () => ({}));

import { stateWord } from '../src/chatbar';
import { __, setTranslation } from '../src/i18n';

describe('translation', () => {
  afterEach(() => setTranslation(null));

  it('translates every session state and fills in the arguments', () => {
    setTranslation({ __: (msgid: string, ...args: unknown[]) => `«${msgid}|${args.join(',')}»` } as any);
    expect(['starting', 'ready', 'busy', 'stopped', 'error', 'suspended'].map(stateWord)).toEqual([
      '«starting…|»',
      '«ready|»',
      '«busy|»',
      '«stopped|»',
      '«error|»',
      '«suspended|»'
    ]);
    expect(stateWord('hibernating')).toBe('hibernating'); // (a state this build does not know)
    expect(__('context %1/%2', 5, 10)).toBe('«context %1/%2|5,10»');
  });

  it('is English with %1 filled in when there is no translator', () => {
    expect(stateWord('starting')).toBe('starting…');
    expect(__('context %1/%2', 5, 10)).toBe('context 5/10');
  });
});
