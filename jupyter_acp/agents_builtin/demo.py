"""The demo agent: a real ACP agent on the official SDK, with no LLM behind it.

It is deterministic, so tests and benchmarks can predict every chunk and every token, and it
exercises what real agents do: streamed message chunks, tool calls that write through the
client's ``fs/write_text_file``, permission requests, terminals, plans, usage reports, cancel and
``session/load``. Every user-visible name says "demo".

Commands (the first word of the prompt):

==================  ==============================================================
``/write NAME TXT``  ask permission (unless in ``yolo`` mode), then write TXT to NAME (the
                     tool call's diff carries the old text when NAME existed)
``/edit NAME 3=X``   read NAME, replace its (1-based) line 3 with X (several ``N=TEXT``
                     allowed), then write it back as ``/write`` does: a diff with old text
``/read NAME``       read NAME through ``fs/read_text_file`` and reply with it
``/shell LINE``       run LINE with /bin/sh -c in a client terminal (a tool call whose content
                     is that terminal), reply with output
``/echo`` + newline  stream the text after the first newline verbatim, 8 characters a chunk
``/fill N``          one turn of N items: Markdown messages alternating with completed edit
                     tool calls (builds long conversations for benchmarks without round trips)
``/plan``            send a three-step plan
``/stream N``        stream N chunks as fast as possible (benchmarks)
``/sleep S``         stream one chunk, then wait S seconds (cancellable)
``/crash``           stream one chunk, then exit with status 3 mid-turn
``/oom``             allocate memory until the sandbox kills the process
``/fail``            answer the prompt with a JSON-RPC error
``/recall``          reply "Demo agent remembers: ..." with the session's earlier prompts
``/nb TOOL JSON``    call TOOL of the ``jupyter`` MCP server of ``session/new`` (after a
                     permission request unless in ``yolo`` mode), reply with its result
(config option)      ``style``: ``plain`` or ``shout`` (replies in upper case)
(config option)      ``model`` (category ``model``): ``demo-small`` or ``demo-large``; a
                     plain reply of ``demo-large`` starts with ``[demo-large]``
anything else        reply "Demo agent (no LLM) heard N words: ..." in several chunks
==================  ==============================================================

The commands are announced with ``available_commands_update`` after ``session/new``,
``session/load`` and ``session/resume``. A prompt's resources (``@file`` mentions) and images are
acknowledged first: "Demo agent got file NAME (N bytes)", "Demo agent got image TYPE (N bytes)".
Sessions are kept in the agent's home (``~/.jupyter-acp-demo``), so a new process continues
one with ``session/load`` (replayed) or ``session/resume`` (not replayed); ``session/close``
forgets it in memory only. ``--no-modes`` starts a demo whose sessions have no modes (some real
agents have none).

Tokens: input = words in the prompt, output = words in the reply. ``PromptResponse.usage`` is
cumulative per session (like the ACP draft and claude-agent-acp); ``usage_update`` carries the
context used (the cumulative total), a 100,000-token window and a cumulative cost of
0.000002 USD per token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import acp
from acp import helpers, schema
from acp.exceptions import RequestError
from acp.interfaces import Agent

from . import demo_mcp

CONTEXT_SIZE = 100_000
USD_PER_TOKEN = 0.000002
MODES = [("default", "Ask before writing"), ("yolo", "Write without asking")]
#: The demo's one config option (``session/set_config_option``): how replies are written.
STYLES = [("plain", "Plain"), ("shout", "Upper case")]
#: The demo's "models" (a config option of category ``model``): only the reply's prefix differs.
MODELS = [("demo-small", "Demo small"), ("demo-large", "Demo large")]
#: What ``available_commands_update`` announces (name, description, input hint).
COMMANDS = [("recall", "Repeat the earlier prompts of this session", None),
            ("write", "Write a file (asks permission)", "NAME TEXT"),
            ("read", "Read a file", "NAME"),
            ("shell", "Run a command in a terminal", "COMMAND LINE"),
            ("plan", "Send a three-step plan", None),
            ("nb", "Call a tool of the jupyter MCP server (the notebook tools)", "TOOL JSON")]


def _describe_block(block: Any) -> str:
    """How the demo acknowledges a non-text prompt block (the tests read these words)."""
    if isinstance(block, schema.ImageContentBlock):
        size = len(base64.b64decode(block.data, validate=False))
        return f"Demo agent got image {block.mime_type} ({size} bytes)."
    if isinstance(block, schema.EmbeddedResourceContentBlock):
        res = block.resource
        data = (res.text.encode() if isinstance(res, schema.TextResourceContents)
                else base64.b64decode(res.blob, validate=False))
        return f"Demo agent got file {res.uri.rsplit('/', 1)[-1]} ({len(data)} bytes)."
    if isinstance(block, schema.ResourceContentBlock):
        return f"Demo agent got a link to {block.name} ({block.size or 0} bytes)."
    return f"Demo agent got a {getattr(block, 'type', '?')} block."


def count_tokens(text: str) -> int:
    """The demo's tokenizer: one token per whitespace-separated word."""
    return len(text.split())


