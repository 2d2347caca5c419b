"""The sandbox contract every backend (docker, bubblewrap, local) implements.

A sandbox runs exactly one agent process and exposes its stdio as asyncio streams, which the
ACP SDK's ``connect_to_agent`` consumes. The lifecycle mirrors the spawners of JupyterHub
(create/start, poll, stop, remove) so that admins meet familiar names. ``ProcessSandbox`` holds
what the process-based backends share: the process group, stderr draining (the ACP SDK pipes
stderr and never reads it; a full pipe would freeze the agent), TERM-then-KILL and reaping.

What the agent sends (its environment, a terminal's argv, env and cwd) is attacker input. The
host-side process that starts a sandboxed command (a launcher such as ``bwrap``, which runs
outside every namespace with the server's rights) therefore gets a fixed environment
(``LAUNCHER_ENV``) and cwd ``/``: variables such as ``LD_PRELOAD`` or ``LD_DEBUG_OUTPUT`` only
ever reach the processes inside the sandbox (see ``HostLaunch`` and each backend's ``launch``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import signal
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from ..errors import SandboxError

log = logging.getLogger("jupyter_acp.sandbox")

#: The buffer of an agent's stdout (it pauses the pipe at twice this). Longer JSON-RPC lines are
#: put together from pieces by linefilter.py, up to ``AgentInputLimits.max_message_bytes``.
STDIO_LINE_LIMIT = 256 * 1024
#: Where an isolating sandbox mounts the agent's private home (``SandboxSpec.home``).
AGENT_HOME = "/home/agent"
#: How many of the agent's last stderr lines are kept to explain a crash.
STDERR_TAIL_LINES = 40
#: The whole environment of a host-side launcher (the cgroup-joining ``sh``, ``bwrap``): fixed,
#: never the agent's (which may name ``LD_PRELOAD``) nor the server's (which may hold secrets).
LAUNCHER_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}
#: The cwd of a host-side launcher: nothing relative is resolved against a user's directory.
LAUNCHER_CWD = "/"
#: The system part of an agent's PATH (its own bin directory is added): not the server's PATH,
#: which names the server's own tool chain (pyenv, cargo, a home directory).
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: A portable environment variable name (POSIX); anything else is refused.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def check_command(argv: Sequence[str], env: dict[str, str]) -> None:
    """Refuse (``SandboxError``) an argv or environment that cannot be passed on as inert data:
    an empty argv, a NUL byte anywhere, or a variable name that is not ``ENV_NAME``."""
    def text(value: Any) -> bool:
        if not isinstance(value, str) or "\x00" in value:
            return False
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate
            return False
        return True

    if not argv or not all(text(a) for a in argv):
        raise SandboxError("The command is empty or holds a NUL byte or invalid text")
    for name, value in env.items():
        if not isinstance(name, str) or not ENV_NAME.match(name):
            raise SandboxError("An environment variable has an invalid name")
        if not text(value):
            raise SandboxError("An environment variable's value holds a NUL byte or invalid text")


@dataclass
class ResourceLimits:
    """Limits applied to one sandbox. ``None`` (or 0) means "not limited"."""

    mem_limit: int | None = 512 * 1024**2
    """Memory in bytes (swap included where the backend can)."""
    cpu_limit: float | None = 1.0
    """CPU cores (1.5 = one and a half cores)."""
    pids_limit: int | None = 256
    """Processes and threads."""
    disk_limit: int | None = None
    """Bytes the workspace may grow by; enforced only where the backend can (see each backend)."""
    network: bool = False
    """Whether the agent may open network connections."""


@dataclass
class SandboxSpec:
    """What to run, where, and under which limits."""

    argv: list[str]
    workspace: Path
    """Host directory mounted read-write as the agent's working directory."""
    env: dict[str, str] = field(default_factory=dict)
    limits: ResourceLimits = field(default_factory=ResourceLimits)
    labels: dict[str, str] = field(default_factory=dict)
    """``user`` and ``session`` at least; used for names, cgroups and orphan clean-up."""
    ro_paths: list[str] = field(default_factory=list)
    """Extra host paths the agent needs to read (its interpreter, its package)."""
    rw_paths: list[str] = field(default_factory=list)
    """Extra host paths the agent may write besides the workspace (e.g. the gateway's socket)."""
    home: str | None = None
    """Host directory that is the agent's private, writable ``$HOME``. Isolating backends mount
    it at ``AGENT_HOME`` and set ``HOME`` to that, so the agent never sees where the server keeps
    it (often under the server account's own home); ``local`` uses it where it is."""
    gateway_dir: str | None = None
    """Host directory holding the LLM gateway's socket (also in ``rw_paths``, unless the
    backend shows it at a fixed path of its own: ``Sandbox.gateway_target``)."""

    def sandboxed_env(self, env: dict[str, str] | None = None) -> dict[str, str]:
        """``env`` (default: the spec's) as a process inside an isolating sandbox gets it: a
        ``HOME`` naming the host home becomes ``AGENT_HOME``."""
        out = dict(self.env if env is None else env)
        if self.home is not None and out.get("HOME") == self.home:
            out["HOME"] = AGENT_HOME
        return out


