/**
 * "My sessions" in the sidebar: live and suspended ones, the most recently used first, each with
 * its title, agent, state and last activity, and Close (suspend: the agent stops, the session
 * stays resumable) and Delete (forget it and its history) actions.
 */

import { deleteIcon, LabIcon, pauseIcon } from '@jupyterlab/ui-components';

import { SessionInfo } from './api';
import { h } from './dom';

/** A session's action: an icon button with its label for screen readers and its tooltip. */
function iconButton(className: string, icon: LabIcon, label: string, title: string, onclick: () => void): HTMLElement {
  return h('button', { className, title, 'aria-label': label, onclick },
    icon.element({ tag: 'span', className: 'jp-AcpPanel-icon' }));
}

/** States in which a session has an agent running (Close applies). */
const LIVE = new Set(['starting', 'ready', 'busy']);

export interface SessionActions {
  open(id: string): void;
  close(id: string): void;
  remove(id: string): void;
}

/** The most recently active first. */
export function sortSessions(sessions: SessionInfo[]): SessionInfo[] {
  return sessions.slice().sort((a, b) => (b.last_activity ?? 0) - (a.last_activity ?? 0));
}

/** "just now", "5 min ago", "3 h ago", "2 days ago", then the date. */
export function ago(seconds: number, now = Date.now() / 1000): string {
  const d = Math.max(0, now - seconds);
  if (d < 60) {
    return 'just now';
  }
  if (d < 3600) {
    return `${Math.floor(d / 60)} min ago`;
  }
  if (d < 86400) {
    return `${Math.floor(d / 3600)} h ago`;
  }
  if (d < 7 * 86400) {
    const days = Math.floor(d / 86400);
    return `${days} day${days === 1 ? '' : 's'} ago`;
  }
  return new Date(seconds * 1000).toLocaleDateString();
}

export function drawSessionList(
  list: HTMLElement,
  sessions: SessionInfo[],
  current: string | null,
  actions: SessionActions
): void {
  list.replaceChildren(
    ...sortSessions(sessions).map(s => {
      const title = s.title || 'New session';
      const live = LIVE.has(s.state);
      return h(
        'li',
        {
          className:
            'jp-AcpPanel-session' +
            (s.id === current ? ' jp-mod-current' : '') +
            (s.state === 'suspended' ? ' jp-mod-suspended' : ''),
          'data-session-id': s.id,
          'data-state': s.state,
          title: `${title}\nStarted ${new Date(s.created * 1000).toLocaleString()} in /${s.cwd ?? ''}`
        },
        h(
          'button',
          {
            className: 'jp-AcpPanel-sessionOpen',
            title: s.state === 'suspended' ? 'Reopen this session (its agent is started again)' : 'Show this session',
            onclick: () => actions.open(s.id)
          },
          h(
            'span',
            { className: 'jp-AcpPanel-sessionHead' },
            h('span', { className: 'jp-AcpPanel-sessionTitle' }, title),
            h(
              'span',
              {
                className: 'jp-AcpPanel-sessionTime',
                title: `Last activity ${new Date(s.last_activity * 1000).toLocaleString()}`
              },
              ago(s.last_activity)
            )
          ),
          h(
            'span',
            { className: 'jp-AcpPanel-sessionMeta' },
            h('span', { className: `jp-AcpPanel-sessionState jp-AcpState-${s.state}` }, s.state),
            ' · ',
            h('span', { className: 'jp-AcpPanel-sessionAgent' }, s.agent_display_name || s.agent)
          )
        ),
        live
          ? iconButton('jp-AcpPanel-sessionClose', pauseIcon, 'Close session',
              'Close: stop the agent, keep the session to reopen later', () => actions.close(s.id))
          : null,
        iconButton('jp-AcpPanel-sessionDelete', deleteIcon, 'Delete session',
          'Delete: stop the agent and forget this session and its history', () => actions.remove(s.id))
      );
    })
  );
}
