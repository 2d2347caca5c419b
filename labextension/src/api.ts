/**
 * The browser side of the jupyter-acp HTTP API (docs/api.md).
 *
 * REST goes through JupyterLab's `ServerConnection.makeRequest`, which adds the XSRF header and
 * the cookies (or the token) exactly like JupyterLab's own services do. The session socket is
 * a plain WebSocket on `settings.wsUrl`; browsers cannot set headers on it, so the token (when
 * JupyterLab was opened with one) goes in the query string, as JupyterLab's kernels do.
 */

import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

export interface AgentInfo {
  name: string;
  display_name: string;
  description: string;
  demo: boolean;
  capabilities: string[];
  available: boolean;
  reason: string;
  default: boolean;
  source: string;
}

export interface AgentList {
  agents: AgentInfo[];
  default: string | null;
  backends: { kind: string; available: boolean; reason: string }[];
}

export interface SessionInfo {
  id: string;
  agent: string;
  agent_display_name: string;
  state: string;
  error: string | null;
  created: number;
  last_activity: number;
  turns: number;
  tokens: { input_tokens: number; output_tokens: number; total_tokens: number };
  cwd: string;
  sandbox: string | null;
  last_seq: number;
  /** The first line of the first prompt ("" before it). */
  title?: string;
  /** Stored and resumable (true for `suspended` sessions). */
  resumable?: boolean;
  restore?: 'resume' | 'load' | 'fresh' | null;
  available_commands?: CommandInfo[];
  prompt_capabilities?: PromptCapabilities;
  models?: ModelChoice | null;
}

/** A slash command the agent advertises (name without the slash). */
export interface CommandInfo {
  name: string;
  description: string;
  input?: { hint?: string } | null;
}

export interface PromptCapabilities {
  image: boolean;
  audio: boolean;
  embeddedContext: boolean;
}

/** The agent's `model` config option, narrowed to what the admin allows. */
export interface ModelChoice {
  config_id: string;
  current: string;
  available: { value: string; name: string; description?: string | null }[];
}

/** An image sent with a prompt (base64 without the `data:` prefix). */
export interface ImageBlock {
  mime_type: string;
  data: string;
}

export interface UsageInfo {
  user: string | null;
  today: { day: string; total_tokens: number };
  quota: { max_tokens_per_day: number; used_today: number; remaining: number | null };
}

/** An API error carrying the server's sentence for the user (`message`) and the status. */
export class AcpApiError extends Error {
  constructor(
    message: string,
    readonly status: number
  ) {
    super(message);
    this.name = 'AcpApiError';
  }
}

/** Turn an error answer into a sentence a person understands (the API's `message` first). */
export async function errorFromResponse(response: Response): Promise<AcpApiError> {
  let message = '';
  try {
    const body = await response.json();
    message = typeof body?.message === 'string' ? body.message : '';
  } catch {
    // not JSON (a proxy's page): fall back to the status text below
  }
  if (!message) {
    message =
      response.status === 403 || response.status === 401
        ? 'You are not allowed to do this (are you still logged in?)'
        : `The server answered ${response.status} ${response.statusText}`.trim();
  }
  return new AcpApiError(message, response.status);
}

export class AcpApi {
  readonly settings: ServerConnection.ISettings;

  constructor(settings?: ServerConnection.ISettings) {
    this.settings = settings ?? ServerConnection.makeSettings();
  }

  url(...parts: string[]): string {
    return URLExt.join(this.settings.baseUrl, 'api/acp', ...parts.map(encodeURIComponent));
  }

  async request<T>(method: string, parts: string[], body?: unknown, query = ''): Promise<T> {
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.body = JSON.stringify(body);
      init.headers = { 'Content-Type': 'application/json' };
    }
    let response: Response;
    try {
      response = await ServerConnection.makeRequest(this.url(...parts) + query, init, this.settings);
    } catch (e) {
      throw new AcpApiError('The Jupyter server cannot be reached; check your connection', 0);
    }
    if (!response.ok) {
      throw await errorFromResponse(response);
    }
    if (response.status === 204) {
      return undefined as T;
    }
    return (await response.json()) as T;
  }

  agents(): Promise<AgentList> {
    return this.request('GET', ['agents']);
  }

  async sessions(): Promise<SessionInfo[]> {
    return (await this.request<{ sessions: SessionInfo[] }>('GET', ['sessions'])).sessions;
  }

  session(id: string): Promise<SessionInfo> {
    return this.request('GET', ['sessions', id]);
  }

  createSession(agent: string | null, fresh: boolean): Promise<SessionInfo> {
    const body: Record<string, unknown> = { new: fresh };
    if (agent) {
      body.agent = agent;
    }
    return this.request('POST', ['sessions'], body);
  }

  /** Forget a session (live or suspended): agent stopped, stored history removed. */
  deleteSession(id: string): Promise<void> {
    return this.request('DELETE', ['sessions', id]);
  }

  /** Bring a suspended session back (a live one is returned as is). */
  resumeSession(id: string): Promise<SessionInfo> {
    return this.request('POST', ['sessions', id, 'resume'], {});
  }

  /** End the agent but keep the session resumable (`suspended`). */
  closeSession(id: string): Promise<SessionInfo> {
    return this.request('POST', ['sessions', id, 'close'], {});
  }

  /** Workspace paths starting with `prefix` (directories end with "/"), for `@` completion. */
  async files(id: string, prefix: string): Promise<string[]> {
    const query = `?prefix=${encodeURIComponent(prefix)}`;
    return (await this.request<{ files: string[] }>('GET', ['sessions', id, 'files'], undefined, query)).files ?? [];
  }

  setModel(id: string, model: string): Promise<ModelChoice> {
    return this.request('POST', ['sessions', id, 'model'], { model });
  }

  /**
   * Revert one edit of the agent's notebook tools. 409 (an AcpApiError) when the cell changed
   * since; its message says why. The session's `notebook:edit` event then marks it undone.
   */
  undoNotebookEdit(id: string, editId: string): Promise<{ undone: string; record: unknown }> {
    return this.request('POST', ['sessions', id, 'notebook-edits', editId, 'undo'], {});
  }

  usage(): Promise<UsageInfo> {
    return this.request('GET', ['usage']);
  }

  /** The session socket's URL; `since` replays only the events after it. */
  socketUrl(id: string, since: number): string {
    const wsBase = this.settings.wsUrl;
    const url = URLExt.join(wsBase, 'api/acp/sessions', encodeURIComponent(id), 'ws');
    // batch=1: a burst of events comes as one frame, an array (connection.ts unpacks it)
    const query: string[] = ['batch=1'];
    if (since > 0) {
      query.push(`since=${since}`);
    }
    if (this.settings.token) {
      query.push(`token=${encodeURIComponent(this.settings.token)}`);
    }
    return `${url}?${query.join('&')}`;
  }
}
