// ChatPanel front end (anywidget ESM, no build step). The kernel sends only what is new:
// "snapshot" once per view, then "user", "attachments" (what went with the prompt: @file
// mentions, one line each), "delta" (reply text), "tool", "done", "error".

function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

// Safe Markdown: everything escaped first; then fenced code, inline code, bold, paragraphs.
export function renderMarkdown(text) {
  const parts = String(text).split(/```/);
  return parts
    .map((part, i) => {
      if (i % 2 === 1) {
        return `<pre><code>${escapeHtml(part.replace(/^[^\n]*\n/, ""))}</code></pre>`;
      }
      return escapeHtml(part)
        .replace(/`([^`]+)`/g, "<code>$1</code>")
        .replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
        .split(/\n{2,}/)
        .map((p) => (p.trim() ? `<p>${p.replace(/\n/g, "<br>")}</p>` : ""))
        .join("");
    })
    .join("");
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function render({ model, el: root }) {
  root.classList.add("acp-chat");
  const style = el("style");
  style.textContent = `
    .acp-chat { font-family: var(--jp-ui-font-family, sans-serif); border: 1px solid #ccc; border-radius: 6px; padding: 8px; max-width: 900px; }
    .acp-chat header { display: flex; gap: 12px; align-items: center; font-size: 12px; color: #555; }
    .acp-chat .acp-log { max-height: 420px; overflow-y: auto; margin: 8px 0; }
    .acp-chat .acp-user { background: #eef4ff; border-radius: 6px; padding: 4px 8px; margin: 4px 0; white-space: pre-wrap; }
    .acp-chat .acp-attachment { color: #555; font-size: 90%; white-space: normal; }
    .acp-chat .acp-agent { padding: 2px 8px; }
    .acp-chat .acp-tool { font-size: 12px; border-left: 3px solid #999; padding: 2px 8px; margin: 4px 0; }
    .acp-chat .acp-tool pre { background: #f6f6f6; max-height: 160px; overflow: auto; }
    .acp-chat .acp-error { color: #b00020; font-size: 12px; }
    .acp-chat .acp-permission { border: 1px solid #e0a800; border-radius: 6px; padding: 6px; margin: 4px 0; }
    .acp-chat .acp-input { display: flex; gap: 6px; }
    .acp-chat textarea { flex: 1; min-height: 2.5em; }
  `;
  const header = el("header");
  const title = el("strong", "", model.get("agent") || "agent");
  const status = el("span", "acp-status");
  const tokens = el("span", "acp-tokens");
  const stop = el("button", "acp-stop", "Stop");
  header.append(title, status, tokens, stop);
  const log = el("div", "acp-log");
  const permissions = el("div", "acp-permissions");
  const error = el("div", "acp-error");
  const input = el("div", "acp-input");
  const box = el("textarea");
  box.placeholder = "Ask the agent… (Ctrl+Enter sends)";
  const send = el("button", "acp-send", "Send");
  input.append(box, send);
  root.append(style, header, log, permissions, error, input);

  let reply = null; // the agent message being streamed
  let replyText = "";
  const cards = new Map();

  let user = null; // the user message of the latest turn
  function addUser(text, attachments) {
    user = el("div", "acp-user", text);
    log.append(user);
    addAttachments(attachments);
    reply = el("div", "acp-agent");
    replyText = "";
    log.append(reply);
  }
  function addAttachments(lines) {
    for (const line of lines || []) if (user) user.append(el("div", "acp-attachment", line));
  }
  function addDelta(text) {
    if (!reply) {
      reply = el("div", "acp-agent");
      log.append(reply);
    }
    replyText += text;
    reply.innerHTML = renderMarkdown(replyText);
    log.scrollTop = log.scrollHeight;
  }
  function showTool(card) {
    let node = cards.get(card.id);
    if (!node) {
      node = el("div", "acp-tool");
      cards.set(card.id, node);
      log.insertBefore(node, reply && reply.parentNode === log ? reply : null);
    }
    node.innerHTML = `🔧 <code>${escapeHtml(card.title)}</code> — ${escapeHtml(card.status)}`;
    for (const diff of card.diffs || []) {
      const pre = el("pre");
      const old = (diff.oldText || "").split("\n").map((l) => `- ${l}`);
      const neu = (diff.newText || "").split("\n").map((l) => `+ ${l}`);
      pre.textContent = `${diff.path}\n${diff.oldText ? old.join("\n") + "\n" : ""}${neu.join("\n")}`;
      node.append(pre);
    }
  }
  function showPending() {
    permissions.replaceChildren();
    for (const request of model.get("pending") || []) {
      const box = el("div", "acp-permission", `The agent asks permission: ${request.title} `);
      for (const option of request.options || []) {
        const button = el("button", "", option.name || option.optionId);
        button.addEventListener("click", () =>
          model.send({ type: "permission", request_id: request.request_id, option_id: option.optionId }),
        );
        box.append(button);
      }
      permissions.append(box);
    }
  }
  function showState() {
    status.textContent = model.get("status");
    tokens.textContent = `${model.get("tokens")} tokens`;
    error.textContent = model.get("error") || "";
    stop.disabled = model.get("status") !== "busy";
    // (stopped: the session ended on the server, for good)
    send.disabled = ["busy", "stopped"].includes(model.get("status")) || !model.get("session_id");
    title.textContent = model.get("agent") || "agent";
  }

  function onMessage(msg) {
    if (msg.type === "snapshot") {
      log.replaceChildren();
      cards.clear();
      reply = null;
      for (const m of msg.messages || []) {
        if (m.role === "user") addUser(m.text, m.attachments);
        else if (m.role === "agent") addDelta(m.text);
        else if (m.role === "tool") showTool(m);
      }
    } else if (msg.type === "user") addUser(msg.text);
    else if (msg.type === "attachments") addAttachments(msg.lines);
    else if (msg.type === "delta") addDelta(msg.text);
    else if (msg.type === "tool") showTool(msg);
    else if (msg.type === "error") error.textContent = msg.message;
  }

  function submit() {
    const text = box.value.trim();
    if (!text) return;
    model.send({ type: "send", text });
    box.value = "";
  }
  send.addEventListener("click", submit);
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) submit();
  });
  stop.addEventListener("click", () => model.send({ type: "cancel" }));

  model.on("msg:custom", onMessage);
  for (const name of ["status", "tokens", "error", "session_id", "agent"]) model.on(`change:${name}`, showState);
  model.on("change:pending", showPending);
  showState();
  showPending();
  model.send({ type: "hello" });
  return () => model.off("msg:custom", onMessage);
}

export default { render };
