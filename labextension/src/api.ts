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

  createSession(agent: string | null, fresh: boolean): Promise<SessionInfo> {
    const body: Record<string, unknown> = { new: fresh };
    if (agent) {
      body.agent = agent;
    }
    return this.request('POST', ['sessions'], body);
  }

  deleteSession(id: string): Promise<void> {
    return this.request('DELETE', ['sessions', id]);
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
