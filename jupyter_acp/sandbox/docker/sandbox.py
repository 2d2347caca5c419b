"""One agent session in one container: the per-session ``Sandbox`` of the Docker backend.

Made by ``DockerSandbox.create`` (the admin's configuration, ``backend.py``) and holding a
reference to it, never a copy of the traits: the settings are read once, at ``start``, into a
frozen ``DockerSettings``. Two ways to start:

* cold: the container's command is the agent; it is attached before it starts (not a byte is
  lost) and the container's exit is the agent's.
* from the warm pool (``pool.py``): a running spare that holds nothing of any session; the
  spare's home and gateway socket directories take the place of the session's on the host
  (``adopt_dir``), and the agent is exec'd in it with the session's environment. The exec's
  stream is the agent's stdio and the exec's exit is the agent's; the container goes when the
  session does.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from ...errors import SandboxError
from ..base import AGENT_HOME, STDIO_LINE_LIMIT, CommandProcess, Sandbox, SandboxSpec
from .engine import Engine, explain, not_found, run_blocking
from .exec import exec_command, signal_exec, start_exec
from .pool import Spare
from .spec import GATEWAY_TARGET, exit_status, pool_key, spare_template
from .stdio import BoundedReader, Bridge, demultiplex

if TYPE_CHECKING:
    from .backend import DockerSandbox

log = logging.getLogger("jupyter_acp.sandbox")


class ContainerSandbox(Sandbox):
    """An agent in its own Docker container (configured by ``c.DockerSandbox.*``)."""

    kind: ClassVar[str] = "docker"
    isolated: ClassVar[bool] = True

    def __init__(self, spec: SandboxSpec, backend: DockerSandbox) -> None:
        super().__init__(spec)
        self.backend = backend
        self.container_id: str | None = None
        self.container_name: str | None = None
        self.from_pool = False
        self.create_kwargs: dict[str, Any] | None = None
        self._engine: Engine | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._bridge: Bridge | None = None
        self._demux: asyncio.Task[None] | None = None
        self._stream_done = asyncio.Event()
        self._wait_task: asyncio.Future[int] | None = None
        self._status: int | None = None
        self._oom = False
        self._gone = False
        self._stderr_buf = b""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._enforced: dict[str, bool] = {}
        #: Set at the agent's first output (it has started): the pool refills after it.
        self._first_output = asyncio.Event()
        #: From the warm pool: the agent's exec and the file holding its pid.
        self._exec_id: str | None = None
        self._pidfile: str | None = None

    @property
    def workspace_path(self) -> str:
        return self.backend.workspace_mount_path

    def container_args(self, *, session: str | None = None) -> dict[str, Any]:
        """This session's ``containers.create`` arguments (see ``spec.build_create_kwargs``)."""
        return self.backend.create_kwargs_for(self.spec, engine=self._engine, session=session)

    def limits_enforced(self) -> dict[str, bool]:
        return {"mem_limit": False, "cpu_limit": False, "pids_limit": False, **self._enforced,
                "disk_limit": False, "network": not self.spec.limits.network}

    def _note_enforced(self, engine: Engine) -> None:
        limits, info = self.spec.limits, engine.info
        self._enforced = {
            "mem_limit": bool(limits.mem_limit) and info.get("MemoryLimit", True) is not False,
            "cpu_limit": bool(limits.cpu_limit) and info.get("CpuCfsQuota", True) is not False,
            "pids_limit": bool(limits.pids_limit) and info.get("PidsLimit", True) is not False,
        }
        missing = [name for name, value in self._enforced.items() if getattr(limits, name) and not value]
        if missing and self.backend.limits_required:
            raise SandboxError(
                f"The Docker engine cannot enforce {', '.join(missing)} here (its cgroups are not "
                "available to it, e.g. a rootless engine without cgroup delegation), and the admin's "
                "policy (c.DockerSandbox.limits_required = True) refuses to run an agent without its "
                "limits. An admin can give the engine cgroup delegation, or set "
                "c.DockerSandbox.limits_required = False. See docs/jupyterhub.md.")
        for name in missing:
            self.backend.log.warning("The Docker engine cannot enforce %s here; it is not enforced", name)
        if limits.disk_limit:
            self.backend.log.warning(
                "disk_limit (%d bytes) is not enforced for session %s: the agent writes to its bind-mounted "
                "workspace, which Docker cannot cap; give users a size-limited workspace file system",
                limits.disk_limit, self.spec.labels.get("session", "?"))

    def _chown_rw_paths(self, user: str) -> None:
        """Give the session's private writable paths to the container user (root servers only)."""
        if not (self.backend.chown_rw_paths and os.geteuid() == 0 and self._engine and self._engine.local):
            return
        uid_s, _, gid_s = user.partition(":")
        try:
            uid, gid = int(uid_s), int(gid_s or uid_s)
        except ValueError:
            return  # a user name: we cannot know its uid here
        own = [d for d in (self.spec.home, self.spec.gateway_dir) if d]
        for top in [*self.spec.rw_paths, *own]:  # and what the server wrote there (settings, sockets)
            for path in [top, *(os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files)]:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if st.st_uid == 0 and (st.st_uid, st.st_gid) != (uid, gid):
                        os.lchown(path, uid, gid)

    # -- start ---------------------------------------------------------------------------------
    async def start(self) -> None:
        backend = self.backend
        engine = self._engine = await backend.engine_async()
        kwargs = self.create_kwargs = self.container_args()
        self._note_enforced(engine)
        pool = backend.pool
        template = spare_template(kwargs, idle_command=backend.warm_pool_idle_command)
        key = pool_key(template) if pool.size > 0 else None
        spare = pool.take(key) if key else None
        try:
            if spare is not None:
                await self._claim(engine, spare, kwargs)
            if self.container_id is None:
                await asyncio.to_thread(self._chown_rw_paths, kwargs["user"])
                await self._start_cold(engine, kwargs)
        except BaseException:
            await self.remove()
            raise
        if key is not None:
            pool.replenish(key, template, after=self._first_output)

    async def _start_cold(self, engine: Engine, kwargs: dict[str, Any]) -> None:
        try:
            self.container_id = await run_blocking(engine.create, kwargs)
        except Exception as e:
            if not_found(e):
                raise SandboxError(f"The sandbox image {kwargs['image']} does not exist in the Docker "
                                   "engine; build it (scripts/sandbox-image or the Dockerfile)") from e
            raise SandboxError(f"Docker could not create the agent container: {explain(e)}") from e
        self.container_name = kwargs["name"]
        await self._attach(engine)  # before start: not a byte is lost
        try:
            await run_blocking(engine.api.start, self.container_id)
        except Exception as e:
            raise SandboxError(f"Docker could not start the agent container: {explain(e)}") from e

    async def _claim(self, engine: Engine, spare: Spare, kwargs: dict[str, Any]) -> None:
        """Run the agent in a spare; leaves ``container_id`` unset (start cold) if it cannot."""
        try:
            state = (await run_blocking(engine.api.inspect_container, spare.id))["State"]
        except Exception:
            state = {}
        if not state.get("Running"):
            await self.backend.pool.discard(spare)
            return  # a dead spare: start cold instead
        ours = {AGENT_HOME: self.spec.home, GATEWAY_TARGET: self.spec.gateway_dir}
        try:
            for target, spare_dir in spare.dirs.items():
                if (session_dir := ours.get(target)) is not None:
                    await asyncio.to_thread(adopt_dir, spare_dir, session_dir)
        except OSError as e:
            self.backend.log.warning("Could not give warm-pool directories to session %s (%s); starting "
                                     "cold", self.spec.labels.get("session", "?"), e)
            await self.backend.pool.discard(spare)
            return
        await asyncio.to_thread(self._chown_rw_paths, kwargs["user"])
        self.container_id, self.container_name, self.from_pool = spare.id, spare.name, True
        self._exec_id, self._pidfile, reader, writer, bridge = await start_exec(
            engine, spare.id, self.spec.argv, env=self.spec.sandboxed_env(), cwd=kwargs["working_dir"],
            user=kwargs["user"], stdin=True)
        self._streams(reader, writer, bridge)
        name = kwargs.get("name")
        if name:  # the session's name, for admins reading `docker ps`; not on the critical path
            self._spawn(self._rename(engine, spare.id, name))

    async def _rename(self, engine: Engine, cid: str, name: str) -> None:
        with contextlib.suppress(Exception):
            await run_blocking(engine.api.rename, cid, name)
            self.container_name = name

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- stdio ---------------------------------------------------------------------------------
    async def _attach(self, engine: Engine) -> None:
        assert self.container_id is not None
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        cid = self.container_id
        reader, writer, bridge = await engine.hijack(
            "POST", f"/containers/{cid}/attach", params,
            sdk_fallback=lambda: engine.api.attach_socket(cid, params=params))
        self._streams(reader, writer, bridge)

    def _streams(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 bridge: Bridge | None) -> None:
        self._writer, self._bridge = writer, bridge
        self.stdin = writer
        self.stdout = BoundedReader(limit=STDIO_LINE_LIMIT)
        self._stream_done.clear()
        self._demux = asyncio.create_task(self._pump(reader), name="acp-docker-stdio")

    async def _pump(self, raw: asyncio.StreamReader) -> None:
        assert self.stdout is not None
        stdout = self.stdout
        try:
            def on_stdout(data: bytes) -> None:
                self._first_output.set()
                stdout.feed_data(data)

            await demultiplex(raw, on_stdout, self._on_stderr,
                              stdout.drained if isinstance(stdout, BoundedReader) else None)
        finally:
            if self._stderr_buf:
                self._stderr_line(self._stderr_buf)
                self._stderr_buf = b""
            stdout.feed_eof()
            self._stream_done.set()

    def _on_stderr(self, data: bytes) -> None:
        self._stderr_buf += data
        *lines, self._stderr_buf = self._stderr_buf.split(b"\n")
        for line in lines:
            self._stderr_line(line)
        if len(self._stderr_buf) > 65536:  # no newline for long: keep the tail readable
            self._stderr_line(self._stderr_buf)
            self._stderr_buf = b""

    def _stderr_line(self, line: bytes) -> None:
        text = line.decode(errors="replace").rstrip()
        self.stderr_tail.append(text)
        log.debug("agent[%s] stderr: %s", self.spec.labels.get("session", "?"), text)

    # -- state and end -------------------------------------------------------------------------
    async def _inspect_state(self) -> dict[str, Any] | None:
        """The agent's state: the container's, or (from the pool) its exec's; None: gone."""
        assert self._engine is not None and self.container_id is not None
        api = self._engine.api
        try:
            container = (await run_blocking(api.inspect_container, self.container_id))["State"]
            if self._exec_id is None or not container.get("Running"):
                return container
            info = await run_blocking(api.exec_inspect, self._exec_id)
        except Exception as e:
            if not_found(e):
                return None
            raise
        return {"Running": bool(info.get("Running")), "ExitCode": info.get("ExitCode"),
                "OOMKilled": container.get("OOMKilled")}

    def _record(self, state: dict[str, Any] | None) -> int:
        if state is None:
            self._gone = True
            self._status = -9
        else:
            self._oom = bool(state.get("OOMKilled"))
            self._status = exit_status(state.get("ExitCode"))
        return self._status

    async def poll(self) -> int | None:
        if self._status is not None or self.container_id is None:
            return self._status
        if self._demux is not None and not self._stream_done.is_set():
            return None
        try:
            state = await self._inspect_state()
        except Exception:
            return None
        if state is not None and state.get("Running"):
            return None
        return self._record(state)

    async def wait(self) -> int:
        if self.container_id is None:
            raise SandboxError("The sandbox was never started")
        if self._wait_task is None:
            self._wait_task = asyncio.ensure_future(self._wait_exit())
        return await asyncio.shield(self._wait_task)

    async def _wait_exit(self) -> int:
        if self._status is not None:
            return self._status
        if self._demux is not None:
            await self._stream_done.wait()  # the attach stream ends when the container does
        engine, cid = self._engine, self.container_id
        assert engine is not None and cid is not None
        while True:
            try:
                state = await self._inspect_state()
            except Exception:
                state = {"Running": True}  # the engine hiccups: ask again
            if state is None or not state.get("Running"):
                return self._record(state)
            if self._exec_id is not None:  # an exec ends after its stream: ask again soon
                await asyncio.sleep(0.05)
                continue
            # the stream broke while the container runs: let the engine tell us when it exits
            with contextlib.suppress(Exception):
                await run_blocking(engine.api.wait, cid, timeout=10)
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 3.0) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()  # half-close: the agent reads EOF on stdin
        if self.container_id is None or self._engine is None or self._status is not None:
            return
        engine, cid = self._engine, self.container_id
        if self._exec_id is not None and self._pidfile is not None:
            # the agent is an exec, not the container's init: TERM it, then kill the container
            user = (self.create_kwargs or {}).get("user") or ""
            await signal_exec(engine, cid, self._pidfile, user, "TERM")
            try:
                await asyncio.wait_for(self.wait(), timeout)
                return
            except (asyncio.TimeoutError, SandboxError):
                pass
        try:
            await run_blocking(engine.api.stop, cid, timeout=max(math.ceil(timeout), 0))
        except Exception as e:
            if not not_found(e):
                self.backend.log.warning("docker stop of %s failed (%s); killing it", cid[:12], explain(e))
                with contextlib.suppress(Exception):
                    await run_blocking(engine.api.kill, cid)
        with contextlib.suppress(asyncio.TimeoutError, SandboxError):
            await asyncio.wait_for(self.wait(), timeout + 5)

    async def remove(self) -> None:
        if self._demux is not None and not self._demux.done():
            self._demux.cancel()
            with contextlib.suppress(BaseException):
                await self._demux
        if self._wait_task is not None and not self._wait_task.done():
            self._wait_task.cancel()
        for task in list(self._tasks):
            task.cancel()
        if self._writer is not None:
            self._writer.close()
        if self._bridge is not None:
            self._bridge.close()
        if self.container_id is not None and self._engine is not None:
            await run_blocking(self._engine.remove_quietly, self.container_id)

    def exit_reason(self, status: int | None) -> str:
        if status is not None and self._oom:
            limit = self.spec.limits.mem_limit
            size = f"{limit / 1024**2:.0f} MiB" if limit else "unknown"
            return (f"the agent ran out of memory (limit {size}) and was killed; ask your admin for a "
                    "larger mem_limit")
        if status is not None and self._gone:
            return "the agent's container was removed from outside"
        return super().exit_reason(status)

    async def spawn_command(self, argv: Sequence[str], *, cwd: str | None,
                            env: dict[str, str] | None) -> CommandProcess:
        if self.container_id is None or self._engine is None:
            raise OSError(errno.ESRCH, "the sandbox is not running")
        merged = self.spec.sandboxed_env({**self.spec.env, **(env or {})})
        user = (self.create_kwargs or {}).get("user") or ""
        return await exec_command(self._engine, self.container_id, argv, env=merged,
                                  cwd=cwd or self.workspace_path, user=user)


def adopt_dir(spare_dir: str, session_dir: str) -> None:
    """Make the spare's directory (bind-mounted in its container) the session's one: its home,
    or its gateway socket directory.

    The mount follows the directory, not its path: the session's files are moved into the
    spare's directory, which is then renamed to the session's path (all within one parent, so
    every step is a rename). The session's old, now empty, directory is removed. A listening
    unix socket moves like any file (the server's listener holds the inode, not the path)."""
    aside = f"{session_dir}.{secrets.token_hex(4)}.old"
    os.rename(session_dir, aside)
    try:
        os.rename(spare_dir, session_dir)
    except OSError:
        os.rename(aside, session_dir)
        raise
    for name in os.listdir(aside):
        os.rename(os.path.join(aside, name), os.path.join(session_dir, name))
    os.rmdir(aside)
