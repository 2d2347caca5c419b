/**
 * Parity with the kernel's reducer (`jupyter_acp/kernel/transcript.py`): the same event streams
 * (`tests/fixtures/events/*.json`) give the same items, with the same keys, kinds and texts, here
 * and in Python (`tests/test_kernel_transcript.py` asserts the same fixtures).
 */
import { readdirSync, readFileSync } from 'fs';
import { join } from 'path';
import { describe, expect, it } from 'vitest';

import { reduce } from '../src/reducer';
import { emptyView, Frame } from '../src/view';

const DIR = join(__dirname, '..', '..', 'tests', 'fixtures', 'events');

interface Expected {
  key: string;
  kind: string;
  text?: string;
}

const fixtures = readdirSync(DIR)
  .filter(name => name.endsWith('.json'))
  .sort()
  .map(name => ({ name, ...(JSON.parse(readFileSync(join(DIR, name), 'utf8')) as { frames: Frame[]; expect: Expected[] }) }));

describe('parity with the kernel transcript', () => {
  it('has fixtures', () => {
    expect(fixtures.length).toBeGreaterThanOrEqual(5);
  });

  for (const fixture of fixtures) {
    it(fixture.name, () => {
      const view = fixture.frames.reduce(reduce, emptyView());
      const got = view.items.map(item => {
        const out: Expected = { key: (item as { key?: string }).key ?? '(no key)', kind: item.kind };
        if (item.kind === 'user' || item.kind === 'agent' || item.kind === 'thought') {
          out.text = item.text;
        }
        return out;
      });
      expect(got).toEqual(fixture.expect);
    });
  }

  it('a replayed frame changes nothing and an unchanged item keeps its identity', () => {
    const { frames } = fixtures.find(f => f.name === 'chunks.json')!;
    let view = emptyView();
    for (const frame of frames) {
      const prev = view;
      view = reduce(view, frame);
      if (typeof frame.seq === 'number' && frame.seq <= prev.lastSeq) {
        expect(view).toBe(prev);
      }
      const kept = Math.min(prev.items.length, view.items.length) - 1;
      for (let i = 0; i < kept; i++) {
        expect(view.items[i]).toBe(prev.items[i]);
      }
    }
  });
});
