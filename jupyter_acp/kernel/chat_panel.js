// ChatPanel's controls (anywidget ESM, no build step): the header (agent, status, tokens, Stop),
// the permission requests waiting for an answer, Undo for the agent's notebook edits, and the
// input. The conversation itself is not drawn here: it is a box of ipywidgets Output widgets
// whose Markdown the front end renders with its own renderer. Text goes in through textContent
// only: nothing from the agent is ever parsed as HTML here.

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

const STYLE = `
  .acp-chat-controls { font-family: var(--jp-ui-font-family, sans-serif); font-size: 13px; }
  .acp-chat-controls header { display: flex; gap: 12px; align-items: center; font-size: 12px; color: var(--jp-ui-font-color2, #555); }
  .acp-chat-controls .acp-error { color: var(--jp-error-color1, #b00020); font-size: 12px; }
  .acp-chat-controls .acp-permission { border: 1px solid var(--jp-warn-color1, #e0a800); border-radius: 6px; padding: 6px; margin: 4px 0; }
  .acp-chat-controls .acp-permission pre { font-family: var(--jp-code-font-family, monospace); background: var(--jp-layout-color2, #f6f6f6); padding: 4px; max-height: 200px; overflow: auto; }
  .acp-chat-controls .acp-permission button { margin-right: 4px; }
  .acp-chat-controls .acp-edits { display: flex; flex-wrap: wrap; gap: 4px; font-size: 12px; }
  .acp-chat-controls .acp-input { display: flex; gap: 6px; margin-top: 6px; }
  .acp-chat-controls textarea { flex: 1; min-height: 2.5em; font-family: inherit; }
`;

function render({ model, el: root }) {
  root.classList.add("acp-chat-controls");
  const header = el("header");
  const title = el("strong", "acp-agent");
  const status = el("span", "acp-status");
  const tokens = el("span", "acp-tokens");
  const stop = el("button", "acp-stop", "Stop");
  header.append(title, status, tokens, stop);
  const permissions = el("div", "acp-permissions");
  const edits = el("div", "acp-edits");
  const error = el("div", "acp-error");
  const input = el("div", "acp-input");
  const box = el("textarea");
  box.placeholder = "Ask the agent… (Ctrl+Enter sends)";
  const send = el("button", "acp-send", "Send");
  input.append(box, send);
  root.append(el("style", "", STYLE), header, permissions, edits, error, input);

  function showPending() {
    permissions.replaceChildren();
    for (const request of model.get("pending") || []) {
      const card = el("div", "acp-permission", `The agent asks permission: ${request.title} `);
      if (request.code !== null && request.code !== undefined) card.append(el("pre", "acp-code", request.code));
      for (const option of request.options || []) {
        const button = el("button", "", option.name || option.optionId);
        button.addEventListener("click", () =>
          model.send({ type: "permission", request_id: request.request_id, option_id: option.optionId }),
        );
        card.append(button);
      }
      permissions.append(card);
    }
  }
  function showEdits() {
    edits.replaceChildren();
    for (const edit of model.get("edits") || []) {
      const button = el("button", "acp-undo", `Undo: ${edit.line}`);
      button.title = "Take back this edit of the agent's";
      button.addEventListener("click", () => {
        button.disabled = true;
        model.send({ type: "undo", edit_id: edit.edit_id });
      });
      edits.append(button);
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
  // the log is the box of Outputs above these controls (ChatPanel's first child): keep it at its
  // bottom while the person is there, not once they scrolled up to read (best effort: a no-op
  // where the DOM differs)
  let stick = true;
  let hooked = null;
  function scrollLog() {
    const log = root.closest(".acp-chat-panel")?.querySelector(".acp-chat-log");
    if (!log) return;
    if (hooked !== log) {
      hooked = log;
      log.addEventListener("scroll", () => {
        stick = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
      });
      // the Outputs render their Markdown asynchronously, after the message that said so
      new MutationObserver(() => {
        if (stick) log.scrollTop = log.scrollHeight;
      }).observe(log, { childList: true, subtree: true, characterData: true });
    }
    if (stick) log.scrollTop = log.scrollHeight;
  }
  function onMessage(msg) {
    if (msg && msg.type === "scroll") requestAnimationFrame(scrollLog);
  }

  function submit() {
    const text = box.value.trim();
    if (!text || send.disabled) return;
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
  model.on("change:edits", showEdits);
  showState();
  showPending();
  showEdits();
  return () => model.off("msg:custom", onMessage);
}

export default { render };
