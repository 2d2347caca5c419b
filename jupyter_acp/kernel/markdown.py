"""Transcript items (``transcript.py``) as Markdown, for ``%%acp`` outputs and ``ChatPanel``.

Markdown, not HTML, because the front end renders it with its own renderer: JupyterLab and
Notebook 7 with their rendermime (sanitizer, LaTeX, highlighted code), VS Code with its Markdown
output renderer; the kernel never ships a renderer of its own. Tool cards are
``<details><summary>…</summary>`` blocks (kept by JupyterLab's sanitizer and by VS Code), their
diffs a ```` ```diff ```` fence of a real unified diff (hunks with three lines of context).
"""

from __future__ import annotations

import difflib
import html
import re
from typing import Any

from .api import notebook_edit_text
from .transcript import Item

#: The most lines of a diff or of terminal output a card shows (the rest is said, not shown).
MAX_LINES = 400

_STATUS = {"pending": "⏳", "in_progress": "⏳", "completed": "✓", "failed": "✗"}
_PLAN = {"completed": "[x]", "in_progress": "[ ] ◐", "pending": "[ ]"}


def plain(text: str) -> str:
    """``text`` shown literally in Markdown (a file name with ``*`` or ``_`` stays as it is)."""
    return "".join("\\" + c if c in "\\`*_[]<>|#$" else c for c in text)


def fenced(code: str, lang: str = "") -> str:
    """``code`` as a Markdown code block whose fence no line of it closes."""
    fence = "```"
    while fence in code:
        fence += "`"
    return f"{fence}{lang}\n{code}\n{fence}"


def table(rows: list[list[Any]], header: list[str]) -> str:
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})(.*)$")
# a code span on one line (not after a backslash), `$$…$$`, or `$…$` on one line
_SPAN = re.compile(r"(?<![\\`])(`+)[^\n]*?(?<!`)\1(?!`)|\$\$[\s\S]*?\$\$|\$[^$\n]+\$")
_SCHEME = re.compile(r"(\]\(\s*|^ {0,3}\[[^\]\n]+\]:[ \t]*)(javascript|vbscript|data|file)(?=\s*:)",
                     re.IGNORECASE | re.MULTILINE)


def _prose(text: str) -> str:
    """Prose of the agent's: no raw HTML (``<`` and ``&`` as text) and no script links."""
    return _SCHEME.sub(r"\1unsafe-\2", text.replace("&", "&amp;").replace("<", "&lt;"))


def _inline(text: str) -> str:
    parts: list[str] = []
    at = 0
    # (a table row splits into cells before its code spans are found: nothing is kept there)
    for match in () if "|" in text else _SPAN.finditer(text):
        parts.append(_prose(text[at:match.start()]))
        span = match.group(0)
        parts.append(span if span.startswith("`") else span.replace("<", "\\lt "))
        at = match.end()
    parts.append(_prose(text[at:]))
    return "".join(parts)


def safe_markdown(text: str) -> str:
    """The agent's Markdown, made safe to render as *trusted* output (an Output widget's outputs
    and a cell's own outputs are trusted in JupyterLab: no sanitizer runs). Raw HTML and
    ``javascript:`` links are neutralized outside code; code blocks, code spans and math keep
    their text (``<`` in math becomes ``\\lt``). Where this and the renderer could disagree about
    what is code, it errs on the side of escaping (a code span in a table row shows ``&lt;``)."""
    out: list[str] = []
    prose: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        if fence is not None:
            out.append(line)
            if re.match(r"^ {0,3}" + re.escape(fence) + r"[~`]*[ \t]*$", line):
                fence = None
            continue
        opened = _FENCE.match(line)
        if opened and not (opened.group(1)[0] == "`" and "`" in opened.group(2)):
            if prose:
                out.append(_inline("\n".join(prose)))
            prose = []
            out.append(line)
            fence = opened.group(1)
            continue
        prose.append(line)
    if prose:
        out.append(_inline("\n".join(prose)))
    return "\n".join(out)


def _cut(lines: list[str]) -> str:
    if len(lines) <= MAX_LINES:
        return "\n".join(lines)
    return "\n".join(lines[:MAX_LINES]) + f"\n… {len(lines) - MAX_LINES} more lines"


def _side(prefix: str, path: str) -> str:
    return prefix + path if path.startswith("/") else f"{prefix}/{path}"


def unified_diff(path: str, old: str | None, new: str) -> str:
    """A file's change as a unified diff (hunks, ``@@`` headers, 3 lines of context)."""
    lines = difflib.unified_diff((old or "").splitlines(), new.splitlines(),
                                 fromfile=_side("a", path) if old is not None else "/dev/null",
                                 tofile=_side("b", path), n=3, lineterm="")
    return _cut(list(lines))


def edit_markdown(record: dict[str, Any]) -> str:
    """A ``notebook:edit`` record as Markdown: its line, then its source, diff or run."""
    head, body = notebook_edit_text(record)
    if record.get("undone_by"):
        head += " — undone"
    lang = "diff" if record.get("tool") in ("replace_cell", "delete_cell", "undo") else ""
    return plain(head) + ("\n\n" + fenced(body, lang) if body else "")


