// @vitest-environment jsdom
/**
 * The composer's send key (the `sendKey` setting): Enter sends by default; with "Mod-Enter",
 * Enter is a new line and Ctrl/Cmd+Enter sends. Shift+Enter never sends.
 */
import { afterEach, describe, expect, it } from 'vitest';

import { Composer, setSendKey } from '../src/composer';

function composer(): { c: Composer; sent: string[] } {
  const sent: string[] = [];
  const c = new Composer({
    commands: () => [],
    files: async () => [],
    acceptsImages: () => null,
    agentName: () => 'demo',
    submit: async text => {
      sent.push(text);
      return true;
    },
    cancel: () => undefined,
    error: () => undefined
  });
  return { c, sent };
}

function press(c: Composer, init: KeyboardEventInit): boolean {
  const ev = new KeyboardEvent('keydown', { key: 'Enter', cancelable: true, ...init });
  c.input.dispatchEvent(ev);
  return ev.defaultPrevented;
}

describe('sendKey', () => {
  afterEach(() => setSendKey('Enter'));

  it('sends on Enter by default, never on Shift+Enter', () => {
    const { c, sent } = composer();
    c.input.value = 'hi';
    expect(press(c, { shiftKey: true })).toBe(false);
    expect(sent).toEqual([]);
    expect(press(c, {})).toBe(true);
    expect(sent).toEqual(['hi']);
    expect(c.input.placeholder).toContain('Enter sends');
  });

  it('with Mod-Enter, Enter is a new line and Ctrl/Cmd+Enter sends', () => {
    const { c, sent } = composer();
    setSendKey('Mod-Enter');
    expect(c.input.placeholder).toMatch(/(Ctrl|Cmd)\+Enter sends/);
    c.input.value = 'two lines';
    expect(press(c, {})).toBe(false); // (the textarea inserts the new line)
    expect(sent).toEqual([]);
    expect(press(c, { ctrlKey: true })).toBe(true);
    expect(sent).toEqual(['two lines']);
    c.input.value = 'again';
    expect(press(c, { metaKey: true })).toBe(true);
    expect(sent).toEqual(['two lines', 'again']);
    c.dispose();
  });
});