class DemoAgent:
    """Implements the ``acp.Agent`` protocol (only what the demo needs)."""

    def __init__(self, restore: str = "all", modes: bool = True) -> None:
        #: which ways to restore a session the demo advertises: ``all`` (resume and load),
        #: ``load`` (no resume), ``none`` (tests of the clients' fallbacks: ``--restore=``)
        self.restore = restore
        #: whether sessions have modes (``--no-modes``: an agent without, as some real ones are)
        self.with_modes = modes
        self.conn: Any = None
        self.sessions: dict[str, dict[str, Any]] = {}
        self.cancelled: dict[str, asyncio.Event] = {}
        self.state_dir = Path(os.environ.get("HOME") or ".") / ".jupyter-acp-demo"
        self.client_has_terminal = False
        #: the current prompt's whole text per session (``/echo`` needs its newlines)
        self.prompt_text: dict[str, str] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def on_connect(self, conn: Any) -> None:
        self.conn = conn

    # -- lifecycle ---------------------------------------------------------------------------
    async def initialize(self, protocol_version: int, client_capabilities=None, client_info=None,
                         **kwargs: Any) -> schema.InitializeResponse:
        self.client_has_terminal = bool(client_capabilities and client_capabilities.terminal)
        return schema.InitializeResponse(
            protocol_version=acp.PROTOCOL_VERSION,
            agent_capabilities=schema.AgentCapabilities(
                load_session=self.restore != "none",
                prompt_capabilities=schema.PromptCapabilities(image=True, embedded_context=True),
                session_capabilities=schema.SessionCapabilities(
                    resume=schema.SessionResumeCapabilities() if self.restore == "all" else None,
                    close=schema.SessionCloseCapabilities())),
            agent_info=schema.Implementation(name="jupyter-acp-demo", title="Demo agent (no LLM)",
                                             version="1"),
        )

    def _modes(self, current: str) -> schema.SessionModeState | None:
        if not self.with_modes:
            return None
        return schema.SessionModeState(
            current_mode_id=current,
            available_modes=[schema.SessionMode(id=i, name=n) for i, n in MODES],
        )

    @staticmethod
    def _config(state: dict[str, Any]
                ) -> list[schema.SessionConfigOptionSelect | schema.SessionConfigOptionBoolean]:
        return [schema.SessionConfigOptionSelect(
                    type="select", id="style", name="Reply style (demo)",
                    current_value=state.get("style", "plain"),
                    options=[schema.SessionConfigSelectOption(value=v, name=n) for v, n in STYLES]),
                schema.SessionConfigOptionSelect(
                    type="select", id="model", name="Model (demo)", category="model",
                    current_value=state.get("model", MODELS[0][0]),
                    options=[schema.SessionConfigSelectOption(value=v, name=n) for v, n in MODELS])]

    async def _announce_commands(self, sid: str) -> None:
        """Announced after the response that opened the session (like real agents do)."""
        await asyncio.sleep(0)
        commands = [schema.AvailableCommand(
            name=name, description=text,
            input=schema.AvailableCommandInput(schema.UnstructuredCommandInput(hint=hint)) if hint else None)
            for name, text, hint in COMMANDS]
        await self.conn.session_update(session_id=sid, update=helpers.update_available_commands(commands))

    def _later(self, aw: Any) -> None:
        task = asyncio.get_running_loop().create_task(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def new_session(self, cwd: str, additional_directories=None, mcp_servers=None,
                          **kwargs: Any) -> schema.NewSessionResponse:
        sid = f"demo-{uuid.uuid4().hex[:12]}"
        self.sessions[sid] = {"cwd": cwd, "mode": "default", "style": "plain", "model": MODELS[0][0],
                              "history": [], "usage": [0, 0], "mcp": demo_mcp.stdio_entry(mcp_servers)}
        self._save(sid)
        self._later(self._announce_commands(sid))
        return schema.NewSessionResponse(session_id=sid, modes=self._modes("default"),
                                         config_options=self._config(self.sessions[sid]))

    async def set_config_option(self, config_id: str, session_id: str, value: str | bool, **kwargs: Any):
        state = self._session(session_id)
        choices = {"style": STYLES, "model": MODELS}.get(config_id)
        if choices is None or value not in dict(choices):
            raise RequestError.invalid_params({"config_id": config_id, "value": value})
        state[config_id] = value
        self._save(session_id)
        return schema.SetSessionConfigOptionResponse(config_options=self._config(state))

    async def load_session(self, cwd: str, session_id: str, mcp_servers=None, additional_directories=None,
                           **kwargs: Any):
        state = self._restore(session_id, cwd)
        state["mcp"] = demo_mcp.stdio_entry(mcp_servers)  # (a new route each start: never the saved one)
        for role, text in state["history"]:
            update = (helpers.update_user_message_text(text) if role == "user"
                      else helpers.update_agent_message_text(text))
            await self.conn.session_update(session_id=session_id, update=update)
        self._later(self._announce_commands(session_id))
        return schema.LoadSessionResponse(modes=self._modes(state["mode"]),
                                          config_options=self._config(state))

    async def resume_session(self, session_id: str, cwd: str, additional_directories: Any = None,
                             mcp_servers: Any = None, **kwargs: Any) -> schema.ResumeSessionResponse:
        state = self._restore(session_id, cwd)  # (no replay: that is what resume is for)
        state["mcp"] = demo_mcp.stdio_entry(mcp_servers)
        self._later(self._announce_commands(session_id))
        return schema.ResumeSessionResponse(modes=self._modes(state["mode"]),
                                            config_options=self._config(state))

    async def close_session(self, session_id: str, **kwargs: Any) -> schema.CloseSessionResponse:
        self._session(session_id)
        self.sessions.pop(session_id, None)  # (its file stays: it can be loaded again)
        return schema.CloseSessionResponse()

    def _restore(self, session_id: str, cwd: str) -> dict[str, Any]:
        path = self.state_dir / f"{session_id}.json"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            raise RequestError.resource_not_found(session_id) from None
        state["cwd"] = cwd
        self.sessions[session_id] = state
        return state

    def _save(self, sid: str) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            saved = {k: v for k, v in self.sessions[sid].items() if k != "mcp"}  # (no route token on disk)
            (self.state_dir / f"{sid}.json").write_text(json.dumps(saved))
        except OSError:
            pass  # a read-only home: load_session will simply not find the session

    async def set_session_mode(self, session_id: str, mode_id: str, **kwargs: Any):
        if mode_id not in dict(MODES):
            raise RequestError.invalid_params({"mode_id": f"unknown mode {mode_id!r}"})
        self._session(session_id)["mode"] = mode_id
        await self.conn.session_update(session_id=session_id,
                                       update=helpers.update_current_mode(mode_id))
        return schema.SetSessionModeResponse()

    async def authenticate(self, method_id: str, **kwargs: Any):
        return schema.AuthenticateResponse()

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        if session_id in self.cancelled:
            self.cancelled[session_id].set()

    def _session(self, sid: str) -> dict[str, Any]:
        try:
            return self.sessions[sid]
        except KeyError:
            raise RequestError.invalid_params({"session_id": f"unknown session {sid!r}"}) from None

    # -- a prompt turn -----------------------------------------------------------------------
    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> schema.PromptResponse:
        state = self._session(session_id)
        text = " ".join(getattr(b, "text", "") for b in prompt
                        if isinstance(b, schema.TextContentBlock)).strip()
        received = [_describe_block(b) for b in prompt if not isinstance(b, schema.TextContentBlock)]
        cancel = self.cancelled[session_id] = asyncio.Event()
        self.prompt_text[session_id] = text
        words = text.split()
        command, args = (words[0], words[1:]) if words else ("", [])
        handler = getattr(self, f"_cmd_{command[1:]}", None) if command.startswith("/") else None
        reply_parts: list[str] = []
        stop: schema.StopReason = "end_turn"
        try:
            if received:
                reply_parts = await self._say(session_id, " ".join(received) + " ")
            if handler is None:
                model = state.get("model", MODELS[0][0])  # (the default one's replies are unchanged)
                prefix = f"[{model}] " if model != MODELS[0][0] else ""
                reply_parts += await self._say(
                    session_id, f"{prefix}Demo agent (no LLM) heard {len(words)} words: {text}")
            else:
                reply, stop = await handler(session_id, state, args, cancel)
                reply_parts += [reply] if reply else []
        finally:
            self.cancelled.pop(session_id, None)
            self.prompt_text.pop(session_id, None)
        reply = "".join(reply_parts)
        state["history"] += [["user", text], ["agent", reply]]
        state["usage"][0] += count_tokens(text)
        state["usage"][1] += count_tokens(reply)
        self._save(session_id)
        inp, out = state["usage"]
        total = inp + out
        await self.conn.session_update(
            session_id=session_id,
            update=schema.UsageUpdate(session_update="usage_update", used=total, size=CONTEXT_SIZE,
                                      cost=schema.Cost(amount=round(total * USD_PER_TOKEN, 9),
                                                       currency="USD")))
        return schema.PromptResponse(
            stop_reason=stop,
            usage=schema.Usage(input_tokens=inp, output_tokens=out, total_tokens=total),
        )

    async def _say(self, sid: str, text: str) -> list[str]:
        """Stream ``text`` as several chunks (one per word, spaces kept) and return them."""
        if self.sessions.get(sid, {}).get("style") == "shout":
            text = text.upper()
        chunks = [w + " " for w in text.split(" ")]
        chunks[-1] = chunks[-1][:-1]
        for chunk in chunks:
            await self.conn.session_update(session_id=sid, update=helpers.update_agent_message_text(chunk))
        return chunks

    async def _cmd_write(self, sid, state, args, cancel):
        if not args:
            return (await self._reply(sid, "Usage: /write NAME TEXT")), "end_turn"
        name, content = args[0], " ".join(args[1:]) + "\n"
        path = os.path.join(state["cwd"], name)
        existed = await asyncio.to_thread(os.path.isfile, path)  # (as the agent sees its workspace)
        old = await self._old_text(sid, path) if existed else None
        return await self._write(sid, state, f"Write {name}", path, content, old,
                                 f"Wrote {name} ({len(content.encode())} bytes).")

    async def _cmd_edit(self, sid, state, args, cancel):
        edits = [a.split("=", 1) for a in args[1:]]
        if not args or not edits or not all(len(e) == 2 and e[0].isdigit() and int(e[0]) > 0
                                            for e in edits):
            return (await self._reply(sid, "Usage: /edit NAME LINE=TEXT [LINE=TEXT ...]")), "end_turn"
        name = args[0]
        path = os.path.join(state["cwd"], name)
        old = await self._old_text(sid, path)
        if old is None:
            return (await self._reply(sid, f"Could not read {name}.")), "end_turn"
        lines = old.split("\n")
        for number, text in edits:
            index = int(number) - 1
            lines += [""] * (index + 1 - len(lines))  # (past the end: the file grows)
            lines[index] = text
        return await self._write(sid, state, f"Edit {name}", path, "\n".join(lines), old,
                                 f"Edited {name} ({len(edits)} lines).")

    async def _old_text(self, sid: str, path: str) -> str | None:
        """The file's text through the client's ``fs/read_text_file`` (None: unreadable)."""
        try:
            return (await self.conn.read_text_file(session_id=sid, path=path)).content
        except RequestError:
            return None

    async def _write(self, sid, state, title: str, path: str, content: str, old: str | None,
                     done: str) -> tuple[str, schema.StopReason]:
        """Write ``content`` as an edit tool call: permission (unless ``yolo``), then the
        client's ``fs/write_text_file``, then the call completed with its diff."""
        name = os.path.basename(path)
        call_id = f"write-{uuid.uuid4().hex[:8]}"
        await self.conn.session_update(session_id=sid, update=helpers.start_edit_tool_call(
            call_id, title, path, content))
        if state["mode"] != "yolo":
            decision = await self.conn.request_permission(
                session_id=sid,
                tool_call=schema.ToolCallUpdate(tool_call_id=call_id, title=title, kind="edit"),
                options=[
                    schema.PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
                    schema.PermissionOption(option_id="reject", name="Reject", kind="reject_once"),
                ],
            )
            outcome = decision.outcome
            if outcome.outcome == "cancelled":
                await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
                    call_id, status="failed"))
                return "", "cancelled"
            if outcome.option_id != "allow":
                await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
                    call_id, status="failed"))
                return (await self._reply(sid, f"Permission denied: did not write {name}.")), "end_turn"
        await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
            call_id, status="in_progress"))
        try:
            await self.conn.write_text_file(session_id=sid, path=path, content=content)
        except RequestError as e:
            await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
                call_id, status="failed"))
            return (await self._reply(sid, f"Could not write {name}: {e}")), "end_turn"
        await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
            call_id, status="completed", content=[helpers.tool_diff_content(path, content, old_text=old)]))
        return (await self._reply(sid, done)), "end_turn"

    async def _cmd_echo(self, sid, state, args, cancel):
        text = self.prompt_text.get(sid, "").partition("\n")[2]
        for i in range(0, len(text), 8):
            await self.conn.session_update(session_id=sid,
                                           update=helpers.update_agent_message_text(text[i:i + 8]))
        return text, "end_turn"

    async def _cmd_fill(self, sid, state, args, cancel):
        n = int(args[0]) if args and args[0].isdigit() else 10
        said: list[str] = []
        for i in range(n):
            if i % 2 == 0:  # a message: one chunk, a few Markdown lines
                text = (f"**Message {i // 2 + 1}** of the fill, with `code` and *emphasis*.\n\n"
                        f"- first point of {i}\n- second point\n\nA closing line.\n")
                said.append(text)
                await self.conn.session_update(session_id=sid,
                                               update=helpers.update_agent_message_text(text))
            else:  # a completed edit tool call with a small diff (it also separates the messages)
                path = os.path.join(state["cwd"], f"fill-{i}.txt")
                await self.conn.session_update(session_id=sid, update=helpers.start_tool_call(
                    f"fill-{uuid.uuid4().hex[:8]}", f"Edit fill-{i}.txt", kind="edit", status="completed",
                    content=[helpers.tool_diff_content(path, f"one\nTWO {i}\nthree\n",
                                                       old_text="one\ntwo\nthree\n")],
                    locations=[schema.ToolCallLocation(path=path)]))
            if i % 50 == 49:
                await asyncio.sleep(0)  # (let the cancel and other sessions in)
            if cancel.is_set():
                return "".join(said), "cancelled"
        return "".join(said), "end_turn"

    async def _cmd_nb(self, sid, state, args, cancel):
        entry = state.get("mcp")
        if not args or entry is None:
            return (await self._reply(sid, "Usage: /nb TOOL JSON (needs the jupyter MCP server)")), "end_turn"
        tool, raw = args[0], " ".join(args[1:]) or "{}"
        try:
            arguments = json.loads(raw)
        except ValueError:
            return (await self._reply(sid, f"Not JSON: {raw}")), "end_turn"
        call_id = f"nb-{uuid.uuid4().hex[:8]}"
        kind: Any = ("execute" if tool.startswith("run") else "read" if tool.startswith(("list", "read"))
                     else "edit")
        # as Qwen Code shows an MCP call: the tool's full name in _meta, its arguments as rawInput
        title, meta = f"jupyter: {tool}", {"toolName": f"mcp__jupyter__{tool}"}
        start = helpers.start_tool_call(call_id, title, kind=kind, status="pending", raw_input=arguments)
        await self.conn.session_update(session_id=sid, update=start.model_copy(update={"field_meta": meta}))
        if state["mode"] != "yolo" and kind != "read":
            decision = await self.conn.request_permission(
                session_id=sid,
                tool_call=schema.ToolCallUpdate(tool_call_id=call_id, title=title, kind=kind,
                                                raw_input=arguments, field_meta=meta),
                options=[schema.PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
                         schema.PermissionOption(option_id="reject", name="Reject", kind="reject_once")])
            if getattr(decision.outcome, "option_id", None) != "allow":
                await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
                    call_id, status="failed"))
                return (await self._reply(sid, f"Permission denied: did not call {tool}.")), "end_turn"
        ok, text = await demo_mcp.call_tool(entry, tool, arguments)
        await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
            call_id, status="completed" if ok else "failed",
            content=[helpers.tool_content(helpers.text_block(text))]))
        return (await self._reply(sid, f"{tool}: {text}")), "end_turn"

    async def _cmd_read(self, sid, state, args, cancel):
        path = args[0] if args and os.path.isabs(args[0]) else os.path.join(state["cwd"], *args[:1])
        try:
            resp = await self.conn.read_text_file(session_id=sid, path=path)
        except RequestError as e:
            return (await self._reply(sid, f"Could not read {path}: {e} {e.data or ''}".strip())), "end_turn"
        return (await self._reply(sid, resp.content)), "end_turn"

    async def _cmd_shell(self, sid, state, args, cancel):
        if not args:
            return (await self._reply(sid, "Usage: /shell COMMAND LINE")), "end_turn"
        if not self.client_has_terminal:
            return (await self._reply(sid, "This client offers no terminal.")), "end_turn"
        line = " ".join(args)
        term = await self.conn.create_terminal(session_id=sid, command="/bin/sh", args=["-c", line],
                                               cwd=state["cwd"], output_byte_limit=65536)
        call_id = f"shell-{uuid.uuid4().hex[:8]}"
        await self.conn.session_update(session_id=sid, update=helpers.start_tool_call(
            call_id, f"Run {line}", kind="execute", status="in_progress", raw_input={"command": line},
            content=[helpers.tool_terminal_ref(term.terminal_id)]))
        exit_status = await self.conn.wait_for_terminal_exit(session_id=sid, terminal_id=term.terminal_id)
        output = await self.conn.terminal_output(session_id=sid, terminal_id=term.terminal_id)
        await self.conn.session_update(session_id=sid, update=helpers.update_tool_call(
            call_id, status="completed" if exit_status.exit_code == 0 else "failed"))
        await self.conn.release_terminal(session_id=sid, terminal_id=term.terminal_id)
        return (await self._reply(sid, f"exit {exit_status.exit_code}: {output.output}")), "end_turn"

    async def _cmd_plan(self, sid, state, args, cancel):
        entries = [helpers.plan_entry(f"Step {i}", priority="medium", status="pending") for i in (1, 2, 3)]
        await self.conn.session_update(session_id=sid, update=helpers.update_plan(entries))
        return (await self._reply(sid, "Planned 3 steps.")), "end_turn"

    async def _cmd_stream(self, sid, state, args, cancel):
        n = int(args[0]) if args and args[0].isdigit() else 100
        for i in range(n):
            await self.conn.session_update(session_id=sid,
                                           update=helpers.update_agent_message_text(f"c{i} "))
        return "", "end_turn"

    async def _cmd_sleep(self, sid, state, args, cancel):
        seconds = float(args[0]) if args else 30.0
        await self._reply(sid, "Sleeping... ")
        try:
            await asyncio.wait_for(cancel.wait(), seconds)
        except asyncio.TimeoutError:
            return (await self._reply(sid, "awake.")), "end_turn"
        return "", "cancelled"

    async def _cmd_crash(self, sid, state, args, cancel):
        await self._reply(sid, "About to crash. ")
        sys.stderr.write("demo agent: crashing on purpose (/crash)\n")
        sys.stderr.flush()
        os._exit(3)

    async def _cmd_oom(self, sid, state, args, cancel):
        await self._reply(sid, "Allocating memory until the sandbox stops me. ")
        hog = []
        while True:  # the sandbox's memory limit ends this
            hog.append(bytearray(16 * 1024 * 1024))
            for i in range(0, len(hog[-1]), 4096):
                hog[-1][i] = 1
            await asyncio.sleep(0)

    async def _cmd_recall(self, sid, state, args, cancel):
        prompts = [text for role, text in state["history"] if role == "user"]
        return (await self._reply(sid, "Demo agent remembers: " + " | ".join(prompts))), "end_turn"

    async def _cmd_fail(self, sid, state, args, cancel):
        raise RequestError.internal_error({"details": "the demo agent failed on purpose (/fail)"})

    async def _reply(self, sid: str, text: str) -> str:
        return "".join(await self._say(sid, text))


