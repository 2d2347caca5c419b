"""The one Python interpretation of a session's event stream (docs/api.md), for ``%%acp`` and
``ChatPanel``.

It is a port of the sidebar's reducer (``labextension/src/reducer.ts``, the reference): the same
item kinds, the same keys and the same rules (chunks appended to the item they continue, a tool
card updated in place and adopting the notebook edits its output names, the plan of a turn
replaced, a permission resolved in place, a turn's footer). The parity fixtures in
``tests/fixtures/events`` are asserted against both, so the two cannot drift apart.

Unlike the reducer, which returns a new state per frame, ``Transcript.apply`` changes its items
in place and returns the ones it changed (each with its ``version`` bumped): a renderer redraws
only those, so the work per streamed chunk is one item, whatever the length of the conversation.
Frames whose ``seq`` was already applied change nothing, so a replay is harmless.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .api import (
    NOTEBOOK_TOOL_PREFIX,
    attachment_text,
    notebook_edit_text,
    notebook_tool_title,
    permission_view,
)

#: The item kinds (the sidebar's ``ChatItem`` kinds).
KINDS = ("user", "agent", "thought", "tool", "plan", "notebookEdit", "permission", "turn", "error", "notice")
#: Kinds whose text grows chunk by chunk while a reply streams (what renderers throttle).
STREAMING = ("agent", "thought")
#: What the chat shows where the server's history had dropped older events (as reducer.ts).
TRUNCATED_NOTICE = "Older messages were dropped by the server"


@dataclass(eq=False)
class Item:
    """One thing the chat shows. ``key`` is stable for the item's life (the contract's table:
    ``u:<seq>``, ``a:<seq>``, ``tool:<toolCallId>``, …); ``data`` holds what its kind needs:

    - user: ``attachments`` (lines such as "📎 notes.txt (20 bytes)"), ``turn``
    - tool: ``tool_call_id, title, tool_kind, status, content, locations, tool_name, args,
      output, edits``; ``content`` entries are ``{type: diff, path, old_text, new_text}``,
      ``{type: text, text}`` or ``{type: terminal, terminal_id}``; ``edits`` are the
      ``notebook:edit`` records it adopted (plus ``undone_by``)
    - plan: ``entries`` (``content, priority, status``)
    - notebookEdit: ``edit`` (the record, plus ``undone_by``)
    - permission: ``request_id, title, tool_kind, code, options, resolved``
    - turn: ``stop_reason, usage, total_tokens, duration``
    - error / notice: the message is ``text``
    """

    key: str
    kind: str
    text: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    version: int = 0
    #: Set when the item left the transcript (a notebook edit adopted into its tool card).
    removed: bool = False

    def touch(self) -> Item:
        self.version += 1
        return self


def _str(value: Any, default: str = "") -> str:
    return value if isinstance(value, str) else default


def _num(value: Any) -> float:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if number and math.isfinite(value) else 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _non_empty(value: Any) -> dict[str, Any] | None:
    return value if isinstance(value, dict) and value else None


def _tool_name(call: Any) -> str:
    meta = call.get("_meta") if isinstance(call, dict) else None
    return _str(meta.get("toolName")) if isinstance(meta, dict) else ""


def _tool_title(call: dict[str, Any], args: dict[str, Any] | None) -> str:
    name = _tool_name(call)
    if name.startswith(NOTEBOOK_TOOL_PREFIX):
        return notebook_tool_title(name[len(NOTEBOOK_TOOL_PREFIX):], args)
    return _str(call.get("title"), _str(call.get("toolCallId"), "tool call"))


def _content(raw: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in raw if isinstance(raw, list) else []:
        if not isinstance(c, dict):
            continue
        inner = c.get("content")
        if c.get("type") == "diff":
            old = c.get("oldText")
            out.append({"type": "diff", "path": _str(c.get("path")),
                        "old_text": old if isinstance(old, str) else None,
                        "new_text": _str(c.get("newText"))})
        elif c.get("type") == "content" and isinstance(inner, dict) and inner.get("type") == "text":
            out.append({"type": "text", "text": _str(inner.get("text"))})
        elif c.get("type") == "terminal":
            out.append({"type": "terminal", "terminal_id": _str(c.get("terminalId"))})
    return out


def _locations(raw: Any) -> list[str]:
    seen: dict[str, None] = {}
    for loc in raw if isinstance(raw, list) else []:
        if isinstance(loc, dict):
            text = f"{_str(loc.get('path'))}:{loc['line']}" if loc.get("line") else _str(loc.get("path"))
            if text:
                seen[text] = None
    return list(seen)


def _output_text(raw: Any) -> str:
    """``rawOutput`` as text, to find the notebook edits it names (the start of a big one)."""
    if raw is None:
        return ""
    return (raw if isinstance(raw, str) else json.dumps(raw))[:100_000]


def _block_text(content: Any) -> str:
    if not isinstance(content, dict):
        return ""
    if content.get("type") == "text":
        return _str(content.get("text"))
    if content.get("type") == "resource_link":
        uri = _str(content.get("uri"))
        return f"[{_str(content.get('name'), uri)}]({uri})"
    return f"[{content['type']}]" if content.get("type") else ""


def _mentions(tool: Item, edit_id: str) -> bool:
    """Whether the card's output (text content or rawOutput) names the edit ``edit_id``."""
    return bool(edit_id) and (edit_id in tool.data["output"] or any(
        c["type"] == "text" and edit_id in c["text"] for c in tool.data["content"]))


