"""ACP terminals in a container: ``docker exec`` with stdout and stderr merged (``CommandProcess``).

The engine gives no pid for an exec and cannot signal one, so the command is wrapped in a
``/bin/sh`` that records its pid (the leader of the exec's process group) in a pid file in the
container's ``/tmp``; ``kill()`` is then a second exec that kills that group.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import secrets
from collections.abc import Sequence

from ...errors import SandboxError
from ..base import STDIO_LINE_LIMIT, check_command
from .engine import Engine, explain, run_blocking
from .spec import exit_status
from .stdio import Bridge, demultiplex

log = logging.getLogger("jupyter_acp.sandbox")


async def start_exec(engine: Engine, cid: str, argv: Sequence[str], *, env: dict[str, str], cwd: str,
                     user: str, stdin: bool = False
                     ) -> tuple[str, str, asyncio.StreamReader, asyncio.StreamWriter, Bridge | None]:
    """Start ``argv`` in container ``cid`` with exactly ``env`` in ``cwd`` as ``user``; returns the
    exec id, its pid file and its (multiplexed) stream. ``stdin``: the stream's write side is
    the command's stdin, and half-closing it is EOF (an agent started in a warm-pool spare)."""
    # the exec runs in the container, but "NAME=VALUE" strings must still parse back the same
    check_command(argv, env)
    if "\x00" in cwd:
        raise SandboxError("The working directory holds a NUL byte")
    pidfile = f"/tmp/.jupyter-acp-exec-{secrets.token_hex(6)}"
    # record the command's pid (it leads the exec's process group) so that kill() can reach it
    wrapped = ["/bin/sh", "-c", 'echo $$ > "$0" 2>/dev/null; exec "$@"', pidfile, *argv]
    environment = [f"{k}={v}" for k, v in env.items()]
    try:
        exec_id = (await run_blocking(engine.api.exec_create, cid, wrapped, stdout=True, stderr=True,
                                      stdin=stdin, tty=False, environment=environment,
                                      workdir=cwd, user=user))["Id"]
    except Exception as e:
        raise OSError(errno.ESRCH, f"cannot run a command in the sandbox: {explain(e)}") from e
    reader, writer, bridge = await engine.hijack(
        "POST", f"/exec/{exec_id}/start", body={"Detach": False, "Tty": False},
        sdk_fallback=lambda: engine.api.exec_start(exec_id, socket=True))
    return exec_id, pidfile, reader, writer, bridge


async def signal_exec(engine: Engine, cid: str, pidfile: str, user: str, signal: str = "KILL") -> None:
    """Send ``signal`` to the process group an exec recorded in ``pidfile`` (best effort)."""
    script = (f'p=$(cat "$0" 2>/dev/null) && '
              f'{{ kill -{signal} -- "-$p" 2>/dev/null || kill -{signal} "$p"; }}'
              + ('; rm -f "$0"' if signal == "KILL" else ""))
    try:
        exec_id = (await run_blocking(engine.api.exec_create, cid, ["/bin/sh", "-c", script, pidfile],
                                      stdout=False, stderr=False, user=user))["Id"]
        await run_blocking(engine.api.exec_start, exec_id, detach=True)
    except Exception as e:
        log.debug("Could not signal exec %s in %s: %s", pidfile, cid[:12], e)


async def exec_command(engine: Engine, cid: str, argv: Sequence[str], *, env: dict[str, str], cwd: str,
                       user: str) -> DockerCommand:
    """An ACP terminal command: ``argv`` in container ``cid``, stdout and stderr merged."""
    exec_id, pidfile, reader, writer, bridge = await start_exec(engine, cid, argv, env=env, cwd=cwd,
                                                                user=user)
    return DockerCommand(engine, cid, exec_id, pidfile, user, reader, writer, bridge)


class DockerCommand:
    """A command started by ``docker exec`` in the agent's container (``CommandProcess``)."""

    def __init__(self, engine: Engine, cid: str, exec_id: str, pidfile: str, user: str,
                 raw: asyncio.StreamReader, writer: asyncio.StreamWriter, bridge: Bridge | None) -> None:
        self.engine = engine
        self.container_id = cid
        self.exec_id = exec_id
        self.pidfile = pidfile
        self.user = user
        self.returncode: int | None = None
        self.stdout: asyncio.StreamReader | None = asyncio.StreamReader(limit=STDIO_LINE_LIMIT)
        self._writer = writer
        self._bridge = bridge
        self._killed = False
        self._kill_task: asyncio.Task[None] | None = None
        self._pump = asyncio.create_task(self._read(raw), name="acp-docker-exec")
        self._wait_task: asyncio.Future[int] | None = None

    async def _read(self, raw: asyncio.StreamReader) -> None:
        assert self.stdout is not None
        try:
            await demultiplex(raw, self.stdout.feed_data, self.stdout.feed_data)  # merged, like 2>&1
        finally:
            self.stdout.feed_eof()
            self._writer.close()
            if self._bridge is not None:
                self._bridge.close()

    async def wait(self) -> int:
        if self._wait_task is None:
            self._wait_task = asyncio.ensure_future(self._wait())
        return await asyncio.shield(self._wait_task)

    async def _wait(self) -> int:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(self._pump)
        delay = 0.005
        while True:
            try:
                info = await run_blocking(self.engine.api.exec_inspect, self.exec_id)
            except Exception:
                info = None  # the container (and its execs) are gone
            if info is None or not info.get("Running"):
                code = info.get("ExitCode") if info else None
                status = exit_status(code)
                if self._killed and status in (-9, 137):
                    status = -9
                self.returncode = status
                return status
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)

    def kill(self) -> None:
        if self.returncode is not None or self._kill_task is not None:
            return
        self._killed = True
        self._kill_task = asyncio.ensure_future(self._kill())

    async def _kill(self) -> None:
        await signal_exec(self.engine, self.container_id, self.pidfile, self.user, "KILL")