@dataclass
class HostLaunch:
    """How the server starts one host-side process that runs a command inside a sandbox.

    ``pass_fds`` are inherited by that process (e.g. the memfd bwrap reads its arguments from)
    and closed in the server by ``close()`` once the process has started.
    """

    argv: list[str]
    env: dict[str, str]
    cwd: str
    pass_fds: tuple[int, ...] = ()

    async def run(self, **stdio: Any) -> asyncio.subprocess.Process:
        """Start the process (its own session, so TERM/KILL reach its whole group) with the
        ``stdio`` keyword arguments of ``asyncio.create_subprocess_exec``; ``close()`` after."""
        try:
            return await asyncio.create_subprocess_exec(
                *self.argv, env=self.env, cwd=self.cwd, pass_fds=self.pass_fds,
                start_new_session=True, **stdio)
        finally:
            self.close()

    def close(self) -> None:
        for fd in self.pass_fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.pass_fds = ()


class CommandProcess(Protocol):
    """A command started inside a sandbox for ACP ``terminal/*`` (asyncio Process shape)."""

    stdout: asyncio.StreamReader | None

    @property
    def returncode(self) -> int | None: ...  # (read-only: asyncio's Process has a property)

    async def wait(self) -> int: ...

    def kill(self) -> None: ...


class SandboxBackend(Protocol):
    """What the session manager needs of a backend: the class-level half of the contract.

    Every ``Sandbox`` subclass is one (its classmethods below). A backend with admin settings of
    its own — ``DockerSandbox``, a traitlets configurable holding the engine client and the
    warm pool — is one too without being a ``Sandbox``: its ``create`` returns the per-session
    ``Sandbox``. So the admin's configuration and the per-session object stay two things."""

    @property
    def kind(self) -> str: ...

    @property
    def isolated(self) -> bool: ...

    @property
    def provides_terminals(self) -> bool: ...

    @property
    def gateway_target(self) -> str | None:
        """Where sandboxes of this backend show the gateway's socket directory (None: at its
        host path). A fixed path lets a warm-pool container, made before its session's gateway
        route, serve that session (``sandbox/docker/pool.py``)."""

    def create(self, spec: SandboxSpec, *, parent: Any = None) -> Sandbox: ...

    def available(self, *, parent: Any = None) -> tuple[bool, str]: ...

    async def on_manager_start(self, *, parent: Any = None) -> None: ...

    async def on_manager_stop(self, *, parent: Any = None) -> None: ...


class Sandbox(ABC):
    """One agent process in isolation. Subclasses set ``kind`` and implement the lifecycle."""

    kind: ClassVar[str] = "abstract"
    #: Whether this backend isolates the agent from the host at all.
    isolated: ClassVar[bool] = True
    #: Whether agent terminals (ACP ``terminal/*``) can run in it (advertised at initialize).
    provides_terminals: ClassVar[bool] = True
    #: A message transport (WebSocket) instead of stdio streams, for remote agents.
    transport: Any = None
    #: Where the sandbox shows ``spec.gateway_dir`` (None: at its host path).
    gateway_target: ClassVar[str | None] = None

    def __init__(self, spec: SandboxSpec) -> None:
        self.spec = spec
        self.stdin: asyncio.StreamWriter | None = None
        self.stdout: asyncio.StreamReader | None = None
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)

    @classmethod
    def create(cls, spec: SandboxSpec, *, parent: Any = None) -> Sandbox:
        """Build a sandbox for ``spec``. ``parent`` is the configurable owner (the session
        manager): a backend with its own admin traits (``c.DockerSandbox.*``) reads them there."""
        return cls(spec)

    @classmethod
    def available(cls, *, parent: Any = None) -> tuple[bool, str]:
        """Whether this backend can run on this host, and if not, why (shown to admins)."""
        return True, ""

    @classmethod
    async def on_manager_start(cls, *, parent: Any = None) -> None:
        """Called once when the session manager starts (e.g. remove orphans of a crashed run)."""

    @classmethod
    async def on_manager_stop(cls, *, parent: Any = None) -> None:
        """Called once after the manager stopped every session (e.g. drain a warm pool)."""

    @property
    def workspace_path(self) -> str:
        """The workspace directory as the agent sees it (its cwd and the root of fs requests)."""
        return str(self.spec.workspace)

    def limits_enforced(self) -> dict[str, bool]:
        """Which of the limits this backend really enforces; reported in session stats."""
        return {"mem_limit": False, "cpu_limit": False, "pids_limit": False, "disk_limit": False,
                "network": False}

    @abstractmethod
    async def start(self) -> None:
        """Create and start the agent; afterwards ``stdin``/``stdout`` are connected."""

    @abstractmethod
    async def poll(self) -> int | None:
        """The exit status if the agent has exited, else ``None`` (like ``Popen.poll``)."""

    @abstractmethod
    async def wait(self) -> int:
        """Wait until the agent exits; return its exit status."""

    @abstractmethod
    async def stop(self, timeout: float = 3.0) -> None:
        """Stop the agent: polite signal, then kill after ``timeout`` seconds. Idempotent."""

    async def remove(self) -> None:
        """Release what the sandbox holds (container, cgroups). The workspace is kept."""

    def exit_reason(self, status: int | None) -> str:
        """Explain an exit in words: OOM kill, signal, exit code, with the stderr tail."""
        if status is None:
            return "the agent is still running"
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            why = f"the agent was killed by {name}"
        else:
            why = f"the agent exited with status {status}"
        tail = "\n".join(list(self.stderr_tail)[-5:])
        return f"{why}; last output: {tail}" if tail else why

    @abstractmethod
    async def spawn_command(
        self, argv: Sequence[str], *, cwd: str | None, env: dict[str, str] | None
    ) -> CommandProcess:
        """Run a command inside the sandbox (for ACP terminals), stdout and stderr merged.

        ``env`` is added to the spec's environment *inside* the sandbox only; ``cwd`` is a path
        as the sandbox sees it (``terminals.py`` checks both before they get here). Raises
        ``OSError`` or ``SandboxError`` when the command cannot be started."""


