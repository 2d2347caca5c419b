"""``%acp`` and ``%%acp``: agent sessions from notebook cells (``%load_ext jupyter_acp``).

Every failure prints one line for the person at the notebook (no traceback); the data lives on
the server (``api.py``), so the same sessions show in the JupyterLab sidebar.
"""

from __future__ import annotations

import argparse
import base64
import mimetypes
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, cast

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import HTML, Markdown, display

from .api import AcpApi, AcpApiError, SessionGone, permission_view
from .markdown import attachments_markdown, edit_markdown, item_markdown, table
from .transcript import Item, Throttle, Transcript

USAGE = """Agent sessions from notebook cells (jupyter-acp).

Line magic ``%acp COMMAND``:

  %acp agents                            the agents this server offers (and why others are not)
  %acp start [--agent NAME] [--new] [--cwd DIR]
                                         start a session (or reuse my live one) and use it
  %acp sessions                          my sessions, live and suspended, newest first, with
                                         their state and title; * marks the one in use
  %acp use ID                            use another of my sessions (an id prefix is enough)
  %acp resume ID                         bring a suspended session back (its agent continues
                                         where it was) and use it
  %acp close [ID]                        suspend a session (default: the one in use): its agent
                                         ends, the session stays listed and resumable
  %acp stop [ID]                         the same as close
  %acp delete ID                         forget a session: its history is removed for good
  %acp stats [ID] [--plot]               state, turns and tokens; --plot charts tokens per turn
  %acp usage                             my tokens per day, and my quota
  %acp mode [MODE]                       show or switch the session's mode (e.g. default, yolo)
  %acp model [NAME]                      the agent's models (* marks the current one), or switch
  %acp commands                          the agent's slash commands (use them as /name in %%acp)
  %acp cancel                            cancel the running turn of the session in use
  %acp undo EDIT                         undo one of the agent's notebook edits (its id, or the
                                         start of it, as the cell output shows: "(edit 3f2a1b2c)")
  %acp chat [--agent NAME]               a chat panel widget on the session in use

Cell magic ``%%acp [--session ID] [--permissions ask|allow|deny] [--image FILE ...]``: the cell
is the prompt; the reply streams into the output as Markdown, tool calls one line each, then the
turn's tokens. ``@path`` (or ``@"a b.txt"``) names a workspace file to send along, ``/name`` runs
one of the agent's commands; what went with the prompt is listed (📎 NAME (N bytes)); the
agent's notebook edits are listed with what they changed (✎ inserted …, ▶ ran …). With no
session in use, one is started with the default agent; a session in use that was suspended
(idle, or a server restart) is resumed. Permission requests are asked with an input box
(``ask``, the default) or answered by ``allow`` / ``deny``. Interrupting the kernel (the stop
button) cancels the turn at the agent.
"""


_F = TypeVar("_F", bound=Callable[..., Any])


def _named_cell_magic(name: str) -> Callable[[_F], _F]:
    """``cell_magic(name)``, typed: IPython annotates its magic decorators as taking a function
    *or* a magic's name and returning either, which types every named use as taking ``Never``.
    Given a name, it returns a decorator that records the method and returns it unchanged."""
    return cast("Callable[[_F], _F]", cell_magic(name))