if TYPE_CHECKING:
    class _CheckedAgent(DemoAgent):
        """``DemoAgent`` plus exactly the ``acp.Agent`` members it leaves out: mypy checks that
        this satisfies the protocol, i.e. that the rest of DemoAgent does (see ``main``)."""

        async def list_sessions(self, cwd: str | None = None, cursor: str | None = None,
                                **kwargs: Any) -> schema.ListSessionsResponse: ...

        async def fork_session(self, session_id: str, cwd: str, additional_directories: Any = None,
                               mcp_servers: Any = None, **kwargs: Any) -> schema.ForkSessionResponse: ...

        async def ext_method(self, method: str, params: dict[str, Any]) -> dict[str, Any]: ...

        async def ext_notification(self, method: str, params: dict[str, Any]) -> None: ...

    def _checked(agent: _CheckedAgent) -> Agent:
        return agent


def main() -> None:
    # The SDK's Agent protocol lists every method, but its router looks each one up with
    # getattr and answers a missing one "method not found". The SDK counts session/resume and
    # session/close as unstable (it refuses them unless told otherwise), though the protocol
    # and the real agents have them: the demo offers them, like Qwen Code and Codex do.
    restore = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--restore=")), "all")
    agent = DemoAgent(restore, modes="--no-modes" not in sys.argv[1:])
    asyncio.run(acp.run_agent(cast(Agent, agent), use_unstable_protocol=True))


if __name__ == "__main__":
    main()
