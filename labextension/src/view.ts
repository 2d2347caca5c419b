/**
 * The shape of what the panel draws for one session: its chat items and the session's state
 * (`SessionView`), and the frames it is made from. Only types and the empty view: the reducer
 * (reducer.ts) is the one function that makes a view from frames.
 */

import type { NotebookEdit } from './notebookEdits';
import type { TerminalState } from './terminals';

export type { NotebookEdit } from './notebookEdits';
export type { TerminalState } from './terminals';

export interface TokenCounts {
  input_tokens: number;
  output_tokens: number;
  total_tokens: number;
}

export interface PermissionOption {
  optionId: string;
  name: string;
  kind: string;
}

export interface DiffContent {
  type: 'diff';
  path: string;
  oldText: string | null;
  newText: string;
}

export interface TextContent {
  type: 'text';
  text: string;
}

export interface TerminalContent {
  type: 'terminal';
  terminalId: string;
}

export type ToolContent = DiffContent | TextContent | TerminalContent;


export interface PlanEntry {
  content: string;
  priority: string;
  status: string;
}

export interface Mode {
  id: string;
  name: string;
  description?: string | null;
}

/** What the server attached to a prompt (`@path` mentions it resolved, images). */
export interface Attachment {
  type: string; // resource | resource_link | image
  name: string;
  uri?: string;
  mime_type?: string;
  size: number;
}

/** A slash command of the agent (`name` has no slash; `hint` describes its input, if any). */
export interface Command {
  name: string;
  description: string;
  hint?: string;
}

export interface ModelState {
  configId: string;
  current: string;
  available: { value: string; name: string; description: string }[];
}

/**
 * One entry of the chat. `key` is stable for the item's whole life (see the table in
 * docs/plan: `u:<seq>`, `a:<seq>`, `tool:<toolCallId>`, …), so the log can patch its node in
 * place; an item that did not change keeps its object identity from one view to the next.
 */
export type ChatItem =
  | { kind: 'user'; key: string; text: string; turn: number | null; attachments?: Attachment[] }
  | { kind: 'agent'; key: string; text: string }
  | { kind: 'thought'; key: string; text: string }
  | {
      kind: 'tool';
      key: string;
      toolCallId: string;
      title: string;
      toolKind: string;
      status: string;
      content: ToolContent[];
      locations: string[];
      /** `_meta.toolName` (e.g. mcp__jupyter__insert_cell), "" when the agent gives none */
      toolName: string;
      /** The call's arguments, once known (Qwen sends `{}` first, the permission has them). */
      args: Record<string, unknown> | null;
      /** `rawOutput` as text (bounded), to find the notebook edits the output names. */
      output: string;
      /** The notebook edits this call made (matched by the `edit_id` its output names). */
      edits: NotebookEdit[];
    }
  | { kind: 'plan'; key: string; entries: PlanEntry[] }
  | { kind: 'notebookEdit'; key: string; edit: NotebookEdit }
  | {
      kind: 'permission';
      key: string;
      requestId: string;
      title: string;
      toolKind: string;
      /** Code to show before the answer (a notebook run's code, a cell's new source), or null. */
      code: string | null;
      options: PermissionOption[];
      resolved: null | { outcome: string; optionId: string | null; by: string };
    }
  | { kind: 'turn'; key: string; stopReason: string; totalTokens: number; duration: number | null }
  | { kind: 'error'; key: string; message: string }
  | { kind: 'notice'; key: string; text: string };

export interface SessionView {
  /** The session's id and agent from the `hello` frame (null before it). */
  id: string | null;
  agent: string;
  agentDisplayName: string;
  /** The session's workspace on the server (absolute), to show paths relative to it. */
  workspace: string;
  state: string;
  error: string | null;
  items: ChatItem[];
  /** The highest `seq` applied: reconnect with `?since=lastSeq`. */
  lastSeq: number;
  /** `last_seq` of the latest `hello`: turns up to it are already in `tokens`. */
  helloSeq: number;
  /** True between `hello` and `history:end`. */
  replaying: boolean;
  /** The session's token totals (server totals at `hello` plus the turns ended since). */
  tokens: TokenCounts;
  turns: number;
  context: { used: number | null; size: number | null } | null;
  currentMode: string | null;
  modes: Mode[];
  commands: Command[];
  /** The first line of the first prompt ("" before it). */
  title: string;
  /** What the agent accepts in a prompt besides text. */
  promptCapabilities: { image: boolean; audio: boolean; embeddedContext: boolean };
  /** The model choice (null when the agent offers none). */
  models: ModelState | null;
  /** How the last resume brought the agent back (null: never resumed). */
  restore: string | null;
  /** Request ids of the permission prompts still waiting for an answer. */
  pendingPermissions: string[];
  /** True while a turn runs (state `busy`). */
  busy: boolean;
  /** The latest output of each terminal the agent ran (tool cards show the one they reference). */
  terminals: Record<string, TerminalState>;
}

export function emptyView(): SessionView {
  return {
    id: null,
    agent: '',
    agentDisplayName: '',
    workspace: '',
    state: 'unknown',
    error: null,
    items: [],
    lastSeq: 0,
    helloSeq: 0,
    replaying: false,
    tokens: { input_tokens: 0, output_tokens: 0, total_tokens: 0 },
    turns: 0,
    context: null,
    currentMode: null,
    modes: [],
    commands: [],
    title: '',
    promptCapabilities: { image: false, audio: false, embeddedContext: false },
    models: null,
    restore: null,
    pendingPermissions: [],
    busy: false,
    terminals: {}
  };
}

/** One frame from the session WebSocket (an event with `seq`, or a control frame without). */
export interface Frame {
  type: string;
  seq?: number;
  time?: number;
  data?: any;
}

/** A chat item of kind `tool`. */
export type ToolItem = Extract<ChatItem, { kind: 'tool' }>;