async def _drain(stream: asyncio.StreamReader) -> None:
    """Read and drop ``stream`` to its end."""
    while await stream.read(65536):
        pass


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the process group led by ``pid``; a vanished group is fine."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


class ProcessSandbox(Sandbox):
    """A sandbox whose agent is a child process of the server (local, bubblewrap).

    The child leads a new session (so TERM/KILL reach every process it starts), its stderr is
    read line by line into the server log and ``stderr_tail``, and it is always reaped.
    """

    def __init__(self, spec: SandboxSpec) -> None:
        super().__init__(spec)
        self.process: asyncio.subprocess.Process | None = None
        self._stderr_task: asyncio.Task[None] | None = None

    @abstractmethod
    def launch(self, argv: Sequence[str], *, cwd: str, env: dict[str, str]) -> HostLaunch:
        """How to start ``argv`` inside this sandbox with exactly ``env`` (the sandboxed
        process's whole environment) in ``cwd`` (as the sandbox sees it). Raises
        ``SandboxError`` for values that cannot be passed on (see ``check_command``)."""

    async def prepare(self) -> None:
        """Set up what must exist before the process starts (cgroups, directories)."""

    async def start(self) -> None:
        await self.prepare()
        try:
            launch = self.launch(self.spec.argv, cwd=self.workspace_path, env=self.spec.env)
        except BaseException:
            await self.remove()
            raise
        try:
            self.process = await launch.run(stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                                            stderr=asyncio.subprocess.PIPE, limit=STDIO_LINE_LIMIT)
        except OSError as e:
            await self.remove()
            raise SandboxError(f"Could not start the agent {launch.argv[0]!r}: {e.strerror or e}") from e
        self.stdin, self.stdout = self.process.stdin, self.process.stdout
        self._stderr_task = asyncio.create_task(self._drain_stderr(), name="acp-sandbox-stderr")

    async def _drain_stderr(self) -> None:
        assert self.process is not None and self.process.stderr is not None
        label = self.spec.labels.get("session", "?")
        stream = self.process.stderr
        while True:
            try:
                line = await stream.readline()
            except ValueError:  # a line longer than the limit: drop what is buffered
                await stream.read(STDIO_LINE_LIMIT)
                continue
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.stderr_tail.append(text)
            log.debug("agent[%s] stderr: %s", label, text)

    async def poll(self) -> int | None:
        return None if self.process is None else self.process.returncode

    async def wait(self) -> int:
        if self.process is None:
            raise SandboxError("The sandbox was never started")
        status = await self.process.wait()
        if self._stderr_task is not None:
            # let the last stderr lines (often the reason of a crash) reach the tail
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(self._stderr_task), 1.0)
        return status

    async def stop(self, timeout: float = 3.0) -> None:
        proc = self.process
        if proc is None:
            return
        if proc.returncode is None:
            if proc.stdin is not None and not proc.stdin.is_closing():
                proc.stdin.close()
            signal_group(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                signal_group(proc.pid, signal.SIGKILL)
                await proc.wait()
        # the leader is gone; make sure nothing it left in its group survives
        signal_group(proc.pid, signal.SIGKILL)
        # read what is left of its stdout to the end: a reader paused by backpressure
        # (linefilter) would otherwise never see EOF, and its pipe would stay open
        if proc.stdout is not None:
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError, ValueError, RuntimeError):
                await asyncio.wait_for(_drain(proc.stdout), 1.0)
        if self._stderr_task is not None:
            self._stderr_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._stderr_task

    async def spawn_command(
        self, argv: Sequence[str], *, cwd: str | None, env: dict[str, str] | None
    ) -> CommandProcess:
        merged = {**self.spec.env, **(env or {})}
        launch = self.launch(argv, cwd=cwd or self.workspace_path, env=merged)
        return await launch.run(stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                                stderr=asyncio.subprocess.STDOUT)
