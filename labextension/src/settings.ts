/**
 * The user's settings of the sidebar (schema/plugin.json, in JupyterLab's Settings Editor):
 * the agent "New session" starts, the key that sends, and whether the chat follows a reply.
 * Read with defaults for anything missing or invalid, so a hand-edited setting never breaks
 * the panel.
 */

import type { SendKey } from './composer';

export const PLUGIN_ID = 'jupyter-acp:plugin';

export interface IAcpSettings {
  /** The agent "New session" starts ('' = the server's default). */
  defaultAgent: string;
  sendKey: SendKey;
  autoScroll: boolean;
}

export const DEFAULT_SETTINGS: IAcpSettings = { defaultAgent: '', sendKey: 'Enter', autoScroll: true };

/** The settings as saved (`ISettings.composite`), with defaults for what is missing or invalid. */
export function readSettings(composite: Partial<Record<keyof IAcpSettings, unknown>> | null | undefined): IAcpSettings {
  const c = composite ?? {};
  return {
    defaultAgent: typeof c.defaultAgent === 'string' ? c.defaultAgent.trim() : DEFAULT_SETTINGS.defaultAgent,
    sendKey: c.sendKey === 'Mod-Enter' ? 'Mod-Enter' : 'Enter',
    autoScroll: typeof c.autoScroll === 'boolean' ? c.autoScroll : DEFAULT_SETTINGS.autoScroll
  };
}
