/**
 * The session event reducer: WebSocket frames (docs/api.md) → the state the panel draws
 * (its shape, `SessionView`, is view.ts).
 *
 * Kept pure (no DOM, no JupyterLab) so that what the user sees for a given stream of events is
 * unit-tested without a browser, and so that a reconnect can replay history through the same
 * function: events whose `seq` was already applied are ignored, which makes replays idempotent.
 */

import {
  adoptEdits,
  applyNotebookEdit,
  NOTEBOOK_TOOL_PREFIX,
  notebookToolTitle,
  outputText,
  permissionCode,
  str,
  toolName
} from './notebookEdits';
import { applyTerminalOutput } from './terminals';
import {
  Attachment,
  ChatItem,
  Command,
  Frame,
  ModelState,
  PlanEntry,
  SessionView,
  ToolContent,
  ToolItem
} from './view';

export { notebookToolTitle } from './notebookEdits';

/** What the chat shows where the server's history had dropped older events. */
export const TRUNCATED_NOTICE = 'Older messages were dropped by the server';

const num = (v: unknown): number => (typeof v === 'number' && isFinite(v) ? v : 0);

const nonEmpty = (v: unknown): Record<string, unknown> | null =>
  v && typeof v === 'object' && !Array.isArray(v) && Object.keys(v).length ? (v as Record<string, unknown>) : null;

function toolTitle(call: any, args: Record<string, unknown> | null = nonEmpty(call?.rawInput)): string {
  const name = toolName(call);
  if (name.startsWith(NOTEBOOK_TOOL_PREFIX)) {
    return notebookToolTitle(name.slice(NOTEBOOK_TOOL_PREFIX.length), args);
  }
  return str(call?.title, str(call?.toolCallId, 'tool call'));
}


function normaliseContent(raw: unknown): ToolContent[] {
  if (!Array.isArray(raw)) {
    return [];
  }
  const out: ToolContent[] = [];
  for (const c of raw) {
    if (c?.type === 'diff') {
      out.push({
        type: 'diff',
        path: str(c.path),
        oldText: typeof c.oldText === 'string' ? c.oldText : null,
        newText: str(c.newText)
      });
    } else if (c?.type === 'content' && c.content?.type === 'text') {
      out.push({ type: 'text', text: str(c.content.text) });
    } else if (c?.type === 'terminal') {
      out.push({ type: 'terminal', terminalId: str(c.terminalId) });
    }
  }
  return out;
}

function locations(raw: unknown): string[] {
  if (!Array.isArray(raw)) {
    return [];
  }
  const all = raw.map(l => (l?.line ? `${str(l.path)}:${l.line}` : str(l?.path))).filter(Boolean);
  return [...new Set(all)];
}

/** Text of a content block (`{"type": "text", "text"}`); other kinds show as a placeholder. */
function blockText(content: any): string {
  if (content?.type === 'text') {
    return str(content.text);
  }
  if (content?.type === 'resource_link') {
    return `[${str(content.name, str(content.uri))}](${str(content.uri)})`;
  }
  return content?.type ? `[${content.type}]` : '';
}

/** Append streamed text to the last item when it is of the same kind, else start a new one. */
function appendChunk(items: ChatItem[], kind: 'agent' | 'thought', text: string, seq: number): ChatItem[] {
  if (!text) {
    return items; // e.g. Qwen Code's empty chunks that only carry `_meta.usage`
  }
  const last = items[items.length - 1];
  if (last && last.kind === kind) {
    return [...items.slice(0, -1), { ...last, text: last.text + text }];
  }
  return [...items, { kind, key: `${kind === 'agent' ? 'a' : 't'}:${seq}`, text }];
}

/** The streamed text updates, and the kind of item each one grows. */
const CHUNK_KINDS: Record<string, 'agent' | 'thought'> = {
  agent_message_chunk: 'agent',
  agent_thought_chunk: 'thought'
};