class Transcript:
    """The session as a chat: ``items`` in order, plus the state the panel's header shows."""

    def __init__(self) -> None:
        self.items: list[Item] = []
        self.by_key: dict[str, Item] = {}
        self.last_seq = 0
        self.hello_seq = 0
        self.state = "unknown"
        self.error: str | None = None
        self.busy = False
        self.tokens = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
        self.turns = 0
        self.pending: list[str] = []
        self.mode: str | None = None
        self.commands: list[dict[str, Any]] = []
        self.context: dict[str, Any] | None = None
        #: ``terminal_id`` → ``{output, truncated, exit_status}`` (event ``terminal:output``).
        self.terminals: dict[str, dict[str, Any]] = {}
        self._changed: dict[str, Item] = {}

    # -- reading -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.messages())

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``transcript[-1]["text"]``, as when ``ChatPanel.transcript`` was that list (the
        items are ``transcript.items``)."""
        return self.messages()[index]

    def messages(self) -> list[dict[str, Any]]:
        """The conversation in the shape ``ChatPanel.transcript`` had before items: dicts with
        ``role`` user, agent or tool (a tool card, or a notebook edit of its own)."""
        out: list[dict[str, Any]] = []
        for item in self.items:
            if item.kind == "user":
                out.append({"role": "user", "text": item.text, **(
                    {"attachments": item.data["attachments"]} if item.data["attachments"] else {})})
            elif item.kind == "agent":
                out.append({"role": "agent", "text": item.text})
            elif item.kind == "tool":
                d = item.data
                out.append({"role": "tool", "id": d["tool_call_id"], "title": d["title"],
                            "status": d["status"],
                            "diffs": [{"path": c["path"], "oldText": c["old_text"], "newText": c["new_text"]}
                                      for c in d["content"] if c["type"] == "diff"]})
            elif item.kind == "notebookEdit":
                line, body = notebook_edit_text(item.data["edit"])
                out.append({"role": "tool", "id": item.key, "title": line, "status": "", "diffs": [],
                            "line": line, "body": body})
        return out

    def undoable_edits(self) -> list[dict[str, Any]]:
        """The notebook edits that can still be undone (on their own or on a card), in order."""
        edits: list[dict[str, Any]] = []
        for item in self.items:
            found = [item.data["edit"]] if item.kind == "notebookEdit" else (
                item.data["edits"] if item.kind == "tool" else [])
            edits += [e for e in found
                      if e.get("undoable") and e.get("tool") != "undo" and not e.get("undone_by")]
        return edits

    # -- applying ------------------------------------------------------------------------------
    def apply(self, frame: dict[str, Any]) -> list[Item]:
        """Apply one frame; returns the items it changed, added or removed, in their order."""
        self._changed = {}
        if not isinstance(frame, dict) or not isinstance(frame.get("type"), str):
            return []
        data = _dict(frame.get("data"))
        seq = frame.get("seq")
        kind = frame["type"]
        if not isinstance(seq, int):
            if kind == "hello":
                self._hello(data)
            elif kind == "history:truncated":
                self._push(Item(f"note:x{len(self.items)}", "notice", TRUNCATED_NOTICE))
            elif kind == "error":
                self._push(Item(f"err:x{len(self.items)}", "error", _str(data.get("message"), "Error")))
            return self._taken()
        if seq <= self.last_seq:
            return []
        self.last_seq = seq
        if kind == "state":
            self.state = _str(data.get("state"), self.state)
            self.error = data.get("error")
            self.busy = data.get("state") == "busy"
        elif kind == "chat:message":
            attachments = [attachment_text(a) for a in data.get("attachments") or [] if isinstance(a, dict)]
            self._push(Item(f"u:{seq}", "user", _str(data.get("text"), _str(data.get("message"))),
                            {"attachments": attachments, "turn": data.get("turn")}))
        elif kind == "session/update":
            self._update(data, seq)
        elif kind == "permission:request":
            self._permission(data)
        elif kind == "permission:resolved":
            request_id = _str(data.get("request_id"))
            self.pending = [r for r in self.pending if r != request_id]
            item = self.by_key.get(f"perm:{request_id}")
            if item is not None:
                item.data["resolved"] = {"outcome": _str(data.get("outcome")),
                                         "option_id": data.get("option_id"),
                                         "by": _str(data.get("by"), "user")}
                self._mark(item)
        elif kind == "chat:response":
            self._response(data, seq)
        elif kind == "notebook:edit":
            self._notebook_edit(data)
        elif kind == "terminal:output":
            self._terminal(data)
        elif kind == "error":
            self._push(Item(f"err:{seq}", "error", _str(data.get("message"), "Error")))
        elif kind == "cancel":
            self._push(Item(f"note:{seq}", "notice", "Cancel requested"))
        return self._taken()

    def apply_edit(self, record: dict[str, Any]) -> list[Item]:
        """Apply a ``notebook:edit`` record the server answered (an undo asked by this client:
        its event went past in a stream no one reads now); returns the items it changed."""
        self._changed = {}
        if isinstance(record, dict):
            self._notebook_edit(record)
        return self._taken()

    def apply_all(self, frames: list[dict[str, Any]]) -> list[Item]:
        changed: dict[str, Item] = {}
        for frame in frames:
            for item in self.apply(frame):
                changed[item.key] = item
        return list(changed.values())

    # -- bookkeeping ---------------------------------------------------------------------------
    def _mark(self, item: Item) -> None:
        self._changed[item.key] = item.touch()

    def _push(self, item: Item) -> None:
        self.items.append(item)
        self.by_key[item.key] = item
        self._mark(item)

    def _remove(self, item: Item) -> None:
        self.items.remove(item)
        self.by_key.pop(item.key, None)
        item.removed = True
        self._mark(item)

    def _taken(self) -> list[Item]:
        changed, self._changed = self._changed, {}
        return list(changed.values())

    # -- the frames ----------------------------------------------------------------------------
    def _hello(self, s: dict[str, Any]) -> None:
        tokens = _dict(s.get("tokens"))
        self.state = _str(s.get("state"), self.state)
        self.error = s.get("error")
        self.busy = s.get("state") == "busy"
        self.tokens = {k: int(_num(tokens.get(k))) for k in ("input_tokens", "output_tokens", "total_tokens")}
        self.turns = int(_num(s.get("turns")))
        modes = _dict(s.get("modes"))
        self.mode = modes.get("currentModeId")
        if isinstance(s.get("available_commands"), list):
            self.commands = s["available_commands"]
        pending = [p for p in s.get("pending_permissions") or [] if isinstance(p, dict)]
        for p in pending:
            if f"perm:{_str(p.get('request_id'))}" not in self.by_key:
                self._push(self._permission_item(p))
        self.pending = [_str(p.get("request_id")) for p in pending]
        self.hello_seq = int(_num(s.get("last_seq")))

    def _update(self, u: dict[str, Any], seq: int) -> None:
        kind = u.get("sessionUpdate")
        if kind in ("agent_message_chunk", "agent_thought_chunk"):
            text = _block_text(u.get("content"))
            self._chunk("agent" if kind == "agent_message_chunk" else "thought", text, seq)
        elif kind == "tool_call":
            self._tool_call(u)
        elif kind == "tool_call_update":
            self._tool_call_update(u)
        elif kind == "plan":
            self._plan(u, seq)
        elif kind == "usage_update":
            self.context = {"used": _num(u.get("used")), "size": _num(u.get("size")) or None}
        elif kind == "current_mode_update":
            self.mode = _str(u.get("currentModeId"), self.mode or "") or None
        elif kind == "available_commands_update" and isinstance(u.get("availableCommands"), list):
            self.commands = u["availableCommands"]

    def _chunk(self, kind: str, text: str, seq: int) -> None:
        if not text:
            return  # (e.g. Qwen Code's empty chunks that only carry `_meta.usage`)
        last = self.items[-1] if self.items else None
        if last is not None and last.kind == kind:
            last.text += text
            self._mark(last)
        else:
            self._push(Item(f"{'a' if kind == 'agent' else 't'}:{seq}", kind, text))

    def _tool_call(self, u: dict[str, Any]) -> None:
        tool_id = _str(u.get("toolCallId"))
        old = self.by_key.get(f"tool:{tool_id}")
        args = _non_empty(u.get("rawInput")) or (old.data["args"] if old else None)
        data = {"tool_call_id": tool_id, "title": _tool_title(u, args),
                "tool_kind": _str(u.get("kind"), "other"), "status": _str(u.get("status"), "pending"),
                "content": _content(u.get("content")),
                "locations": _locations(u.get("locations")), "tool_name": _tool_name(u), "args": args,
                "output": _output_text(u.get("rawOutput")), "edits": old.data["edits"] if old else []}
        if old is not None:
            old.data = data
            self._mark(old)
            self._adopt(old)
        else:
            tool = Item(f"tool:{tool_id}", "tool", data=data)
            self._push(tool)
            self._adopt(tool)

    def _tool_call_update(self, u: dict[str, Any]) -> None:
        tool = self.by_key.get(f"tool:{_str(u.get('toolCallId'))}")
        if tool is None:
            self._tool_call({**u, "sessionUpdate": "tool_call"})
            return
        d = tool.data
        name = _tool_name(u) or d["tool_name"]
        args = _non_empty(u.get("rawInput")) or d["args"]
        if name.startswith(NOTEBOOK_TOOL_PREFIX):
            d["title"] = _tool_title({"_meta": {"toolName": name}}, args)
        elif isinstance(u.get("title"), str):
            d["title"] = u["title"]
        d.update(tool_name=name, args=args)
        if isinstance(u.get("kind"), str):
            d["tool_kind"] = u["kind"]
        if isinstance(u.get("status"), str):
            d["status"] = u["status"]
        if isinstance(u.get("content"), list):
            d["content"] = _content(u["content"])
        if isinstance(u.get("locations"), list):
            d["locations"] = _locations(u["locations"])
        if "rawOutput" in u:
            d["output"] = _output_text(u["rawOutput"])
        self._mark(tool)
        self._adopt(tool)

    def _titled(self, tool: Item) -> None:
        """A notebook tool's card whose arguments never came (Qwen's ``rawInput: {}``, its
        permission answered by the server) is titled from the edit it made."""
        d = tool.data
        if d["args"] or not d["edits"] or not d["tool_name"].startswith(NOTEBOOK_TOOL_PREFIX):
            return
        edit = d["edits"][0]
        args = {"path": _str(edit.get("path"))}
        if edit.get("cell_type"):
            args["cell_type"] = edit["cell_type"]
        title = notebook_tool_title(d["tool_name"][len(NOTEBOOK_TOOL_PREFIX):], args)
        if title != d["title"]:
            d["title"] = title
            self._mark(tool)

    def _adopt(self, tool: Item) -> None:
        """Move the notebook edits shown on their own whose id this card's output names into
        it: the ``notebook:edit`` event comes before the tool's result, which names it."""
        adopted = [i for i in self.items
                   if i.kind == "notebookEdit" and _mentions(tool, i.data["edit"]["edit_id"])]
        known = {e.get("edit_id") for e in tool.data["edits"]}
        for item in adopted:
            self._remove(item)
            if item.data["edit"]["edit_id"] not in known:
                tool.data["edits"] = [*tool.data["edits"], item.data["edit"]]
        if adopted:
            self._mark(tool)
        self._titled(tool)

    def _plan(self, u: dict[str, Any], seq: int) -> None:
        entries = [{"content": _str(e.get("content")), "priority": _str(e.get("priority"), "medium"),
                    "status": _str(e.get("status"), "pending")}
                   for e in u.get("entries") or [] if isinstance(e, dict)]
        # a plan replaces the previous plan of the same turn (the protocol sends it whole)
        last_user = max((n for n, i in enumerate(self.items) if i.kind == "user"), default=-1)
        plan = next((i for i in self.items[last_user + 1:] if i.kind == "plan"), None)
        if plan is not None:
            plan.data["entries"] = entries
            self._mark(plan)
        else:
            self._push(Item(f"plan:{seq}", "plan", data={"entries": entries}))

    @staticmethod
    def _permission_item(data: dict[str, Any]) -> Item:
        call = _dict(data.get("tool_call"))
        code = permission_view(call)[1]
        options = [{"optionId": _str(o.get("optionId")), "name": _str(o.get("name"), _str(o.get("optionId"))),
                    "kind": _str(o.get("kind"))} for o in data.get("options") or [] if isinstance(o, dict)]
        request_id = _str(data.get("request_id"))
        return Item(f"perm:{request_id}", "permission", data={
            "request_id": request_id, "title": _tool_title(call, _non_empty(call.get("rawInput"))),
            "tool_kind": _str(call.get("kind"), "other"), "code": code, "options": options, "resolved": None})

    def _permission(self, data: dict[str, Any]) -> None:
        item = self._permission_item(data)
        if item.key in self.by_key:
            return  # (already known from the hello's pending list)
        call = _dict(data.get("tool_call"))
        args = _non_empty(call.get("rawInput"))
        tool = self.by_key.get(f"tool:{_str(call.get('toolCallId'))}") if args else None
        if tool is not None:  # give the card the arguments its request carries (Qwen's had none)
            d = tool.data
            d["tool_name"] = d["tool_name"] or _tool_name(call)
            d["args"] = d["args"] or args
            if d["tool_name"].startswith(NOTEBOOK_TOOL_PREFIX):
                d["title"] = _tool_title({"_meta": {"toolName": d["tool_name"]}}, d["args"])
            self._mark(tool)
        self._push(item)
        self.pending = [*self.pending, item.data["request_id"]]

    def _response(self, data: dict[str, Any], seq: int) -> None:
        usage = _dict(data.get("usage"))
        if seq > self.hello_seq:  # (turns ended before the hello are in its totals)
            for k in self.tokens:
                self.tokens[k] += int(_num(usage.get(k)))
            self.turns = max(self.turns, int(_num(data.get("turn"))))
        self.busy = False
        duration = data.get("duration")
        self._push(Item(f"turn:{seq}", "turn", data={
            "stop_reason": _str(data.get("stop_reason"), "end_turn"), "usage": usage,
            "total_tokens": int(_num(usage.get("total_tokens"))),
            "duration": duration if isinstance(duration, (int, float)) else None}))

    def _notebook_edit(self, data: dict[str, Any]) -> None:
        edit_id = _str(data.get("edit_id"))
        if not edit_id:
            return
        record = {**data, "undone_by": None}
        if record.get("tool") == "undo" and data.get("undoes"):
            for item in self.items:
                edits = [item.data["edit"]] if item.kind == "notebookEdit" else (
                    item.data["edits"] if item.kind == "tool" else [])
                for e in edits:
                    if e.get("edit_id") == data["undoes"]:
                        e["undone_by"] = edit_id
                        self._mark(item)
        tool = next((i for i in self.items if i.kind == "tool" and _mentions(i, edit_id)), None)
        if tool is not None:
            if not any(e.get("edit_id") == edit_id for e in tool.data["edits"]):
                tool.data["edits"] = [*tool.data["edits"], record]
                self._mark(tool)
                self._titled(tool)
            return
        known = self.by_key.get(f"edit:{edit_id}")
        if known is not None:
            known.data["edit"] = record
            self._mark(known)
        else:
            self._push(Item(f"edit:{edit_id}", "notebookEdit", data={"edit": record}))

    def _terminal(self, data: dict[str, Any]) -> None:
        """``terminal:output``: the terminal's whole kept output so far (replaced, not appended);
        the tool cards showing that terminal are redrawn."""
        terminal_id = _str(data.get("terminal_id"))
        if not terminal_id:
            return
        self.terminals[terminal_id] = {"output": _str(data.get("output")),
                                       "truncated": data.get("truncated") is True,
                                       "exit_status": data.get("exit_status")}
        for item in self.items:
            if item.kind == "tool" and any(c["type"] == "terminal" and c["terminal_id"] == terminal_id
                                           for c in item.data["content"]):
                self._mark(item)


class Throttle:
    """Which changed items to draw now: an item that streams (an agent message, a thought) at
    most every ``interval`` seconds, everything else at once; ``flush`` gives what is left (at a
    turn's end). A new item is drawn at once, so order on screen follows the transcript."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval = interval
        self._dirty: dict[str, Item] = {}
        self._drawn: dict[str, float] = {}

    def take(self, changed: list[Item], now: float | None = None) -> list[Item]:
        now = time.monotonic() if now is None else now
        for item in changed:
            self._dirty[item.key] = item
        due: list[Item] = []
        for key, item in list(self._dirty.items()):
            if (item.kind in STREAMING and not item.removed and key in self._drawn
                    and now - self._drawn[key] < self.interval):
                continue
            due.append(item)
            del self._dirty[key]
            self._drawn[key] = now
        return due

    @property
    def waiting(self) -> bool:
        return bool(self._dirty)

    def flush(self) -> list[Item]:
        due, self._dirty = list(self._dirty.values()), {}
        now = time.monotonic()
        for item in due:
            self._drawn[item.key] = now
        return due