class MagicError(Exception):
    """A usage error of the magics: printed as one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse would exit the kernel's process
        raise MagicError(f"{message} (see %acp?)")


def _parser() -> _Parser:
    parser = _Parser(prog="%acp", add_help=False)
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("agents", add_help=False)
    start = sub.add_parser("start", add_help=False)
    start.add_argument("--agent")
    start.add_argument("--new", action="store_true")
    start.add_argument("--cwd")
    sub.add_parser("sessions", add_help=False)
    sub.add_parser("use", add_help=False).add_argument("id")
    sub.add_parser("resume", add_help=False).add_argument("id")
    sub.add_parser("close", add_help=False).add_argument("id", nargs="?")
    sub.add_parser("stop", add_help=False).add_argument("id", nargs="?")
    sub.add_parser("delete", add_help=False).add_argument("id")
    stats = sub.add_parser("stats", add_help=False)
    stats.add_argument("id", nargs="?")
    stats.add_argument("--plot", action="store_true")
    sub.add_parser("usage", add_help=False)
    sub.add_parser("mode", add_help=False).add_argument("mode", nargs="?")
    sub.add_parser("model", add_help=False).add_argument("model", nargs="?")
    sub.add_parser("commands", add_help=False)
    sub.add_parser("cancel", add_help=False)
    undo = sub.add_parser("undo", add_help=False)
    undo.add_argument("edit")
    undo.add_argument("--session")
    sub.add_parser("chat", add_help=False).add_argument("--agent")
    for sp in sub.choices.values():
        sp.error = parser.error  # type: ignore[method-assign]
    return parser


def _cell_parser() -> _Parser:
    parser = _Parser(prog="%%acp", add_help=False)
    parser.add_argument("--session")
    parser.add_argument("--permissions", choices=["ask", "allow", "deny"], default="ask")
    parser.add_argument("--image", action="append", default=[], metavar="FILE")
    return parser


#: How the server's close reason of a suspended session's socket begins (docs/api.md).
SUSPENDED = "The session is suspended"

#: Seconds ``%acp commands`` waits for an agent's first announcement of its commands.
COMMANDS_WAIT = 2.0

#: The image types the server accepts in a prompt (docs/api.md); checked here too so that a
#: wrong file is said before anything is sent.
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


def _image(path: str) -> dict[str, str]:
    """A prompt's image block from a file of the kernel's (read here: the kernel's files need
    not be the agent's workspace); the server checks the count and the size."""
    mime = mimetypes.guess_type(path)[0]
    if mime not in IMAGE_TYPES:
        raise MagicError(f"{path}: not an image the agent can take ({', '.join(IMAGE_TYPES)})")
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as e:
        raise MagicError(f"Cannot read the image {path}: {e.strerror or e}") from None
    return {"mime_type": mime, "data": base64.b64encode(data).decode()}


def _short(text: str, limit: int = 60) -> str:
    """``text`` cut to ``limit`` characters for a table cell."""
    return text if len(text) <= limit else text[:limit - 1] + "…"


def svg_bars(values: list[int], labels: list[str], title: str) -> str:
    """A small bar chart as inline SVG (no plotting library needed)."""
    width, height, pad = max(240, 40 * len(values) + 40), 180, 30
    top = max(values or [1]) or 1
    bar_w = (width - 2 * pad) / max(len(values), 1)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<title>{title}</title>',
             f'<text x="{pad}" y="16" font-size="12">{title}</text>']
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        h = (height - 2 * pad - 10) * value / top
        x, y = pad + i * bar_w + 2, height - pad - h
        parts.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar_w - 4:.1f}" height="{h:.1f}" fill="#3b82f6">'
                     f"<title>{label}: {value}</title></rect>")
        parts.append(f'<text x="{x + (bar_w - 4) / 2:.1f}" y="{height - pad + 14}" font-size="10" '
                     f'text-anchor="middle">{label}</text>')
    parts.append("</svg>")
    return "".join(parts)


class TurnRenderer:
    """Streams one turn into the cell output, one display per transcript item (``transcript.py``
    interprets the events, ``markdown.py`` draws an item): a new item gets a new display, a
    changed one an update of its own display only. An item that streams (the agent's reply) is
    updated at most every ``min_interval`` seconds, and for good at the turn's end (``flush``).

    The prompt itself is the cell: of the user's message only what went with it (``@file``
    mentions, images) is shown."""

    def __init__(self, min_interval: float = 0.1) -> None:
        self.transcript = Transcript()
        self.throttle = Throttle(min_interval)
        self.handles: dict[str, Any] = {}
        # shown at once, so that the cell says the agent is at work; the first item takes it
        self._spare: Any = display(Markdown("*…*"), display_id=True)

    def markdown(self) -> str:
        """The whole turn as one Markdown text (what the displays show, in order)."""
        return "\n\n".join(filter(None, (self._text(i) for i in self.transcript.items)))

    def _text(self, item: Item) -> str:
        if item.removed:
            return ""
        if item.kind == "user":
            return attachments_markdown(item)
        return item_markdown(item, self.transcript.terminals)

    def on_event(self, frame: dict[str, Any]) -> None:
        self._draw(self.throttle.take(self.transcript.apply(frame)))

    def refresh(self, force: bool = False) -> None:
        """Draw what the throttle held back (``force``: everything, at the turn's end)."""
        self._draw(self.throttle.flush() if force else self.throttle.take([]))
        if force and self._spare is not None:
            self._spare.update(Markdown(""))
            self._spare = None

    def _draw(self, items: list[Item]) -> None:
        for item in items:
            text = self._text(item)
            handle = self.handles.get(item.key)
            if handle is not None:
                handle.update(Markdown(text))
            elif text:
                if self._spare is not None:
                    handle, self._spare = self._spare, None
                    handle.update(Markdown(text))
                else:
                    handle = display(Markdown(text), display_id=True)
                self.handles[item.key] = handle