function applyUpdate(view: SessionView, u: any, seq: number): SessionView {
  switch (u?.sessionUpdate) {
    case 'agent_message_chunk':
    case 'agent_thought_chunk':
      return { ...view, items: appendChunk(view.items, CHUNK_KINDS[u.sessionUpdate], blockText(u.content), seq) };
    case 'user_message_chunk':
      return view; // our own prompts arrive as `chat:message`
    case 'tool_call': {
      const id = str(u.toolCallId);
      const at = view.items.findIndex(i => i.kind === 'tool' && i.toolCallId === id);
      const old = at >= 0 ? (view.items[at] as ToolItem) : null;
      const args = nonEmpty(u.rawInput) ?? old?.args ?? null;
      const item: ToolItem = {
        kind: 'tool',
        key: `tool:${id}`,
        toolCallId: id,
        title: toolTitle(u, args),
        toolKind: str(u.kind, 'other'),
        status: str(u.status, 'pending'),
        content: normaliseContent(u.content),
        locations: locations(u.locations),
        toolName: toolName(u),
        args,
        output: outputText(u.rawOutput),
        edits: old?.edits ?? []
      };
      const items = view.items.slice();
      if (at >= 0) {
        items[at] = item;
      } else {
        items.push(item);
      }
      return { ...view, items: adoptEdits(items, at >= 0 ? at : items.length - 1) };
    }
    case 'tool_call_update': {
      const id = str(u.toolCallId);
      const at = view.items.findIndex(i => i.kind === 'tool' && i.toolCallId === id);
      if (at < 0) {
        return applyUpdate(view, { ...u, sessionUpdate: 'tool_call' }, seq);
      }
      const old = view.items[at] as ToolItem;
      const items = view.items.slice();
      const name = toolName(u) || old.toolName;
      const args = nonEmpty(u.rawInput) ?? old.args;
      const notebook = name.startsWith(NOTEBOOK_TOOL_PREFIX);
      items[at] = {
        ...old,
        toolName: name,
        args,
        title: notebook
          ? toolTitle({ _meta: { toolName: name } }, args)
          : typeof u.title === 'string'
            ? u.title
            : old.title,
        toolKind: typeof u.kind === 'string' ? u.kind : old.toolKind,
        status: typeof u.status === 'string' ? u.status : old.status,
        content: Array.isArray(u.content) ? normaliseContent(u.content) : old.content,
        locations: Array.isArray(u.locations) ? locations(u.locations) : old.locations,
        output: u.rawOutput !== undefined ? outputText(u.rawOutput) : old.output
      };
      return { ...view, items: adoptEdits(items, at) };
    }
    case 'plan': {
      const entries: PlanEntry[] = (Array.isArray(u.entries) ? u.entries : []).map((e: any) => ({
        content: str(e?.content),
        priority: str(e?.priority, 'medium'),
        status: str(e?.status, 'pending')
      }));
      // a plan replaces the previous plan of the same turn (the protocol sends it whole)
      let lastUser = -1;
      view.items.forEach((item, i) => {
        if (item.kind === 'user') {
          lastUser = i;
        }
      });
      const at = view.items.findIndex((i, n) => n > lastUser && i.kind === 'plan');
      const items = view.items.slice();
      if (at >= 0) {
        items[at] = { kind: 'plan', key: view.items[at].key, entries };
      } else {
        items.push({ kind: 'plan', key: `plan:${seq}`, entries });
      }
      return { ...view, items };
    }
    case 'usage_update':
      return { ...view, context: { used: num(u.used), size: num(u.size) || null } };
    case 'current_mode_update':
      return { ...view, currentMode: str(u.currentModeId, view.currentMode ?? '') || null };
    case 'available_commands_update':
      return { ...view, commands: commandList(u.availableCommands) };
    case 'config_option_update': {
      // the model option changed (here or from another client): follow its current value
      const models = view.models;
      const options: any[] = Array.isArray(u.configOptions) ? u.configOptions : [];
      const option = models ? options.find(o => o?.id === models.configId) : undefined;
      const current = option?.currentValue ?? option?.current_value;
      if (!models || typeof current !== 'string' || current === models.current) {
        return view;
      }
      return { ...view, models: { ...models, current } };
    }
    default:
      return view; // session_info_update, future variants
  }
}

