/**
 * jupyter-acp's JupyterLab plugin: the agent sidebar and its commands.
 *
 * - a left-sidebar panel (panel.ts) talking to the server extension's API under `api/acp/`;
 * - "New agent session" in the command palette;
 * - "Send selection / cell to agent" in the notebook and editor context menus, which sends to the
 *   panel's current session (opening one with the default agent when there is none).
 */

import { JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IEditorTracker } from '@jupyterlab/fileeditor';
import { INotebookTracker } from '@jupyterlab/notebook';
import { LabIcon } from '@jupyterlab/ui-components';

import { AcpPanel } from './panel';
import { selectionPrompt } from './prompt';

export { reduce, reduceAll, emptyView } from './reducer';

const ICON_SVG = `<svg xmlns="http://www.w3.org/2000/svg" width="16" height="16" viewBox="0 0 24 24">
  <g class="jp-icon3" fill="#616161">
    <path d="M12 2a2 2 0 0 1 2 2c0 .74-.4 1.39-1 1.73V7h4a3 3 0 0 1 3 3v8a3 3 0 0 1-3 3H7a3 3 0 0 1-3-3v-8a3 3 0 0 1 3-3h4V5.73A2 2 0 0 1 12 2zM9 12a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3zm6 0a1.5 1.5 0 1 0 0 3 1.5 1.5 0 0 0 0-3z"/>
  </g>
</svg>`;

export const agentIcon = new LabIcon({ name: 'jupyter-acp:agent', svgstr: ICON_SVG });

namespace CommandIDs {
  export const open = 'jupyter-acp:open';
  export const newSession = 'jupyter-acp:new-session';
  export const sendSelection = 'jupyter-acp:send-selection';
}

const plugin: JupyterFrontEndPlugin<void> = {
  id: 'jupyter-acp:plugin',
  description: 'A sidebar to chat with sandboxed coding agents (Agent Client Protocol).',
  autoStart: true,
  optional: [ICommandPalette, INotebookTracker, IEditorTracker],
  activate: (
    app: JupyterFrontEnd,
    palette: ICommandPalette | null,
    notebooks: INotebookTracker | null,
    editors: IEditorTracker | null
  ) => {
    // the agent writes files through the server, not JupyterLab's contents API: show them now
    const panel = new AcpPanel(undefined, () => {
      if (app.commands.hasCommand('filebrowser:refresh')) {
        void app.commands.execute('filebrowser:refresh');
      }
    });
    panel.title.icon = agentIcon;
    app.shell.add(panel, 'left', { rank: 900 });

    const reveal = (): void => {
      app.shell.activateById(panel.id);
    };

    app.commands.addCommand(CommandIDs.open, {
      label: 'Open agent panel',
      caption: 'Show the coding agents sidebar',
      execute: reveal
    });

    app.commands.addCommand(CommandIDs.newSession, {
      label: 'New agent session',
      caption: 'Start a session with a coding agent in the sidebar',
      icon: agentIcon,
      execute: async args => {
        reveal();
        await panel.refresh();
        await panel.newSession(typeof args.agent === 'string' ? args.agent : undefined);
      }
    });

    app.commands.addCommand(CommandIDs.sendSelection, {
      label: 'Send selection / cell to agent',
      caption: 'Send the selected text (or the whole cell / file) to the current agent session',
      icon: agentIcon,
      isEnabled: () => selectionPrompt(app.shell.currentWidget, notebooks, editors) !== null,
      execute: async () => {
        const text = selectionPrompt(app.shell.currentWidget, notebooks, editors);
        if (text === null) {
          return;
        }
        reveal();
        if (!panel.connection) {
          await panel.refresh();
        }
        await panel.sendText(text);
      }
    });

    if (palette) {
      const category = 'Coding agents';
      palette.addItem({ command: CommandIDs.newSession, category });
      palette.addItem({ command: CommandIDs.open, category });
      palette.addItem({ command: CommandIDs.sendSelection, category });
    }
    app.contextMenu.addItem({ command: CommandIDs.sendSelection, selector: '.jp-Notebook .jp-Cell', rank: 20 });
    app.contextMenu.addItem({ command: CommandIDs.sendSelection, selector: '.jp-FileEditor', rank: 20 });
  }
};

export default plugin;