def _details(summary: str, body: str, open_: bool = False) -> str:
    """A collapsible block: ``summary`` is HTML already escaped; ``body`` is Markdown (blank
    lines around it, so that the renderer parses it as Markdown inside the HTML block)."""
    return f"<details{' open' if open_ else ''}><summary>{summary}</summary>\n\n{body}\n\n</details>"


def _user(item: Item) -> str:
    """The prompt as typed (literally: a prompt's Markdown is for the agent to read), quoted."""
    quoted = "  \n".join("> " + plain(line) for line in item.text.splitlines()) or "> "
    attachments = item.data.get("attachments") or []
    return quoted + ("\n\n" + "  \n".join(plain(a) for a in attachments) if attachments else "")


def attachments_markdown(item: Item) -> str:
    """What went with a prompt (``@file`` mentions, images), one line each ("" for none)."""
    return "  \n".join(plain(a) for a in item.data.get("attachments") or [])


def _tool(item: Item, terminals: dict[str, dict[str, Any]]) -> str:
    d = item.data
    status = str(d.get("status") or "")
    summary = (f"🔧 <code>{html.escape(str(d.get('title') or 'tool'))}</code> — "
               f"{_STATUS.get(status, '')} {html.escape(status)}").replace("—  ", "— ")
    parts: list[str] = []
    shown = {c["path"] for c in d.get("content") or [] if c["type"] == "diff"}
    locations = [loc for loc in d.get("locations") or [] if loc not in shown]
    if locations:  # (a diff's file is said by the diff)
        parts.append(" · ".join(plain(loc) for loc in locations))
    for c in d.get("content") or []:
        if c["type"] == "diff":
            parts.append(f"**{plain(c['path'])}**\n\n" + fenced(unified_diff(c["path"], c["old_text"],
                                                                           c["new_text"]), "diff"))
        elif c["type"] == "text" and c["text"].strip():
            parts.append(fenced(_cut(c["text"].splitlines())))
        elif c["type"] == "terminal":
            parts.append(_terminal(c["terminal_id"], terminals.get(c["terminal_id"])))
    parts += [edit_markdown(e) for e in d.get("edits") or []]
    if not parts:
        return summary
    return _details(summary, "\n\n".join(parts), open_=status in ("pending", "in_progress"))


def _terminal(terminal_id: str, term: dict[str, Any] | None) -> str:
    if term is None:
        return f"*terminal {plain(terminal_id)}*"
    text = fenced(_cut(term["output"].splitlines()) if term["output"] else "(no output)")
    notes = ["output truncated"] if term.get("truncated") else []
    status = term.get("exit_status")
    if isinstance(status, dict):
        code, signal = status.get("exit_code"), status.get("signal")
        notes.append(f"exit code {plain(str(code))}" if code is not None
                     else f"killed by {plain(str(signal))}" if signal else "exited")
    return text + (f"\n\n*{', '.join(notes)}*" if notes else "")


def _plan(item: Item) -> str:
    lines = [f"- {_PLAN.get(e['status'], '[ ]')} {plain(e['content'])}" for e in item.data["entries"]]
    return "**Plan**\n\n" + ("\n".join(lines) or "*(empty)*")


def _permission(item: Item) -> str:
    d = item.data
    out = f"🔐 The agent asks permission: {plain(d['title'])}"
    if d.get("code") is not None:  # (what would run in the kernel, or be written: read it first)
        out += "\n\n" + fenced(d["code"], "python")
    resolved = d.get("resolved")
    if resolved:
        name = next((o["name"] for o in d["options"] if o["optionId"] == resolved.get("option_id")), "")
        answer = name or resolved.get("outcome") or "answered"
        out += f"\n\n*→ {plain(answer)}" + (f" (by {plain(resolved['by'])})" if resolved.get("by") not in
                                            ("user", "", None) else "") + "*"
    return out


def turn_footer(item: Item) -> str:
    usage = item.data.get("usage") or {}
    n = {k: v if isinstance(v := usage.get(k), int) else 0
         for k in ("input_tokens", "output_tokens", "total_tokens")}
    reason = re.sub(r"[^\w -]", "", str(item.data["stop_reason"]))  # (an agent's word: no markup)
    return (f"*{reason} · tokens: {n['input_tokens']} in, {n['output_tokens']} out, "
            f"{n['total_tokens']} total*")


def item_markdown(item: Item, terminals: dict[str, dict[str, Any]] | None = None) -> str:
    """The Markdown of one item (``terminals``: ``Transcript.terminals``, for tool cards)."""
    kind = item.kind
    if kind == "user":
        return _user(item)
    if kind == "agent":
        return safe_markdown(item.text)
    if kind == "thought":
        return _details("Thinking", safe_markdown(item.text))
    if kind == "tool":
        return _tool(item, terminals or {})
    if kind == "plan":
        return _plan(item)
    if kind == "notebookEdit":
        return edit_markdown(item.data["edit"])
    if kind == "permission":
        return _permission(item)
    if kind == "turn":
        return turn_footer(item)
    if kind == "error":
        return f"**Error:** {safe_markdown(item.text)}"
    return f"*{plain(item.text)}*"


def markdown_bundle(markdown: str) -> dict[str, Any]:
    """An output (``display_data``) that shows ``markdown``: what an ``Output`` widget holds."""
    return {"output_type": "display_data", "data": {"text/markdown": markdown, "text/plain": markdown},
            "metadata": {}}