/** Commands from ACP (`availableCommands`, camelCase `input`) or our model (`input.hint`). */
export function commandList(raw: unknown): Command[] {
  const out: Command[] = [];
  for (const c of Array.isArray(raw) ? raw : []) {
    const name = str(c?.name).replace(/^\//, '');
    if (!name) {
      continue;
    }
    const hint = str(c?.input?.hint);
    out.push(hint ? { name, description: str(c?.description), hint } : { name, description: str(c?.description) });
  }
  return out;
}

/** The session model's `models` (null when the agent offers no model choice). */
export function modelState(raw: any): ModelState | null {
  if (!raw || typeof raw !== 'object' || !Array.isArray(raw.available)) {
    return null;
  }
  return {
    configId: str(raw.config_id),
    current: str(raw.current),
    available: raw.available.map((m: any) => ({
      value: str(m?.value),
      name: str(m?.name, str(m?.value)),
      description: str(m?.description)
    }))
  };
}

function attachments(raw: unknown): Attachment[] {
  if (!Array.isArray(raw)) {
    return [];
  }
  return raw
    .filter(a => a && typeof a === 'object')
    .map(a => {
      const out: Attachment = { type: str(a.type, 'resource'), name: str(a.name, str(a.uri)), size: num(a.size) };
      if (typeof a.uri === 'string') {
        out.uri = a.uri;
      }
      if (typeof a.mime_type === 'string') {
        out.mime_type = a.mime_type;
      }
      return out;
    });
}

function permissionItem(data: any): Extract<ChatItem, { kind: 'permission' }> {
  const requestId = str(data?.request_id);
  return {
    kind: 'permission',
    key: `perm:${requestId}`,
    requestId,
    title: toolTitle(data?.tool_call),
    toolKind: str(data?.tool_call?.kind, 'other'),
    code: permissionCode(data?.tool_call),
    options: (Array.isArray(data?.options) ? data.options : []).map((o: any) => ({
      optionId: str(o?.optionId),
      name: str(o?.name, str(o?.optionId)),
      kind: str(o?.kind)
    })),
    resolved: null
  };
}

/**
 * Give a tool card the arguments its permission request carries (Qwen's `tool_call` had
 * `rawInput: {}`), so that a notebook tool's card can say what it does.
 */
function withCallArgs(items: ChatItem[], call: any): ChatItem[] {
  const args = nonEmpty(call?.rawInput);
  const id = str(call?.toolCallId);
  const at = args && id ? items.findIndex(i => i.kind === 'tool' && i.toolCallId === id) : -1;
  if (at < 0) {
    return items;
  }
  const tool = items[at] as ToolItem;
  const name = tool.toolName || toolName(call);
  const out = items.slice();
  out[at] = {
    ...tool,
    toolName: name,
    args: tool.args ?? args,
    title: name.startsWith(NOTEBOOK_TOOL_PREFIX) ? toolTitle({ _meta: { toolName: name } }, tool.args ?? args) : tool.title
  };
  return out;
}

/** What the agent offers, from a session model (`hello`, or the answer to POST resume). */
function agentFields(view: SessionView, s: any): Partial<SessionView> {
  return {
    commands: Array.isArray(s?.available_commands) ? commandList(s.available_commands) : view.commands,
    title: str(s?.title, view.title),
    promptCapabilities: {
      image: s?.prompt_capabilities?.image === true,
      audio: s?.prompt_capabilities?.audio === true,
      embeddedContext: s?.prompt_capabilities?.embeddedContext === true
    },
    models: s && 'models' in s ? modelState(s.models) : view.models,
    restore: typeof s?.restore === 'string' ? s.restore : null
  };
}

/**
 * Take what the agent offers (modes, commands, models, prompt capabilities) from a session
 * model the REST API answered, e.g. POST resume's: a socket that connected while the agent was
 * still starting had none of it in its `hello`. The chat, seqs and tokens are the socket's.
 */
export function withSession(view: SessionView, s: any): SessionView {
  if (!s || typeof s !== 'object') {
    return view;
  }
  const modes = s.modes ?? null;
  const next: SessionView = { ...view, ...agentFields(view, s) };
  if (Array.isArray(modes?.availableModes)) {
    next.modes = modes.availableModes.map((m: any) => ({ id: str(m?.id), name: str(m?.name, str(m?.id)) }));
    next.currentMode = modes.currentModeId ?? view.currentMode;
  }
  return next;
}

/** Apply the `hello` frame: the session as it is now (totals include every turn so far). */
function applyHello(view: SessionView, s: any): SessionView {
  const tokens = s?.tokens ?? {};
  const modes = s?.modes ?? null;
  const pending: any[] = Array.isArray(s?.pending_permissions) ? s.pending_permissions : [];
  let items = view.items;
  for (const p of pending) {
    if (!items.some(i => i.kind === 'permission' && i.requestId === p.request_id)) {
      items = [...items, permissionItem(p)];
    }
  }
  return {
    ...view,
    id: str(s?.id, view.id ?? ''),
    agent: str(s?.agent),
    agentDisplayName: str(s?.agent_display_name, str(s?.agent)),
    workspace: str(s?.workspace, view.workspace),
    state: str(s?.state, view.state),
    error: s?.error ?? null,
    busy: s?.state === 'busy',
    tokens: {
      input_tokens: num(tokens.input_tokens),
      output_tokens: num(tokens.output_tokens),
      total_tokens: num(tokens.total_tokens)
    },
    turns: num(s?.turns),
    context: s?.context ? { used: s.context.used ?? null, size: s.context.size ?? null } : view.context,
    currentMode: modes?.currentModeId ?? null,
    modes: Array.isArray(modes?.availableModes)
      ? modes.availableModes.map((m: any) => ({ id: str(m?.id), name: str(m?.name, str(m?.id)) }))
      : [],
    pendingPermissions: pending.map(p => str(p?.request_id)),
    ...agentFields(view, s),
    items,
    replaying: true,
    // events up to the hello's last_seq are already in the totals above
    helloSeq: num(s?.last_seq)
  };
}

/**
 * Apply one frame. Returns a new state (the input is never changed); frames with a `seq` that
 * was already applied return the same state, so history can be replayed on every reconnect.
 */
export function reduce(view: SessionView, frame: Frame): SessionView {
  if (!frame || typeof frame.type !== 'string') {
    return view;
  }
  const data = frame.data ?? {};
  if (typeof frame.seq !== 'number') {
    switch (frame.type) {
      case 'hello':
        return applyHello(view, data);
      case 'history:end':
        return { ...view, replaying: false };
      case 'history:truncated': // the replay starts after events the server no longer keeps
        return {
          ...view,
          items: [...view.items, { kind: 'notice', key: `note:x${view.items.length}`, text: TRUNCATED_NOTICE }]
        };
      case 'error': // a reply to this socket only (bad frame, busy, quota): show it
        return {
          ...view,
          items: [...view.items, { kind: 'error', key: `err:x${view.items.length}`, message: str(data.message, 'Error') }]
        };
      default:
        return view; // pong, unknown control frames
    }
  }
  if (frame.seq <= view.lastSeq) {
    return view;
  }
  const next: SessionView = { ...view, lastSeq: frame.seq };
  switch (frame.type) {
    case 'state':
      return {
        ...next,
        state: str(data.state, view.state),
        error: data.error ?? null,
        busy: data.state === 'busy'
      };
    case 'chat:message': {
      const files = attachments(data.attachments);
      const text = str(data.text, str(data.message));
      const key = `u:${frame.seq}`;
      const item: ChatItem = files.length
        ? { kind: 'user', key, text, turn: data.turn ?? null, attachments: files }
        : { kind: 'user', key, text, turn: data.turn ?? null };
      return { ...next, title: next.title || text.split('\n')[0].slice(0, 100), items: [...next.items, item] };
    }
    case 'session/update':
      return applyUpdate(next, data, frame.seq);
    case 'permission:request': {
      const item = permissionItem(data);
      if (next.items.some(i => i.kind === 'permission' && i.requestId === item.requestId)) {
        return next; // already known from the hello's pending list
      }
      return {
        ...next,
        items: [...withCallArgs(next.items, data?.tool_call), item],
        pendingPermissions: [...next.pendingPermissions, item.requestId]
      };
    }
    case 'permission:resolved': {
      const id = str(data.request_id);
      return {
        ...next,
        pendingPermissions: next.pendingPermissions.filter(r => r !== id),
        items: next.items.map(i =>
          i.kind === 'permission' && i.requestId === id
            ? {
                ...i,
                resolved: {
                  outcome: str(data.outcome),
                  optionId: data.option_id ?? null,
                  by: str(data.by, 'user')
                }
              }
            : i
        )
      };
    }
    case 'chat:response': {
      const usage = data.usage ?? {};
      // turns ended before the hello are in its totals; count only the later ones
      const counted = frame.seq > view.helloSeq;
      const tokens = counted
        ? {
            input_tokens: next.tokens.input_tokens + num(usage.input_tokens),
            output_tokens: next.tokens.output_tokens + num(usage.output_tokens),
            total_tokens: next.tokens.total_tokens + num(usage.total_tokens)
          }
        : next.tokens;
      return {
        ...next,
        tokens,
        turns: counted ? Math.max(next.turns, num(data.turn)) : next.turns,
        busy: false,
        items: [
          ...next.items,
          {
            kind: 'turn',
            key: `turn:${frame.seq}`,
            stopReason: str(data.stop_reason, 'end_turn'),
            totalTokens: num(usage.total_tokens),
            duration: typeof data.duration === 'number' ? data.duration : null
          }
        ]
      };
    }
    case 'notebook:edit':
      return { ...next, items: applyNotebookEdit(next.items, data) };
    case 'error':
      return {
        ...next,
        items: [...next.items, { kind: 'error', key: `err:${frame.seq}`, message: str(data.message, 'Error') }]
      };
    case 'cancel':
      return { ...next, items: [...next.items, { kind: 'notice', key: `note:${frame.seq}`, text: 'Cancel requested' }] };
    case 'terminal:output':
      return applyTerminalOutput(next, data);
    default:
      return next;
  }
}

/** The kind of item a streamed text chunk frame adds to, or null for any other frame. */
function chunkKind(frame: Frame): 'agent' | 'thought' | null {
  if (frame?.type !== 'session/update' || typeof frame.seq !== 'number') {
    return null;
  }
  const update = frame.data?.sessionUpdate;
  return Object.prototype.hasOwnProperty.call(CHUNK_KINDS, update) ? CHUNK_KINDS[update] : null;
}

/**
 * Apply many frames in order (a burst from the socket, a history replay): the same view as
 * `reduce` frame by frame. A run of streamed chunks of one kind is appended at once, so the
 * items are copied once per run instead of once per chunk (a reply streamed in 2,000 chunks
 * into a long conversation used to copy its items 2,000 times).
 */
export function reduceAll(view: SessionView, frames: readonly Frame[]): SessionView {
  let i = 0;
  while (i < frames.length) {
    const kind = chunkKind(frames[i]);
    if (kind === null) {
      view = reduce(view, frames[i]);
      i++;
      continue;
    }
    let text = '';
    let first = 0; // the seq of the first chunk with text: the key of an item it starts
    let last = view.lastSeq;
    for (; i < frames.length && chunkKind(frames[i]) === kind; i++) {
      const seq = frames[i].seq as number;
      if (seq > last) {
        last = seq;
        const piece = blockText(frames[i].data.content);
        if (piece && !text) {
          first = seq;
        }
        text += piece;
      }
    }
    if (last !== view.lastSeq) {
      view = { ...view, lastSeq: last, items: appendChunk(view.items, kind, text, first) };
    }
  }
  return view;
}

/** The turn's running text for the panel's status line, e.g. "1,234 tokens". */
export function formatTokens(n: number): string {
  return `${Math.round(n).toLocaleString('en-US')} token${n === 1 ? '' : 's'}`;
}
