/**
 * The view of each kind of chat item (reducer.ts's ChatItem), for the keyed log (log.ts).
 */

import type { ItemView } from '../log';
import type { ChatItem } from '../view';
import type { ItemContext } from './context';
import { StreamedView, UserView } from './message';
import { drawError, drawNotice, drawPermission, drawPlan, drawTurn, RedrawView } from './misc';
import { NotebookEditView, ToolView } from './tool';

export type { EditActions, ItemContext } from './context';
export { attachmentChips } from './message';
export { drawEdit } from './tool';

/** A new view for `item` (the log calls its `update` with later versions of the same key). */
export function createItemView(item: ChatItem, ctx: ItemContext): ItemView<ChatItem> {
  switch (item.kind) {
    case 'user':
      return new UserView(item) as ItemView<ChatItem>;
    case 'agent':
    case 'thought':
      return new StreamedView(item, ctx) as ItemView<ChatItem>;
    case 'tool':
      return new ToolView(item, ctx) as ItemView<ChatItem>;
    case 'notebookEdit':
      return new NotebookEditView(item, ctx) as ItemView<ChatItem>;
    case 'plan':
      return new RedrawView(item, drawPlan) as ItemView<ChatItem>;
    case 'permission':
      return new RedrawView(item, i => drawPermission(i, ctx)) as ItemView<ChatItem>;
    case 'turn':
      return new RedrawView(item, drawTurn) as ItemView<ChatItem>;
    case 'error':
      return new RedrawView(item, drawError) as ItemView<ChatItem>;
    case 'notice':
      return new RedrawView(item, drawNotice) as ItemView<ChatItem>;
  }
}