@magics_class
class AcpMagics(Magics):
    """The state of the magics in one kernel: the API client and the session in use."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self._api: AcpApi | None = None
        self.current: str | None = None

    __doc__ = USAGE

    @property
    def api(self) -> AcpApi:
        if self._api is None:
            self._api = AcpApi()
        return self._api

    # -- entry points --------------------------------------------------------------------------
    @line_magic
    def acp(self, line: str) -> Any:
        try:
            args = _parser().parse_args(shlex.split(line))
            if not args.command:
                raise MagicError("Say what to do, e.g. %acp start (see %acp?)")
            return getattr(self, f"_cmd_{args.command}")(args)
        except (AcpApiError, MagicError) as e:
            print(f"acp: {e}")
        return None

    acp.__doc__ = USAGE

    @_named_cell_magic("acp")
    def acp_cell(self, line: str, cell: str) -> Any:
        session_id = None
        try:
            args = _cell_parser().parse_args(shlex.split(line))
            if not cell.strip():
                raise MagicError("The cell is empty: write the prompt below %%acp")
            images = [_image(path) for path in args.image]
            session_id = self._resolve(args.session) if args.session else self._ensure_session()
            # the cell as written (only the blank lines and spaces around it go): ``@path``
            # mentions are the server's to resolve, against the session's workspace
            return self._turn(session_id, cell.strip(), args.permissions, images)
        except SessionGone as e:
            # the session ended (deleted elsewhere, culled when idle, a server restart): said
            # once; the session in use is forgotten so that the next cell does not fail the same
            # way — unless it was only suspended meanwhile: the next cell resumes it then
            if e.message.startswith(SUSPENDED):
                print(f"acp: {e} — the next %%acp resumes it")
            elif session_id is not None and session_id == self.current:
                self.current = None
                print(f"acp: {e} — the next %%acp starts a new session")
            else:
                print(f"acp: {e}")
        except (AcpApiError, MagicError) as e:
            print(f"acp: {e}")
        return None

    acp_cell.__doc__ = USAGE

    # -- helpers -------------------------------------------------------------------------------
    def _resolve(self, prefix: str | None) -> str:
        if not prefix:
            if self.current is None:
                raise MagicError("No session in use: %acp start first")
            return self.current
        ids = [s["id"] for s in self.api.sessions()]
        matches = [i for i in ids if i.startswith(prefix)]
        if len(matches) != 1:
            raise MagicError(f"No session {prefix!r} of yours" if not matches
                             else f"{prefix!r} matches several sessions; give more of the id")
        return matches[0]

    def _awake(self, session_id: str) -> None:
        """Resume ``session_id`` if it is suspended (culled when idle, a server restart): a
        suspended session takes no prompt nor switch, and the person at the notebook meant to go
        on. One that does not exist (any more) raises ``SessionGone``, as a turn's socket would."""
        try:
            session = self.api.session(session_id)
        except AcpApiError as e:
            if e.status == 404:
                raise SessionGone(e.message) from None
            raise
        if session.get("state") == "suspended":
            resumed = self.api.resume(session_id)  # (said after: a failure is its one line)
            print(f"acp: resumed session {session_id[:12]} (it was suspended)")
            self._say_restore(resumed)

    @staticmethod
    def _say_restore(session: dict[str, Any]) -> None:
        """A line when the agent came back without its context (``restore: fresh``)."""
        if session.get("restore") == "fresh":
            print("acp: the agent could not restore its context and starts afresh "
                  "(the transcript is kept)")

    def _ensure_session(self) -> str:
        if self.current is not None:
            return self.current
        session = self.api.start()
        self.current = session["id"]
        print(f"acp: started {session['agent_display_name']} (session {session['id'][:8]})")
        return self.current

    def _turn(self, session_id: str, prompt: str, policy: str,
              images: list[dict[str, str]] | None = None) -> None:
        self._awake(session_id)
        renderer = TurnRenderer()
        started = False  # (what came before our prompt, e.g. the end of an earlier turn, is not shown)

        def on_event(frame: dict[str, Any]) -> None:
            nonlocal started
            started = started or frame["type"] == "chat:message"
            if started:
                renderer.on_event(frame)
            if frame["type"] == "permission:request":
                renderer.refresh(force=True)  # (all of it on screen before the question)
                self._permission(session_id, frame["data"], policy)

        # the turn's footer and its errors are items of the transcript, drawn as they come
        self.api.stream(session_id, prompt, on_event,
                        on_interrupt=lambda: print("acp: cancelling the turn…"), images=images)
        renderer.refresh(force=True)

    def _permission(self, session_id: str, request: dict[str, Any], policy: str) -> None:
        options = request.get("options", [])
        # (the request, with the code it would run, is on screen: an item of the transcript)
        title = permission_view(request.get("tool_call") or {})[0]
        if policy in ("allow", "deny"):
            kinds = ("allow_once", "allow_always") if policy == "allow" else ("reject_once", "reject_always")
            choice = next((o["optionId"] for o in options if o.get("kind") in kinds), None)
            print(f"acp: {policy} — {title}")
            self.api.answer(session_id, request["request_id"], choice)
            return
        menu = ", ".join(f"[{i + 1}] {o.get('name', o['optionId'])}" for i, o in enumerate(options))
        try:
            answer = input(f"The agent asks permission: {title}. {menu} (Enter rejects): ")
        except Exception:  # no stdin in this front end (e.g. a non-interactive run)
            print(f"acp: cannot ask about {title!r} here (no input); rejected — use --permissions allow")
            answer = ""
        choice = None
        if answer.strip().isdigit() and 1 <= int(answer) <= len(options):
            choice = options[int(answer) - 1]["optionId"]
        self.api.answer(session_id, request["request_id"], choice)

    # -- subcommands ---------------------------------------------------------------------------
    def _cmd_agents(self, args: argparse.Namespace) -> None:
        data = self.api.agents()
        rows = [[a["name"] + (" (default)" if a["default"] else ""), a["display_name"],
                 "yes" if a["available"] else f"no: {a['reason']}"] for a in data["agents"]]
        display(Markdown(table(rows, ["agent", "name", "available"])))

    def _cmd_start(self, args: argparse.Namespace) -> None:
        session = self.api.start(args.agent, new=args.new, cwd=args.cwd)
        self.current = session["id"]
        print(f"acp: using {session['agent_display_name']} — session {session['id']} "
              f"({session['state']}, {session['sandbox']} sandbox, in {session['cwd'] or 'your root'})")

    def _cmd_sessions(self, args: argparse.Namespace) -> None:
        sessions = self.api.sessions()
        if not sessions:
            print("acp: no sessions; %acp start")
            return
        sessions.sort(key=lambda s: s.get("last_activity") or 0, reverse=True)
        rows = [[("* " if s["id"] == self.current else "") + s["id"][:12], s["agent"], s["state"],
                 _short(s.get("title") or ""), s["turns"], (s.get("tokens") or {}).get("total_tokens", 0)]
                for s in sessions]
        display(Markdown(table(rows, ["session", "agent", "state", "title", "turns", "tokens"])))

    def _cmd_use(self, args: argparse.Namespace) -> None:
        self.current = self._resolve(args.id)
        suspended = self.api.session(self.current).get("state") == "suspended"
        print(f"acp: using session {self.current}" + (" (suspended: the next %%acp resumes it)"
                                                       if suspended else ""))

    def _cmd_resume(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(args.id)
        session = self.api.resume(session_id)
        self.current = session_id
        # ("fresh": said on a line of its own by _say_restore)
        how = {"resume": "its agent resumed it", "load": "its agent reloaded it"}.get(
            session.get("restore") or "", "")
        print(f"acp: using session {session_id} ({session.get('state', 'ready')}"
              + (f"; {how}" if how else "") + ")")
        self._say_restore(session)

    def _cmd_close(self, args: argparse.Namespace, verb: str = "closed") -> None:
        session_id = self._resolve(args.id)
        self.api.close(session_id)
        if session_id == self.current:
            self.current = None  # (closed on purpose: the next %%acp does not bring it back)
        print(f"acp: {verb} session {session_id} — suspended; %acp resume {session_id[:8]} "
              "continues it")

    def _cmd_stop(self, args: argparse.Namespace) -> None:
        """``close`` under its older name (the notebooks and people's habits say ``stop``)."""
        self._cmd_close(args, verb="stopped")

    def _cmd_delete(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(args.id)
        self.api.delete(session_id)
        if session_id == self.current:
            self.current = None
        print(f"acp: deleted session {session_id} and its history")

    def _cmd_stats(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(args.id)
        s = self.api.session(session_id)
        t = s["tokens"]
        rows = [["agent", s["agent_display_name"]], ["state", s["state"] + (f" ({s['error']})" if s["error"]
                                                                             else "")],
                ["sandbox", s["sandbox"]], ["turns", s["turns"]], ["input tokens", t["input_tokens"]],
                ["output tokens", t["output_tokens"]], ["total tokens", t["total_tokens"]],
                ["cost", f"{s['cost']:.6f} {s['currency'] or ''}".strip()]]
        display(Markdown(table(rows, ["session " + session_id[:12], ""])))
        if args.plot:
            events = self.api.history(session_id)["events"]
            turns = [e["data"] for e in events if e["type"] == "chat:response"]
            values = [d["usage"]["total_tokens"] for d in turns]
            display(HTML(svg_bars(values, [str(d["turn"]) for d in turns], "tokens per turn")))

    def _cmd_usage(self, args: argparse.Namespace) -> None:
        usage = self.api.usage()
        rows = [[d["day"], d["turns"], d["input_tokens"], d["output_tokens"], d["total_tokens"]]
                for d in usage["per_day"]]
        display(Markdown(table(rows, ["day (UTC)", "turns", "input", "output", "total"])))
        quota = usage["quota"]
        limit = quota["max_tokens_per_day"]
        print(f"acp: {quota['used_today']} tokens today" +
              (f" of {limit} ({quota['remaining']} left)" if limit else " (no daily quota)"))

    def _suspended(self, session_id: str) -> dict[str, Any] | None:
        """The session's model if it is suspended, else None: the server answers questions
        about a live agent (its mode, a running turn) only for a live session."""
        session = self.api.session(session_id)
        return session if session.get("state") == "suspended" else None

    def _cmd_mode(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(None)
        if args.mode is not None:
            self._awake(session_id)
        elif self._suspended(session_id):
            raise MagicError(f"Session {session_id[:12]} is suspended: its agent's modes are known "
                             f"once it runs (%acp resume {session_id[:8]}, or %acp mode MODE)")
        modes = self.api.mode(session_id, args.mode)
        names = ", ".join(m["id"] for m in modes["available"]) or "none"
        print(f"acp: mode {modes['current']} (available: {names})")

    def _cmd_model(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(None)
        if args.model is not None:
            self._awake(session_id)  # (a switch needs the agent)
            print(f"acp: model {self.api.model(session_id, args.model).get('current')}")
            return
        # the session model has the choice, kept while suspended too (the model endpoint asks
        # the live session only)
        session = self.api.session(session_id)
        models = session.get("models")
        if not models:
            raise MagicError(f"{session.get('agent_display_name') or session.get('agent')} offers "
                             "no choice of model")
        rows = [[("* " if m.get("value") == models.get("current") else "") + str(m.get("value")),
                 m.get("name") or "", m.get("description") or ""] for m in models.get("available") or []]
        display(Markdown(table(rows, ["model", "name", "description"])))

    def _cmd_commands(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(None)
        commands = self.api.commands(session_id)
        # agents announce their commands just after the session opens (an ACP notification, not
        # the answer): a cell run right after %acp start may come before them, so wait a little
        deadline = time.monotonic() + COMMANDS_WAIT
        while not commands and time.monotonic() < deadline:
            time.sleep(0.1)
            commands = self.api.commands(session_id)
        if not commands:
            print("acp: the agent has announced no slash commands")
            return
        rows = [["/" + str(c.get("name")), c.get("description") or "",
                 ((c.get("input") or {}).get("hint") or "")] for c in commands]
        display(Markdown(table(rows, ["command", "description", "input"])))

    def _cmd_cancel(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(None)
        if self._suspended(session_id):
            print("acp: no turn is running (the session is suspended)")
            return
        cancelled = self.api.cancel(session_id)
        print("acp: cancelled the running turn" if cancelled else "acp: no turn is running")

    def _cmd_undo(self, args: argparse.Namespace) -> None:
        session_id = self._resolve(args.session)
        edit_id = args.edit
        # a prefix, as the cell output shows it, names the one edit of this session it starts
        # (one the history no longer holds goes as given: the server says if it knows it)
        events = self.api.history(session_id).get("events") or []
        ids = {str((e.get("data") or {}).get("edit_id")) for e in events if e.get("type") == "notebook:edit"}
        matches = sorted(i for i in ids if i.startswith(edit_id))
        if len(matches) > 1 and edit_id not in matches:
            raise MagicError(f"{edit_id!r} matches several notebook edits; give more of the id")
        edit_id = edit_id if edit_id in matches or not matches else matches[0]
        answer = self.api.undo_edit(session_id, edit_id)
        record = answer.get("record") if isinstance(answer, dict) else None
        if isinstance(record, dict):
            display(Markdown(edit_markdown(record)))
        else:
            print(f"acp: undid edit {edit_id[:8]}")

    def _cmd_chat(self, args: argparse.Namespace) -> Any:
        from .widget import ChatPanel

        if args.agent:
            return ChatPanel(agent=args.agent, api=self.api)
        return ChatPanel(session_id=self._ensure_session(), api=self.api)


def load_ipython_extension(ipython: Any) -> None:
    ipython.register_magics(AcpMagics)
