/**
 * The composer's completions: slash commands at the start of the input, `@` file mentions
 * anywhere after whitespace, and what picking one writes into the input.
 */
import { describe, expect, it } from 'vitest';

import { applyChoice, completionAt, matchCommands, mentionText } from '../src/completion';

describe('completionAt', () => {
  it('completes a command only at the very start, while the caret is in its word', () => {
    expect(completionAt('/rec', 4)).toEqual({ kind: 'command', query: 'rec', start: 0, end: 4 });
    expect(completionAt('/', 1)).toEqual({ kind: 'command', query: '', start: 0, end: 1 });
    expect(completionAt('/recall now', 11)).toBeNull(); // past the command's word
    expect(completionAt(' /rec', 5)).toBeNull();
    expect(completionAt('see /rec', 8)).toBeNull();
    // the caret inside the word: the rest of it is replaced too
    expect(completionAt('/recxx', 3)).toEqual({ kind: 'command', query: 're', start: 0, end: 6 });
  });

  it('completes a mention after the start or whitespace, plain or quoted', () => {
    expect(completionAt('@no', 3)).toEqual({ kind: 'file', query: 'no', start: 0, end: 3 });
    expect(completionAt('look at @src/ma', 15)).toEqual({ kind: 'file', query: 'src/ma', start: 8, end: 15 });
    expect(completionAt('mail a@b.c', 10)).toBeNull();
    expect(completionAt('read @"my fi', 12)).toEqual({ kind: 'file', query: 'my fi', start: 5, end: 12 });
    expect(completionAt('read @"my file.txt" x', 19)).toBeNull(); // closed: done
    expect(completionAt('@a.txt and more', 15)).toBeNull();
  });
});

describe('matchCommands', () => {
  const commands = [
    { name: 'write', description: 'write a file', hint: 'path text' },
    { name: 'recall', description: 'what you said' },
    { name: 'read', description: 'read a file' }
  ];
  it('puts name prefixes first, then other names containing the query', () => {
    expect(matchCommands(commands, 're').map(c => c.value)).toEqual(['recall', 'read']);
    expect(matchCommands(commands, 'it').map(c => c.value)).toEqual(['write']);
    expect(matchCommands(commands, '').map(c => c.value)).toEqual(['write', 'recall', 'read']);
    expect(matchCommands(commands, 'wr')[0].detail).toBe('write a file (path text)');
  });
});

describe('applyChoice', () => {
  it('writes the command with a space after it', () => {
    const q = completionAt('/rec', 4)!;
    expect(applyChoice('/rec', q, 'recall')).toEqual({ text: '/recall ', caret: 8 });
  });

  it('writes a file mention, quoted when the path has spaces', () => {
    const text = 'summarise @no please';
    const q = completionAt(text, 12)!;
    expect(applyChoice(text, q, 'notes.md')).toEqual({ text: 'summarise @notes.md please', caret: 20 });
    const q2 = completionAt('@my', 3)!;
    expect(applyChoice('@my', q2, 'my file.txt')).toEqual({ text: '@"my file.txt" ', caret: 15 });
    const q3 = completionAt('@"my f', 6)!;
    expect(applyChoice('@"my f', q3, 'my file.txt').text).toBe('@"my file.txt" ');
  });

  it('leaves a directory open so its completion goes on', () => {
    const q = completionAt('@sr', 3)!;
    const next = applyChoice('@sr', q, 'src/');
    expect(next).toEqual({ text: '@src/', caret: 5 });
    expect(completionAt(next.text, next.caret)).toEqual({ kind: 'file', query: 'src/', start: 0, end: 5 });
    expect(mentionText('a b/', true)).toBe('@"a b/');
  });
});
