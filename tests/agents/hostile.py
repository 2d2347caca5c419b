"""A hostile ACP agent for the adversarial suite: it does what the test tells it, as an attacker.

It is a real agent on the official SDK, started like any admin-defined agent (``python
hostile.py``) inside the sandbox under test. Each prompt is one JSON object naming an attack;
the reply is one ``agent_message_chunk`` holding a JSON object with what happened, so a test
reads the outcome from ``TurnResult.text``. Attacks (``op``):

``call``      ``{"method": "create_terminal", "params": {...}}`` — a typed call of the SDK's
              agent-side connection (snake_case keyword arguments) → ``{"ok": result}`` or
              ``{"error": {"code", "message", "data"}}``
``raw``       ``{"method": "terminal/create", "params": {...}}`` — a raw JSON-RPC request with any
              params at all, past the SDK's own validation → the same shape
``sh``        ``{"cmd": "..."}`` — run a shell line in the agent's own process tree (inside its
              sandbox) → ``{"status", "output"}`` (output cut to 64 KiB)
``flood``     ``{"count": N, "size": S, "kind": "message"|"thought"|"tool"}`` — N session updates
              of S bytes each, as fast as possible → ``{"sent": N}``
``race``      ``{"tries": N, "mode": "read"|"write"}`` — swap ``race/d`` (a directory) and
              ``race/l`` (a symlink to ``outside``, an absolute host path given by the test)
              with ``renameat2(RENAME_EXCHANGE)`` in a tight loop while reading (or writing)
              ``race/d/secret`` through ``fs/*`` → ``{"outside": how many reached outside,
              "inside": ..., "refused": ...}``
``fifo``      ``{"count": N}`` — make ``fifo-K`` FIFOs (no writer) and read them all at once
              through ``fs/read_text_file`` → ``{"results": [...], "seconds": ...}``
``permissions`` ``{"count": N}`` — N permission requests at once → ``{"answers": [...]}``
``mode``      ``{"mode": "yolo", "wait": 2}`` — announce a switch of its own to that mode
              (``current_mode_update``), then wait up to ``wait`` s for the client to set another
              → ``{"mode": now, "set_by_client": [...]}``

Modes: with ``HOSTILE_MODES=default,yolo`` in its environment the agent offers those modes in
``session/new`` (starting in ``HOSTILE_START_MODE``, else the first) and accepts
``session/set_mode`` (refuses it with ``HOSTILE_STUCK=1``); without it, it offers no modes.
``term_stat`` ``{"params": {...}}`` — create a terminal (``create_terminal`` keyword arguments),
              wait for it, release it → ``{"bytes", "truncated", "tail"}`` of its output
``notify``    ``{"method", "params", "count"}`` — raw notifications, any shape → ``{"sent": N}``
``many``      ``{"method", "params", "count"}`` — one raw request N times at once → error codes

Nothing here is a mock: every request crosses the real stdio into the real server.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import acp
from acp import helpers, schema
from acp.exceptions import RequestError

RENAME_EXCHANGE = 2
OUTPUT_CAP = 64 * 1024


def _error(e: BaseException) -> dict[str, Any]:
    if isinstance(e, RequestError):
        return {"error": {"code": e.code, "message": str(e), "data": e.data}}
    return {"error": {"code": None, "message": f"{type(e).__name__}: {e}", "data": None}}


def _dump(value: Any) -> Any:
    if value is None:
        return None
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json", by_alias=True, exclude_none=True)
    return value


class Swapper(threading.Thread):
    """Exchanges two names in a loop (the attacker's half of a TOCTOU race)."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(daemon=True)
        self.a, self.b = a.encode(), b.encode()
        self.stop = threading.Event()
        self.swaps = 0
        self.libc = ctypes.CDLL(None, use_errno=True)

    def run(self) -> None:
        at_fdcwd = -100
        while not self.stop.is_set():
            if self.libc.renameat2(at_fdcwd, self.a, at_fdcwd, self.b, RENAME_EXCHANGE) == 0:
                self.swaps += 1


class HostileAgent:
    def __init__(self) -> None:
        self.conn: Any = None
        self.cwd = os.getcwd()
        self.modes = [m for m in os.environ.get("HOSTILE_MODES", "").split(",") if m]
        self.mode = os.environ.get("HOSTILE_START_MODE") or (self.modes[0] if self.modes else None)
        self.set_by_client: list[str] = []
        self.mode_set = asyncio.Event()

    def on_connect(self, conn: Any) -> None:
        self.conn = conn

    async def initialize(self, protocol_version: int, client_capabilities: Any = None,
                         client_info: Any = None, **kwargs: Any) -> schema.InitializeResponse:
        return schema.InitializeResponse(
            protocol_version=protocol_version,
            agent_capabilities=schema.AgentCapabilities(load_session=False),
            agent_info=schema.Implementation(name="hostile", title="Hostile test agent", version="1"),
        )

    async def new_session(self, cwd: str, mcp_servers: Any = None,
                          **kwargs: Any) -> schema.NewSessionResponse:
        self.cwd = cwd
        if not self.modes:
            return schema.NewSessionResponse(session_id=uuid.uuid4().hex)
        modes = schema.SessionModeState(current_mode_id=self.mode, available_modes=[
            schema.SessionMode(id=m, name=m) for m in self.modes])
        return schema.NewSessionResponse(session_id=uuid.uuid4().hex, modes=modes)

    async def set_session_mode(self, session_id: str, mode_id: str, **kwargs: Any) -> Any:
        if os.environ.get("HOSTILE_STUCK"):
            raise RequestError.internal_error({"details": "this agent stays in its mode"})
        self.set_by_client.append(mode_id)
        self.mode = mode_id
        self.mode_set.set()
        return schema.SetSessionModeResponse()

    async def authenticate(self, method_id: str, **kwargs: Any) -> None:
        return None

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        return None

    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> schema.PromptResponse:
        text = " ".join(getattr(b, "text", "") for b in prompt).strip()
        try:
            order = json.loads(text)
            handler = getattr(self, f"_op_{order.pop('op')}")
            result = await handler(session_id, **order)
        except Exception as e:  # the test reads what went wrong from the reply
            result = _error(e)
        await self.conn.session_update(
            session_id=session_id, update=helpers.update_agent_message_text(json.dumps(result, default=str)))
        return schema.PromptResponse(stop_reason="end_turn")

    # -- attacks -----------------------------------------------------------------------------
    async def _op_call(self, sid: str, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            return {"ok": _dump(await getattr(self.conn, method)(session_id=sid, **(params or {})))}
        except Exception as e:
            return _error(e)

    async def _op_raw(self, sid: str, method: str, params: Any = None) -> dict[str, Any]:
        if isinstance(params, dict):
            params = {"sessionId": sid, **params}
        try:
            return {"ok": await self.conn._conn.send_request(method, params)}
        except Exception as e:
            return _error(e)

    async def _op_notify(self, sid: str, method: str, params: Any = None, count: int = 1) -> dict[str, Any]:
        """Raw JSON-RPC notifications (``session/update`` of any shape, unknown methods)."""
        if isinstance(params, dict) and method == "session/update":
            params = {"sessionId": sid, **params}
        for _ in range(count):
            await self.conn._conn.send_notification(method, params)
        return {"sent": count}

    async def _op_many(self, sid: str, method: str, params: Any = None, count: int = 1) -> dict[str, Any]:
        """The same raw request ``count`` times at once; how many came back as errors, by code."""
        if isinstance(params, dict):
            params = {"sessionId": sid, **params}

        async def one() -> Any:
            try:
                await self.conn._conn.send_request(method, params)
                return "ok"
            except RequestError as e:
                return e.code
            except Exception as e:
                return type(e).__name__

        results = await asyncio.gather(*(one() for _ in range(count)))
        return {"results": {str(k): results.count(k) for k in set(results)}}

    async def _op_sh(self, sid: str, cmd: str) -> dict[str, Any]:
        proc = await asyncio.create_subprocess_exec(
            "/bin/sh", "-c", cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        out, _ = await proc.communicate()
        return {"status": proc.returncode, "output": out[:OUTPUT_CAP].decode(errors="replace")}

    async def _op_flood(self, sid: str, count: int, size: int, kind: str = "message") -> dict[str, Any]:
        blob = "x" * size
        for i in range(count):
            if kind == "thought":
                update: Any = helpers.update_agent_thought_text(blob)
            elif kind == "tool":
                update = schema.ToolCallStart(session_update="tool_call", tool_call_id=f"t{i}", title=blob,
                                              status="pending")
            else:
                update = helpers.update_agent_message_text(blob)
            await self.conn.session_update(session_id=sid, update=update)
        return {"sent": count}

    async def _op_race(self, sid: str, outside: str, tries: int = 1000, mode: str = "read") -> dict[str, Any]:
        base = os.path.join(self.cwd, "race")
        os.makedirs(os.path.join(base, "d"), exist_ok=True)
        with open(os.path.join(base, "d", "secret"), "w") as f:
            f.write("inside\n")
        link = os.path.join(base, "l")
        if os.path.lexists(link):
            os.unlink(link)
        os.symlink(outside, link)
        swapper = Swapper(os.path.join(base, "d"), link)
        swapper.start()
        counts = {"outside": 0, "inside": 0, "refused": 0, "missing": 0}
        path = os.path.join(base, "d", "secret") if os.path.isabs(self.cwd) else "race/d/secret"
        try:
            for i in range(tries):
                try:
                    if mode == "read":
                        resp = await self.conn.read_text_file(session_id=sid, path=path)
                        key = "outside" if "OUTSIDE" in resp.content else "inside"
                    else:
                        await self.conn.write_text_file(session_id=sid, path=path, content=f"written {i}\n")
                        key = "inside"
                    counts[key] += 1
                except RequestError as e:
                    counts["missing" if e.code == -32002 else "refused"] += 1
                if i % 50 == 0:
                    await asyncio.sleep(0)
        finally:
            swapper.stop.set()
            swapper.join()
        return {**counts, "swaps": swapper.swaps}

    async def _op_fifo(self, sid: str, count: int = 8) -> dict[str, Any]:
        paths = []
        for k in range(count):
            path = os.path.join(self.cwd, f"fifo-{k}")
            if not os.path.exists(path):
                os.mkfifo(path)
            paths.append(path)
        started = time.monotonic()

        async def read(path: str) -> dict[str, Any]:
            try:
                resp = await self.conn.read_text_file(session_id=sid, path=path)
                return {"ok": len(resp.content)}
            except Exception as e:
                return _error(e)

        results = await asyncio.gather(*(read(p) for p in paths))
        return {"results": results, "seconds": time.monotonic() - started}

    async def _op_permissions(self, sid: str, count: int = 1) -> dict[str, Any]:
        options = [schema.PermissionOption(option_id="allow", name="Allow", kind="allow_once"),
                   schema.PermissionOption(option_id="reject", name="Reject", kind="reject_once")]

        async def ask(i: int) -> Any:
            try:
                resp = await self.conn.request_permission(
                    session_id=sid, options=options,
                    tool_call=schema.ToolCallUpdate(tool_call_id=f"p{i}", title=f"attack {i}"))
                return _dump(resp.outcome)
            except Exception as e:
                return _error(e)

        return {"answers": await asyncio.gather(*(ask(i) for i in range(count)))}

    async def _op_mode(self, sid: str, mode: str, wait: float = 2.0) -> dict[str, Any]:
        self.mode = mode
        self.mode_set.clear()
        await self.conn.session_update(session_id=sid, update=helpers.update_current_mode(mode))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.mode_set.wait(), wait)
        return {"mode": self.mode, "set_by_client": self.set_by_client}

    async def _op_term_stat(self, sid: str, params: dict[str, Any]) -> dict[str, Any]:
        """Create a terminal, wait, read and release it; report sizes, not the output itself
        (which may be huge) → ``{"bytes", "truncated", "tail"}`` or the error."""
        try:
            made = await self.conn.create_terminal(session_id=sid, **params)
            tid = made.terminal_id
            await self.conn.wait_for_terminal_exit(session_id=sid, terminal_id=tid)
            out = await self.conn.terminal_output(session_id=sid, terminal_id=tid)
            await self.conn.release_terminal(session_id=sid, terminal_id=tid)
        except Exception as e:
            return _error(e)
        return {"bytes": len(out.output.encode()), "truncated": out.truncated, "tail": out.output[-100:]}


def main() -> None:
    asyncio.run(acp.run_agent(HostileAgent()))


if __name__ == "__main__":
    sys.exit(main())
