/**
 * The chat log as a keyed list of nodes, updated in place from each new view.
 *
 * Every chat item has a stable `key`, and an item that did not change keeps its object identity
 * (reducer.ts). So one walk over the items finds the few that changed: a new key gets a node,
 * inserted where it belongs; a known key with a new object has its node patched in place by its
 * view; a key that is gone (an edit adopted into its tool card) loses its node. Nodes of items
 * that did not change are never touched, so a text selection, an open `<details>` or the focus
 * anywhere in the log survive while a reply streams, and the work per update does not grow with
 * the text of the conversation.
 */

/** The DOM of one item: made once, then patched. */
export interface ItemView<T> {
  readonly node: HTMLElement;
  /** Show `item` (the same key as before, a new object). */
  update(item: T): void;
  /** The item is not streaming any more (a later item came, or the turn ended): finish it. */
  settle?(): void;
  dispose?(): void;
}

interface Entry<T> {
  item: T;
  view: ItemView<T>;
}

export class ChatLog<T extends { key: string }> {
  private readonly _entries = new Map<string, Entry<T>>();
  private _items: readonly T[] = [];
  /** Entries whose view still has to settle (those streaming, or made while streaming). */
  private readonly _unsettled = new Set<Entry<T>>();

  /**
   * @param host the element whose children the log manages; nodes it does not know (e.g. a
   * "working…" row) must come after all items
   * @param create the view of a new item
   */
  constructor(
    readonly host: HTMLElement,
    private readonly _create: (item: T) => ItemView<T>
  ) {}

  /** How many items are shown. */
  get size(): number {
    return this._entries.size;
  }

  /** The node of the item `key` (undefined: not shown). */
  nodeOf(key: string): HTMLElement | undefined {
    return this._entries.get(key)?.view.node;
  }

  /**
   * Show `items`. `streaming`: the last item may still change (a turn is running), so it is not
   * settled yet; every other item is settled once.
   */
  update(items: readonly T[], streaming = false): void {
    if (items !== this._items) {
      this._reconcile(items);
      this._items = items;
    }
    const last = items.length ? this._entries.get(items[items.length - 1].key) : undefined;
    for (const entry of [...this._unsettled]) {
      if (!(streaming && entry === last)) {
        this._unsettled.delete(entry);
        entry.view.settle?.();
      }
    }
  }

  /** Patch the items that `which` selects again (state held outside the view changed, e.g. an undo). */
  refresh(which: (item: T) => boolean): void {
    for (const entry of this._entries.values()) {
      if (which(entry.item)) {
        entry.view.update(entry.item);
      }
    }
  }

  /** Forget every item and remove its node. */
  clear(): void {
    for (const entry of this._entries.values()) {
      entry.view.node.remove();
      entry.view.dispose?.();
    }
    this._entries.clear();
    this._unsettled.clear();
    this._items = [];
  }

  private _reconcile(items: readonly T[]): void {
    // the common case while a reply streams: the earlier items are the very same objects and
    // only the last one changed, or new ones came after it; then only those are visited
    const old = this._items;
    let same = 0;
    const n = Math.min(old.length, items.length);
    while (same < n && items[same] === old[same]) {
      same++;
    }
    if (same === old.length || (same === old.length - 1 && same < items.length && items[same].key === old[same].key)) {
      let prev: Node | null = same ? this._entries.get(items[same - 1].key)!.view.node : null;
      for (let i = same; i < items.length; i++) {
        prev = this._place(items[i], prev);
      }
      return;
    }
    // removals first, so that no stale node sits between two items that stay (moving a node
    // that stays would lose a selection in it)
    if (this._entries.size) {
      const keep = new Set<string>();
      for (const item of items) {
        keep.add(item.key);
      }
      for (const [key, entry] of this._entries) {
        if (!keep.has(key)) {
          entry.view.node.remove();
          entry.view.dispose?.();
          this._entries.delete(key);
          this._unsettled.delete(entry);
        }
      }
    }
    let prev: Node | null = null;
    for (const item of items) {
      prev = this._place(item, prev);
    }
  }

  /** Show `item` right after `prev` (null: first): made, patched or left alone, and moved
   * there only if it is not there already. Returns its node. */
  private _place(item: T, prev: Node | null): Node {
    let entry = this._entries.get(item.key);
    if (!entry) {
      entry = { item, view: this._create(item) };
      this._entries.set(item.key, entry);
      if (entry.view.settle) {
        this._unsettled.add(entry);
      }
    } else if (entry.item !== item) {
      entry.item = item;
      entry.view.update(item);
      if (entry.view.settle) {
        this._unsettled.add(entry);
      }
    }
    const node = entry.view.node;
    const want: Node | null = prev ? prev.nextSibling : this.host.firstChild;
    if (want !== node) {
      this.host.insertBefore(node, want);
    }
    return node;
  }
}
