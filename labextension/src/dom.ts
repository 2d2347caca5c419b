/**
 * A tiny DOM builder shared by the panel's modules: text children are always text nodes, never
 * HTML (agent text is untrusted; Markdown goes through JupyterLab's sanitizer: render/markdown.ts).
 */

export type Attrs = Record<string, string | boolean | ((ev: Event) => void) | undefined>;

export function h(tag: string, attrs: Attrs = {}, ...children: (Node | string | null | undefined)[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === false) {
      continue;
    }
    if (typeof value === 'function') {
      el.addEventListener(key.replace(/^on/, ''), value);
    } else if (key === 'className') {
      el.className = String(value);
    } else {
      el.setAttribute(key, value === true ? '' : value);
    }
  }
  for (const child of children) {
    if (child !== null && child !== undefined) {
      el.append(child);
    }
  }
  return el;
}

/** `path` relative to the session's workspace when inside it (shorter, and what the file browser shows). */
export function displayPath(path: string, workspace: string): string {
  const root = workspace.replace(/\/+$/, '');
  return root && path.startsWith(root + '/') ? path.slice(root.length + 1) : path;
}

/** A byte count for people: "812 B", "4.2 KB", "1.3 MB". */
export function formatBytes(n: number): string {
  if (n < 1024) {
    return `${n} B`;
  }
  if (n < 1024 * 1024) {
    return `${(n / 1024).toFixed(1)} KB`;
  }
  return `${(n / 1024 / 1024).toFixed(1)} MB`;
}

/** `source` as text in a block, its lines kept: Markdown shown without a renderer (or when a
 * render failed). Never HTML. */
export function plainBlock(source: string): HTMLElement {
  return h('div', {}, h('p', { style: 'white-space: pre-wrap' }, source));
}
