/**
 * The settings: what the code assumes matches the schema JupyterLab shows (defaults, choices),
 * and a missing or hand-broken value falls back to its default.
 */
import { readFileSync } from 'fs';
import { join } from 'path';

import { describe, expect, it } from 'vitest';

import { DEFAULT_SETTINGS, readSettings } from '../src/settings';

const schema = JSON.parse(readFileSync(join(__dirname, '..', 'schema', 'plugin.json'), 'utf-8'));

describe('settings', () => {
  it('has the schema defaults and choices', () => {
    const props = schema.properties;
    expect(Object.keys(props).sort()).toEqual(Object.keys(DEFAULT_SETTINGS).sort());
    for (const [key, value] of Object.entries(DEFAULT_SETTINGS)) {
      expect(props[key].default).toEqual(value);
    }
    expect(props.sendKey.enum).toEqual(['Enter', 'Mod-Enter']);
    expect(schema.additionalProperties).toBe(false);
  });

  it('falls back to the defaults', () => {
    expect(readSettings(undefined)).toEqual(DEFAULT_SETTINGS);
    expect(readSettings({ sendKey: 'Alt-Enter', autoScroll: 'yes', defaultAgent: 3 })).toEqual(DEFAULT_SETTINGS);
    expect(readSettings({ sendKey: 'Mod-Enter', autoScroll: false, defaultAgent: ' qwen ' })).toEqual({
      sendKey: 'Mod-Enter',
      autoScroll: false,
      defaultAgent: 'qwen'
    });
  });
});
