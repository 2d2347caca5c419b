/**
 * jupyter-acp's JupyterLab plugin: the agent sidebar and its commands.
 *
 * - a left-sidebar panel (panel.ts) talking to the server extension's API under `api/acp/`;
 * - "New agent session" in the command palette;
 * - "Send selection / cell to agent" in the notebook and editor context menus, which sends to the
 *   panel's current session (opening one with the default agent when there is none).
 *
 * What JupyterLab gives the panel: its Markdown renderers (IRenderMimeRegistry: the sanitizer,
 * MathJax, highlighting, as a Markdown cell), the notebooks (code blocks' Insert / Replace), the
 * translator (`__()` in i18n.ts), the user's settings (schema/plugin.json: default agent, send
 * key, auto-scroll) and the layout restorer (the sidebar comes back open after a reload).
 */

import { ILayoutRestorer, JupyterFrontEnd, JupyterFrontEndPlugin } from '@jupyterlab/application';
import { ICommandPalette } from '@jupyterlab/apputils';
import { IEditorTracker } from '@jupyterlab/fileeditor';
import { INotebookTracker } from '@jupyterlab/notebook';
import { IRenderMimeRegistry } from '@jupyterlab/rendermime';
import { ISettingRegistry } from '@jupyterlab/settingregistry';
import { ITranslator, nullTranslator } from '@jupyterlab/translation';
import { LabIcon } from '@jupyterlab/ui-components';

import { setSendKey } from './composer';
import { __, setTranslation } from './i18n';
import { AcpPanel } from './panel';
import { selectionPrompt } from './prompt';
import { IAcpSettings, PLUGIN_ID, readSettings } from './settings';

export { reduce, reduceAll } from './reducer';
export { emptyView } from './view';
export { DEFAULT_SETTINGS, IAcpSettings, readSettings } from './settings';

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
  id: PLUGIN_ID,
  description: 'A sidebar to chat with sandboxed coding agents (Agent Client Protocol).',
  autoStart: true,
  requires: [IRenderMimeRegistry],
  optional: [ICommandPalette, INotebookTracker, IEditorTracker, ILayoutRestorer, ITranslator, ISettingRegistry],
  activate: async (
    app: JupyterFrontEnd,
    rendermime: IRenderMimeRegistry,
    palette: ICommandPalette | null,
    notebooks: INotebookTracker | null,
    editors: IEditorTracker | null,
    restorer: ILayoutRestorer | null,
    translator: ITranslator | null,
    registry: ISettingRegistry | null
  ) => {
    translator = translator ?? nullTranslator;
    setTranslation(translator.load('jupyter_acp'));
    // the settings first (a missing or broken schema must not cost the sidebar: defaults then)
    let settings: ISettingRegistry.ISettings | null = null;
    if (registry) {
      try {
        settings = await registry.load(PLUGIN_ID);
      } catch (e) {
        console.warn('jupyter-acp: could not load the settings, using the defaults', e);
      }
    }
    const current = readSettings(settings?.composite as Partial<IAcpSettings> | undefined);
    setSendKey(current.sendKey);
    // the agent writes files through the server, not JupyterLab's contents API: show them now
    const panel = new AcpPanel({
      rendermime,
      tracker: notebooks,
      translator,
      settings: current,
      onTurnEnd: () => {
        if (app.commands.hasCommand('filebrowser:refresh')) {
          void app.commands.execute('filebrowser:refresh');
        }
      }
    });
    settings?.changed.connect(changed => {
      const next = readSettings(changed.composite as Partial<IAcpSettings>);
      setSendKey(next.sendKey);
      panel.configure(next);
    });
    panel.title.icon = agentIcon;
    app.shell.add(panel, 'left', { rank: 900 });
    // after a reload the sidebar comes back as it was (open or not); the panel reconnects itself
    restorer?.add(panel, 'jupyter-acp-panel');

    const reveal = (): void => {
      app.shell.activateById(panel.id);
    };

    app.commands.addCommand(CommandIDs.open, {
      label: __('Open agent panel'),
      caption: __('Show the coding agents sidebar'),
      execute: reveal
    });

    app.commands.addCommand(CommandIDs.newSession, {
      label: __('New agent session'),
      caption: __('Start a session with a coding agent in the sidebar'),
      icon: agentIcon,
      execute: async args => {
        reveal();
        await panel.refresh();
        await panel.newSession(typeof args.agent === 'string' ? args.agent : undefined);
      }
    });

    app.commands.addCommand(CommandIDs.sendSelection, {
      label: __('Send selection / cell to agent'),
      caption: __('Send the selected text (or the whole cell / file) to the current agent session'),
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
      const category = __('Coding agents');
      palette.addItem({ command: CommandIDs.newSession, category });
      palette.addItem({ command: CommandIDs.open, category });
      palette.addItem({ command: CommandIDs.sendSelection, category });
    }
    app.contextMenu.addItem({ command: CommandIDs.sendSelection, selector: '.jp-Notebook .jp-Cell', rank: 20 });
    app.contextMenu.addItem({ command: CommandIDs.sendSelection, selector: '.jp-FileEditor', rank: 20 });
  }
};

export default plugin;
