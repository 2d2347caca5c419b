"""The Docker sandbox: one container per agent session (the design's primary backend).

Every container runs exactly one agent with the limits of its session: no network (``none``)
unless allowed, memory without swap, a CPU quota, a pids limit, a read-only root with a small
``/tmp`` tmpfs, every capability dropped, ``no-new-privileges``, an init process (so signals
reach the agent and zombies are reaped), a non-root user, and only the user's workspace mounted
read-write (at ``/workspace``, its working directory) besides the session's private home.

Configuration is ``c.DockerSandbox.*`` in the Jupyter server config (``image``, ``host_mounts``,
``user``, ``warm_pool_size``, ...); the limits themselves come from the session manager
(``c.UserSessionManager.mem_limit`` and friends). ``build_create_kwargs`` turns a
``SandboxSpec`` plus these settings into the docker SDK's ``containers.create`` arguments: it is a
pure function, unit-tested without an engine, like kubespawner's ``objects.py``.

Stdio: the container is created with ``stdin_open=True, tty=False`` and attached (stdin, stdout,
stderr, stream) **before** it starts, so no byte is lost. The attach is an HTTP connection
upgraded to a raw stream, opened directly with asyncio on the engine's socket (unix or plain
tcp), so the agent's stdin is a real ``asyncio.StreamWriter`` (which ``acp.connect_to_agent``
requires) and half-closing it sends EOF. Output arrives multiplexed in frames with an 8-byte
header (stream 1 = stdout, 2 = stderr); stdout feeds ``self.stdout`` (an ``asyncio.StreamReader``)
and stderr lines go to ``stderr_tail`` and the debug log. For other transports (TLS, ssh, npipe)
the SDK's attach socket is bridged to asyncio through a socket pair and two threads.

Every blocking docker SDK call runs in a thread pool, never on the event loop.

Containers carry the labels ``jupyter-acp.user``, ``jupyter-acp.session``,
``jupyter-acp.server`` (a stable id of this Jupyter server: host, uid and root directory) and
``jupyter-acp.run`` (this run of it). When the session manager starts, containers of the same
server but an earlier run are orphans of a crash and are removed; containers of *other* servers
sharing the engine are left alone. When it stops, every container of this run is removed.

Disk: ``storage_opt size`` only caps a container's own writable layer and only on some storage
drivers (overlay2 on xfs with pquota, btrfs, zfs); the root here is read-only and what an agent
writes lands in the bind-mounted workspace, which no container option can cap. ``disk_limit`` is
therefore reported as not enforced and logged as such; cap it with a size-limited workspace
file system (a quota, or a loop-mounted volume per user).

Paths in bind mounts are paths on the engine's host: the engine must run on the server's host
(or see the same file systems).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import logging
import math
import os
import re
import secrets
import socket
import threading
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar
from urllib.parse import urlencode, urlparse

from traitlets import Bool, Dict, Float, Integer, List, MetaHasTraits, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from ..errors import SandboxError
from .base import AGENT_HOME, STDIO_LINE_LIMIT, CommandProcess, Sandbox, SandboxSpec, check_command

if TYPE_CHECKING:
    from ..linefilter import ReaduntilSeparator

log = logging.getLogger("jupyter_acp.sandbox")

DEFAULT_IMAGE = "jupyter-acp-sandbox:test"
LABEL_PREFIX = "jupyter-acp."
LABEL_USER = "jupyter-acp.user"
LABEL_SESSION = "jupyter-acp.session"
LABEL_SERVER = "jupyter-acp.server"
LABEL_RUN = "jupyter-acp.run"
LABEL_POOL = "jupyter-acp.pool"
#: The ``jupyter-acp.session`` label of a warm-pool spare until a session takes it.
WARM_SESSION = "warm-pool"
#: /etc entries programs need (users, name service config, TLS roots, time zone, linker cache).
#: The rest of the host's /etc (shadow, ssh keys, the server's own config) stays out of sight.
#: hosts, hostname and resolv.conf are the container's own (Docker writes them).
ETC_ENTRIES = ("passwd", "group", "nsswitch.conf", "localtime", "timezone", "ld.so.cache", "ld.so.conf",
               "ld.so.conf.d", "ssl", "ca-certificates", "ca-certificates.conf", "alternatives",
               "mime.types", "os-release", "debian_version", "gai.conf", "host.conf", "protocols",
               "services")
_FRAME_HEADER = 8
_SIZE_RE = re.compile(r"^\d+[kKmMgG]?$")


# -- the pure part ------------------------------------------------------------------------------
@dataclass(frozen=True)
class DockerSettings:
    """The admin's ``c.DockerSandbox.*`` settings that shape a container (see the traits)."""

    image: str = DEFAULT_IMAGE
    workspace_mount_path: str = "/workspace"
    host_mounts: tuple[str, ...] = ("/usr", "/etc")
    host_etc_entries: tuple[str, ...] = ETC_ENTRIES
    read_only: bool = True
    tmpfs_size: str = "64m"
    user: str = "1000:1000"
    network_name: str = "bridge"
    log_driver: str = "none"
    storage_opt_supported: bool = False
    extra_create_kwargs: Mapping[str, Any] = field(default_factory=dict)


def container_labels(spec: SandboxSpec, *, server_id: str, run_id: str,
                     session: str | None = None) -> dict[str, str]:
    """``jupyter-acp.*`` labels: the spec's labels (user, session, agent) plus server and run."""
    labels = {f"{LABEL_PREFIX}{k}": str(v) for k, v in spec.labels.items()}
    labels.setdefault(LABEL_USER, "")
    labels[LABEL_SESSION] = session if session is not None else str(spec.labels.get("session", ""))
    labels[LABEL_SERVER] = server_id
    labels[LABEL_RUN] = run_id
    return labels


def container_name(prefix: str, spec: SandboxSpec) -> str:
    """``jupyter-acp-<user>-<session>-<random>``, restricted to what Docker accepts."""
    user = re.sub(r"[^a-zA-Z0-9_.-]", "_", str(spec.labels.get("user", "")))[:32]
    session = re.sub(r"[^a-zA-Z0-9_.-]", "_", str(spec.labels.get("session", "")))[:12]
    parts = [p for p in (user, session) if p] + [secrets.token_hex(3)]
    name = prefix + "-".join(parts)
    return name if re.match(r"^[a-zA-Z0-9]", name) else f"x{name}"


def _covered(path: str, by: Sequence[str]) -> bool:
    return any(path == b or path.startswith(b.rstrip("/") + "/") for b in by)


def build_create_kwargs(spec: SandboxSpec, settings: DockerSettings, *, name: str, labels: dict[str, str],
                        exists: Callable[[str], bool] = os.path.lexists) -> dict[str, Any]:
    """The keyword arguments of ``docker.from_env().containers.create`` for ``spec``.

    Pure apart from ``exists`` (which host paths can be mounted; injectable for tests). Mount
    sources are host paths; each read-only host path is mounted at the same path inside, so an
    interpreter and its packages keep working; ``/etc`` is reduced to ``host_etc_entries``.
    """
    limits = spec.limits
    mounts: list[dict[str, Any]] = []
    targets: set[str] = set()

    def bind(source: str, target: str, *, read_only: bool) -> None:
        if target in targets:
            return
        targets.add(target)
        mounts.append({"Type": "bind", "Source": source, "Target": target, "ReadOnly": read_only})

    ro_roots: list[str] = []
    for path in settings.host_mounts:
        path = os.path.normpath(path)
        if path == "/etc" and settings.host_etc_entries:
            for entry in settings.host_etc_entries:
                if exists(f"/etc/{entry}"):
                    bind(f"/etc/{entry}", f"/etc/{entry}", read_only=True)
            continue
        if exists(path):
            bind(path, path, read_only=True)
            ro_roots.append(path)
    workspace_target = settings.workspace_mount_path
    # writable first, so that a read-only path equal to one of them does not shadow it
    bind(str(spec.workspace), workspace_target, read_only=False)
    for path in spec.rw_paths:
        path = os.path.normpath(path)
        if exists(path):
            bind(path, path, read_only=False)
    if spec.home is not None:
        bind(spec.home, AGENT_HOME, read_only=False)
    for path in spec.ro_paths:
        path = os.path.normpath(path)
        if _covered(path, ro_roots) or not exists(path):
            continue  # already visible read-only (e.g. inside /usr), or nothing to mount
        bind(path, path, read_only=True)
        ro_roots.append(path)

    kwargs: dict[str, Any] = {
        "image": settings.image,
        "command": list(spec.argv),
        "name": name,
        "labels": dict(labels),
        "environment": spec.sandboxed_env(),
        "working_dir": workspace_target,
        "user": settings.user,
        "stdin_open": True,
        "tty": False,
        "detach": False,  # AttachStdin/Stdout/Stderr and StdinOnce: EOF on stdin reaches the agent
        "network_mode": settings.network_name if limits.network else "none",
        "read_only": settings.read_only,
        "mounts": mounts,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": True,
        "log_config": {"type": settings.log_driver, "config": {}},
        "use_config_proxy": False,
    }
    if settings.tmpfs_size and settings.tmpfs_size != "0":
        kwargs["tmpfs"] = {"/tmp": f"rw,nosuid,nodev,exec,mode=1777,size={settings.tmpfs_size}"}
    if limits.mem_limit:
        kwargs["mem_limit"] = int(limits.mem_limit)
        kwargs["memswap_limit"] = int(limits.mem_limit)  # the same: no swap on top
    if limits.cpu_limit:
        kwargs["nano_cpus"] = int(limits.cpu_limit * 1e9)
    if limits.pids_limit:
        kwargs["pids_limit"] = int(limits.pids_limit)
    if limits.disk_limit and settings.storage_opt_supported and not settings.read_only:
        kwargs["storage_opt"] = {"size": str(int(limits.disk_limit))}
    for key, value in settings.extra_create_kwargs.items():
        kwargs[key] = value
    return kwargs


def pool_key(kwargs: Mapping[str, Any]) -> str:
    """What a warm-pool spare must share with a session to serve it: everything but the name
    and the session label (a digest: the arguments hold credentials)."""
    rest = {k: v for k, v in kwargs.items() if k != "name"}
    rest["labels"] = {k: v for k, v in kwargs.get("labels", {}).items()
                      if k not in (LABEL_SESSION, LABEL_POOL)}
    blob = json.dumps(rest, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def resolve_user(setting: str, workspace: Path) -> str:
    """``setting`` if given; else the owner of the workspace when not root; else ``1000:1000``."""
    if setting:
        return setting
    try:
        st = workspace.stat()
    except OSError:
        return "1000:1000"
    return f"{st.st_uid}:{st.st_gid}" if st.st_uid != 0 else "1000:1000"


def exit_status(code: int | None) -> int:
    """A container's exit code as a ``Popen`` status: 128+N (an init reporting signal N) → -N."""
    if code is None:
        return -9
    if 128 < code <= 128 + 64:
        return -(code - 128)
    return code


async def demultiplex(raw: asyncio.StreamReader, on_stdout: Callable[[bytes], None],
                      on_stderr: Callable[[bytes], None],
                      backpressure: Callable[[], Awaitable[None]] | None = None) -> None:
    """Split Docker's multiplexed stream (8-byte header: stream, 0, 0, 0, size big-endian).

    ``backpressure`` is awaited before each frame: while it waits, ``raw`` is not read, its
    buffer fills, its transport pauses, and the agent's writes to stdout block in the container.
    """
    while True:
        if backpressure is not None:
            await backpressure()
        try:
            header = await raw.readexactly(_FRAME_HEADER)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        size = int.from_bytes(header[4:8], "big")
        try:
            payload = await raw.readexactly(size) if size else b""
        except (asyncio.IncompleteReadError, ConnectionError) as e:
            partial = getattr(e, "partial", b"")
            if partial:
                (on_stderr if header[0] == 2 else on_stdout)(partial)
            return
        (on_stderr if header[0] == 2 else on_stdout)(payload)


class BoundedReader(asyncio.StreamReader):
    """The agent's stdout, fed from the attach stream: ``drained()`` waits while more than
    ``limit`` bytes are unread, so the agent is read at the server's pace (see linefilter) and a
    flood waits in the container's pipe, not in the server. (``_buffer`` is asyncio's own.)"""

    _buffer: bytearray  # (set by StreamReader.__init__; private, so typeshed does not declare it)

    def __init__(self, limit: int) -> None:
        super().__init__(limit=limit)
        self._max = limit
        self._room = asyncio.Event()

    async def drained(self) -> None:
        while len(self._buffer) > self._max and not self.at_eof():
            self._room.clear()
            await self._room.wait()

    def _took(self) -> None:
        if len(self._buffer) <= self._max:
            self._room.set()

    async def readuntil(self, separator: ReaduntilSeparator = b"\n") -> bytes:
        try:
            return await super().readuntil(separator)
        finally:
            self._took()

    async def readexactly(self, n: int) -> bytes:
        try:
            return await super().readexactly(n)
        finally:
            self._took()

    async def read(self, n: int = -1) -> bytes:
        try:
            return await super().read(n)
        finally:
            self._took()

    def feed_eof(self) -> None:
        super().feed_eof()
        self._room.set()


# -- talking to the engine ------------------------------------------------------------------------
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


async def _run(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking docker SDK call in the sandbox thread pool."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="jupyter-acp-docker")
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))


class EngineError(SandboxError):
    """The engine refused a request (``status`` is the HTTP status of its answer)."""

    def __init__(self, message: str, *, http_status: int = 500) -> None:
        super().__init__(message)
        self.http_status = http_status


def _not_found(e: BaseException) -> bool:
    return getattr(e, "http_status", None) == 404 or type(e).__name__ == "NotFound" or (
        getattr(getattr(e, "response", None), "status_code", None) == 404)


def _conflict(e: BaseException) -> bool:
    return getattr(getattr(e, "response", None), "status_code", None) == 409


class _Bridge:
    """Joins a blocking socket-like object (TLS, ssh, npipe) to asyncio via a socket pair."""

    def __init__(self, hijacked: Any) -> None:
        self.hijacked = hijacked  # keeps the SDK's response (and so the connection) alive
        self.sock = getattr(hijacked, "_sock", hijacked)
        self.inner, self.outer = socket.socketpair()
        threading.Thread(target=self._up, daemon=True, name="jupyter-acp-docker-up").start()
        threading.Thread(target=self._down, daemon=True, name="jupyter-acp-docker-down").start()

    def _recv(self) -> bytes:
        if hasattr(self.sock, "recv"):
            return self.sock.recv(65536)
        return self.sock.read(65536) or b""

    def _up(self) -> None:  # engine → asyncio
        try:
            while data := self._recv():
                self.inner.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_WR)

    def _down(self) -> None:  # asyncio → engine
        try:
            while data := self.inner.recv(65536):
                if hasattr(self.sock, "sendall"):
                    self.sock.sendall(data)
                else:
                    self.sock.write(data)
            with contextlib.suppress(OSError, AttributeError):
                self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for s in (self.inner, self.sock, self.hijacked):
            with contextlib.suppress(Exception):
                s.close()


class _Engine:
    """One docker SDK client plus what we learnt about the engine (shared by a manager's sandboxes)."""

    def __init__(self, docker_host: str, api_timeout: float) -> None:
        import docker  # the optional dependency: pip install 'jupyter-acp[docker]'

        self.docker = docker
        env = docker.utils.kwargs_from_env()
        if docker_host:
            env["base_url"] = docker_host
        self.base_url = env.get("base_url") or "unix:///var/run/docker.sock"
        self.tls = bool(env.get("tls"))
        self.api_timeout = api_timeout
        parsed = urlparse(self.base_url)
        if parsed.scheme in ("unix", "http+unix"):
            # fail fast and cleanly (the SDK leaks its socket when the first connect fails)
            with socket.socket(socket.AF_UNIX) as probe:
                probe.settimeout(min(api_timeout, 5))
                probe.connect(parsed.path)
        self.client = docker.DockerClient(version="auto", timeout=int(max(api_timeout, 1)), **env)
        self.api = self.client.api
        self.version = self.api._version
        self.info: dict[str, Any] = self.api.info()
        #: Where we open hijacked (attach / exec) connections ourselves; None: through the SDK.
        self.endpoint: tuple[str, Any] | None = None
        if parsed.scheme in ("unix", "http+unix") and not self.tls:
            self.endpoint = ("unix", parsed.path)
        elif parsed.scheme in ("tcp", "http") and not self.tls and parsed.hostname:
            self.endpoint = ("tcp", (parsed.hostname, parsed.port or 2375))
        self.local = parsed.scheme in ("unix", "http+unix")

    @property
    def storage_opt_supported(self) -> bool:
        driver = self.info.get("Driver", "")
        status = dict(self.info.get("DriverStatus") or [])
        if driver == "overlay2":
            return status.get("Backing Filesystem", "") == "xfs"
        return driver in ("btrfs", "zfs", "devicemapper", "windowsfilter")

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    async def hijack(self, method: str, path: str, params: dict[str, Any] | None = None,
                     body: dict[str, Any] | None = None,
                     sdk_fallback: Callable[[], Any] | None = None
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, _Bridge | None]:
        """An HTTP request upgraded to a raw stream (attach, exec start) as asyncio streams."""
        if self.endpoint is None:
            if sdk_fallback is None:
                raise SandboxError(f"Cannot stream from the engine at {self.base_url}")
            bridge = _Bridge(await _run(sdk_fallback))
            reader, writer = await asyncio.open_connection(sock=bridge.outer, limit=2**20)
            return reader, writer, bridge
        kind, address = self.endpoint
        if kind == "unix":
            reader, writer = await asyncio.open_unix_connection(address, limit=2**20)
        else:
            reader, writer = await asyncio.open_connection(*address, limit=2**20)
        data = json.dumps(body).encode() if body is not None else b""
        query = f"?{urlencode(params)}" if params else ""
        head = [f"{method} /v{self.version}{path}{query} HTTP/1.1", "Host: docker",
                "Connection: Upgrade", "Upgrade: tcp", f"Content-Length: {len(data)}"]
        if body is not None:
            head.append("Content-Type: application/json")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + data)
        try:
            raw_head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.api_timeout)
            status_line = raw_head.split(b"\r\n", 1)[0].decode(errors="replace")
            status = int(status_line.split()[1])
            if status not in (101, 200):
                length = re.search(rb"(?i)content-length:\s*(\d+)", raw_head)
                text = await asyncio.wait_for(reader.read(int(length.group(1)) if length else 4096), 2)
                try:
                    message = json.loads(text).get("message", text.decode(errors="replace"))
                except ValueError:
                    message = text.decode(errors="replace")
                raise EngineError(f"{message} (HTTP {status})", http_status=status)
        except BaseException:
            writer.close()
            raise
        return reader, writer, None


@dataclass
class _Spare:
    id: str
    name: str
    created: float


class _Backend:
    """State shared by the docker sandboxes of one session manager: engine, run id, warm pool."""

    def __init__(self, settings: DockerSandbox) -> None:
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:16]
        self.engine: _Engine | None = None
        self.checked: tuple[float, bool, str] | None = None
        self.pool: dict[str, list[_Spare]] = {}
        self.filling: dict[str, int] = {}
        self.expiry: dict[str, asyncio.TimerHandle] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.fill_tasks: set[asyncio.Task[Any]] = set()

    def get_engine(self) -> _Engine:
        if self.engine is None:
            self.engine = _Engine(self.settings.docker_host, self.settings.api_timeout)
        return self.engine

    async def engine_async(self) -> _Engine:
        if self.engine is None:
            try:
                await _run(self.get_engine)
            except ImportError as e:
                raise SandboxError("The docker Python package is missing: pip install 'jupyter-acp[docker]'"
                                   ) from e
            except Exception as e:
                where = self.settings.docker_host or "the default socket"
                raise SandboxError(f"No Docker engine answers at {where}: {e}") from e
        assert self.engine is not None
        return self.engine

    def spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # -- warm pool -----------------------------------------------------------------------------
    def take(self, key: str) -> _Spare | None:
        spares = self.pool.get(key)
        return spares.pop(0) if spares else None

    def replenish(self, key: str, kwargs: dict[str, Any]) -> None:
        """Keep ``warm_pool_size`` spares of this configuration (in the background)."""
        size = self.settings.warm_pool_size
        missing = size - len(self.pool.get(key, [])) - self.filling.get(key, 0)
        for _ in range(max(missing, 0)):
            self.filling[key] = self.filling.get(key, 0) + 1
            task = self.spawn(self._make_spare(key, kwargs))
            self.fill_tasks.add(task)
            task.add_done_callback(self.fill_tasks.discard)
        ttl = self.settings.warm_pool_idle_timeout
        if ttl > 0:
            if key in self.expiry:
                self.expiry[key].cancel()
            self.expiry[key] = asyncio.get_running_loop().call_later(
                ttl, lambda: self.spawn(self.drain(key)))

    async def _make_spare(self, key: str, kwargs: dict[str, Any]) -> None:
        spare_kwargs = dict(kwargs)
        spare_kwargs["name"] = f"{self.settings.name_prefix}warm-{secrets.token_hex(4)}"
        spare_kwargs["labels"] = {**kwargs["labels"], LABEL_SESSION: WARM_SESSION, LABEL_POOL: key}
        try:
            engine = await self.engine_async()
            cid = await _run(_create, engine, spare_kwargs)
            try:
                await _run(engine.api.start, cid)
            except Exception:
                await _run(_remove_quietly, engine, cid)
                raise
            self.pool.setdefault(key, []).append(_Spare(cid, spare_kwargs["name"], time.time()))
        except Exception as e:
            self.settings.log.warning("Could not pre-start a warm-pool container: %s", e)
        finally:
            self.filling[key] = max(self.filling.get(key, 1) - 1, 0)

    async def drain(self, key: str | None = None) -> None:
        """Remove the spares of one configuration (or all)."""
        keys = [key] if key is not None else list(self.pool)
        spares = [s for k in keys for s in self.pool.pop(k, [])]
        for k in keys:
            handle = self.expiry.pop(k, None)
            if handle is not None:
                handle.cancel()
        if spares and self.engine is not None:
            await asyncio.gather(*(_run(_remove_quietly, self.engine, s.id) for s in spares))

    async def close(self) -> None:
        for handle in self.expiry.values():
            handle.cancel()
        self.expiry.clear()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        self.pool.clear()


def _create(engine: _Engine, kwargs: dict[str, Any]) -> str:
    """``containers.create`` without its extra inspect round trip; returns the id."""
    kwargs = dict(kwargs)
    try:
        from docker.models.containers import _create_container_args
    except ImportError:  # a docker SDK without the helper: the public (slower) way
        image = kwargs.pop("image")
        return engine.client.containers.create(image, **kwargs).id
    kwargs["version"] = engine.version
    return engine.api.create_container(**_create_container_args(kwargs))["Id"]


def _remove_quietly(engine: _Engine, cid: str) -> None:
    try:
        engine.api.remove_container(cid, force=True)
    except Exception as e:
        if not (_not_found(e) or _conflict(e)):  # gone already, or its removal is under way
            log.warning("Could not remove container %s: %s", cid[:12], e)


_backends: weakref.WeakKeyDictionary[Any, _Backend] = weakref.WeakKeyDictionary()
_default_backend: dict[str, _Backend] = {}


class _ConfigurableSandboxMeta(MetaHasTraits, abc.ABCMeta):
    """Lets ``DockerSandbox`` be both a ``Sandbox`` (an ABC) and a traitlets ``Configurable``."""


class DockerSandbox(Sandbox, LoggingConfigurable, metaclass=_ConfigurableSandboxMeta):
    """An agent in its own Docker container (admin settings: ``c.DockerSandbox.*``).

    Warm pool (``warm_pool_size``): Docker cannot change a container's mounts, environment or
    labels after it is created, and those hold the user's workspace, the session's home and the
    agent's credentials. A spare container can therefore only serve a session whose container
    arguments are identical except for the name and the session label. So the pool keeps, for each
    configuration that was used (or announced with ``prewarm``), up to ``warm_pool_size``
    containers already *started*, their agent waiting on stdin (ACP agents say nothing before
    ``initialize``, so attaching late loses nothing). A session with that configuration attaches
    to a spare instead of creating and starting a container, and a new spare is started in the
    background; spares unused for ``warm_pool_idle_timeout`` seconds are removed. This serves a
    restart of a session (same spec), and new sessions whenever the manager gives a user's
    sessions the same home and environment; it cannot serve a configuration never seen before.
    """

    kind: ClassVar[str] = "docker"
    isolated: ClassVar[bool] = True

    image = Unicode(
        DEFAULT_IMAGE,
        help="""The image agent containers run. It is never pulled: build it locally
        (``scripts/sandbox-image`` for the tiny test image, ``jupyter_acp/sandbox/Dockerfile``
        for a real deployment).""",
    ).tag(config=True)

    docker_host = Unicode(
        help="""The engine's address (``unix:///run/docker.sock``, ``tcp://host:2375``). Default:
        ``DOCKER_HOST`` from the environment, else the engine's default socket. Mount paths are
        paths on the engine's host, so the engine must run on the server's host.""",
    ).tag(config=True)

    @default("docker_host")
    def _default_docker_host(self) -> str:
        return os.environ.get("DOCKER_HOST", "")

    host_mounts = List(
        Unicode(),
        ["/usr", "/etc"],
        help="""Host paths bind-mounted read-only at the same path in every container: the
        tiny image (``scripts/sandbox-image``) holds no programs and runs everything from the
        host's ``/usr``. ``/etc`` is reduced to ``host_etc_entries``. Set ``[]`` for a
        self-contained image such as the one built from the shipped Dockerfile. An agent's own
        read-only paths (its interpreter and packages) are added to these.""",
    ).tag(config=True)

    host_etc_entries = List(
        Unicode(),
        list(ETC_ENTRIES),
        help="""When ``/etc`` is in ``host_mounts``, only these entries of the host's /etc are
        mounted (users, name service, TLS roots, time zone, linker cache), so that the agent
        does not read the server's configuration. Empty: the whole /etc.""",
    ).tag(config=True)

    read_only = Bool(
        True,
        help="""Make the container's root file system read-only. The agent can then write only
        its workspace, its session home and ``/tmp`` (a tmpfs of ``tmpfs_size``).""",
    ).tag(config=True)

    tmpfs_size = Unicode(
        "64m",
        help="""Size of the tmpfs mounted at ``/tmp`` (bytes, or with k/m/g), counted against the
        memory limit. ``0`` or empty: no tmpfs (``/tmp`` is then read-only with ``read_only``).""",
    ).tag(config=True)

    @validate("tmpfs_size")
    def _valid_size(self, proposal: Any) -> str:
        value = str(proposal["value"]).strip()
        if value and not _SIZE_RE.match(value):
            raise TraitError(f"tmpfs_size {value!r} is not a size such as 64m")
        return value

    user = Unicode(
        "",
        help="""``uid:gid`` the agent runs as. Empty: the owner of the session's workspace when
        that is not root, else ``1000:1000``. Running as root (0) is refused.""",
    ).tag(config=True)

    workspace_mount_path = Unicode(
        "/workspace",
        help="Where the workspace is mounted in the container (the agent's working directory).",
    ).tag(config=True)

    warm_pool_size = Integer(
        0,
        help="""How many started spare containers to keep for each container configuration
        in use (see the class documentation for what a spare can serve). 0: no pool.""",
    ).tag(config=True)

    warm_pool_idle_timeout = Float(
        600.0,
        help="Seconds an unused warm-pool configuration keeps its spares. 0: until the server stops.",
    ).tag(config=True)

    name_prefix = Unicode("jupyter-acp-", help="Prefix of container names.").tag(config=True)

    network_name = Unicode(
        "bridge",
        help="""The Docker network of containers whose limits allow network access
        (``c.UserSessionManager.network = True``). Otherwise containers have network ``none``.""",
    ).tag(config=True)

    log_driver = Unicode(
        "none",
        help="""Docker log driver of agent containers. ``none`` by default: stdout carries the
        whole ACP conversation (file contents, prompts), which must not pile up on the engine's
        disk; stderr reaches the server log through the attach stream anyway.""",
    ).tag(config=True)

    chown_rw_paths = Bool(
        True,
        help="""When the server runs as root and the engine is local, give the session's
        private writable paths (its home) to the container user, so the agent can write its
        settings there. The workspace itself is never chowned.""",
    ).tag(config=True)

    extra_create_kwargs = Dict(
        help="""Extra keyword arguments of the docker SDK's ``containers.create``, applied last
        (e.g. ``{"runtime": "runsc"}`` for gVisor, ``{"cpuset_cpus": "0-3"}``).""",
    ).tag(config=True)

    server_id = Unicode(
        help="""Identifies this Jupyter server's containers across its restarts (label
        ``jupyter-acp.server``): containers with this id from an earlier run are removed as
        orphans when the server starts. Default: a digest of host name, uid and root dir.""",
    ).tag(config=True)

    @default("server_id")
    def _default_server_id(self) -> str:
        root = getattr(self.parent, "root_dir", None) or os.getcwd()
        blob = f"{socket.gethostname()}:{os.getuid()}:{os.path.abspath(root)}"
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    api_timeout = Float(30.0, help="Seconds one call to the Docker engine may take.").tag(config=True)

    availability_ttl = Float(
        10.0, help="Seconds the answer of ``available()`` (engine up, image present) is cached."
    ).tag(config=True)

    def __init__(self, spec: SandboxSpec | None = None, **kwargs: Any) -> None:
        LoggingConfigurable.__init__(self, **kwargs)
        Sandbox.__init__(self, spec)  # type: ignore[arg-type]
        self.container_id: str | None = None
        self.container_name: str | None = None
        self.from_pool = False
        self.create_kwargs: dict[str, Any] | None = None
        self._backend: _Backend | None = None
        self._engine: _Engine | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._bridge: _Bridge | None = None
        self._demux: asyncio.Task[None] | None = None
        self._stream_done = asyncio.Event()
        self._wait_task: asyncio.Future[int] | None = None
        self._status: int | None = None
        self._oom = False
        self._gone = False
        self._stderr_buf = b""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._enforced: dict[str, bool] = {}

    # -- backend-wide (class) operations ------------------------------------------------------
    @classmethod
    def _backend_for(cls, parent: Any) -> _Backend:
        if parent is None:
            if "" not in _default_backend:
                _default_backend[""] = _Backend(cls(None))
            return _default_backend[""]
        backend = _backends.get(parent)
        if backend is None:
            backend = _backends[parent] = _Backend(cls(None, parent=parent))
        return backend

    @classmethod
    def create(cls, spec: SandboxSpec, *, parent: Any = None) -> DockerSandbox:
        sandbox = cls(spec, parent=parent)
        sandbox._backend = cls._backend_for(parent)
        return sandbox

    @classmethod
    def available(cls, *, parent: Any = None) -> tuple[bool, str]:
        backend = cls._backend_for(parent)
        now = time.monotonic()
        if backend.checked is not None and now - backend.checked[0] < backend.settings.availability_ttl:
            return backend.checked[1], backend.checked[2]
        ok, why = cls._check(backend)
        backend.checked = (now, ok, why)
        return ok, why

    @classmethod
    def _check(cls, backend: _Backend) -> tuple[bool, str]:
        settings = backend.settings
        where = settings.docker_host or "the default socket"
        try:
            engine = backend.get_engine()
        except ImportError:
            return False, "the docker Python package is not installed (pip install 'jupyter-acp[docker]')"
        except Exception as e:
            return False, f"no Docker engine answers at {where} ({type(e).__name__}: {e})"
        try:
            engine.api.ping()
            engine.api.inspect_image(settings.image)
        except Exception as e:
            if _not_found(e):
                return False, (f"the image {settings.image} is not in the engine at {where}; build it "
                               "with scripts/sandbox-image (tests) or jupyter_acp/sandbox/Dockerfile")
            backend.engine = None
            engine.close()
            return False, f"the Docker engine at {where} does not answer ({type(e).__name__}: {e})"
        return True, ""

    @classmethod
    async def on_manager_start(cls, *, parent: Any = None) -> None:
        """Remove orphans: containers of this server (same ``server_id``) from an earlier run."""
        backend = cls._backend_for(parent)
        settings = backend.settings
        try:
            engine = await backend.engine_async()
            found = await _run(engine.api.containers, all=True,
                               filters={"label": [f"{LABEL_SERVER}={settings.server_id}"]})
        except Exception as e:
            settings.log.warning("Could not look for orphaned agent containers: %s", e)
            return
        orphans = [c for c in found if (c.get("Labels") or {}).get(LABEL_RUN) != backend.run_id]
        if orphans:
            settings.log.info("Removing %d agent container(s) left by an earlier run of this server",
                              len(orphans))
            await asyncio.gather(*(_run(_remove_quietly, engine, c["Id"]) for c in orphans))

    @classmethod
    async def on_manager_stop(cls, *, parent: Any = None) -> None:
        """Remove every container of this run (sessions and warm pool), then forget the engine."""
        backend = cls._backend_for(parent)
        await backend.close()
        engine = backend.engine
        if engine is not None:
            try:
                found = await _run(engine.api.containers, all=True,
                                   filters={"label": [f"{LABEL_RUN}={backend.run_id}"]})
                await asyncio.gather(*(_run(_remove_quietly, engine, c["Id"]) for c in found))
            except Exception as e:
                backend.settings.log.warning("Could not remove the agent containers of this run: %s", e)
            engine.close()
        if parent is None:
            _default_backend.pop("", None)
        else:
            _backends.pop(parent, None)

    @classmethod
    async def prewarm(cls, spec: SandboxSpec, *, parent: Any = None) -> None:
        """Start ``warm_pool_size`` spares for ``spec`` now (e.g. when a user opens the UI)."""
        backend = cls._backend_for(parent)
        if backend.settings.warm_pool_size <= 0:
            return
        probe = cls.create(spec, parent=parent)
        kwargs = probe._kwargs(session=WARM_SESSION)
        backend.replenish(pool_key(kwargs), kwargs)

    @classmethod
    def pool_status(cls, *, parent: Any = None) -> dict[str, int]:
        """Ready spares per configuration key (for stats and tests)."""
        return {k: len(v) for k, v in cls._backend_for(parent).pool.items()}

    @classmethod
    async def pool_settled(cls, *, parent: Any = None) -> None:
        """Wait until no spare is being started."""
        backend = cls._backend_for(parent)
        while backend.fill_tasks:
            await asyncio.wait(set(backend.fill_tasks))

    # -- one sandbox ---------------------------------------------------------------------------
    @property
    def workspace_path(self) -> str:
        return self.workspace_mount_path

    def _settings(self, user: str) -> DockerSettings:
        engine = self._engine
        return DockerSettings(
            image=self.image, workspace_mount_path=self.workspace_mount_path,
            host_mounts=tuple(self.host_mounts), host_etc_entries=tuple(self.host_etc_entries),
            read_only=self.read_only, tmpfs_size=self.tmpfs_size, user=user,
            network_name=self.network_name, log_driver=self.log_driver,
            storage_opt_supported=bool(engine and engine.storage_opt_supported),
            extra_create_kwargs=dict(self.extra_create_kwargs),
        )

    def _kwargs(self, *, session: str | None = None) -> dict[str, Any]:
        backend = self._backend or self._backend_for(self.parent)
        user = resolve_user(self.user, self.spec.workspace)
        if user.split(":")[0] in ("0", "root"):
            raise SandboxError("c.DockerSandbox.user must not be root (0)")
        labels = container_labels(self.spec, server_id=backend.settings.server_id, run_id=backend.run_id,
                                  session=session)
        return build_create_kwargs(self.spec, self._settings(user), name=container_name(self.name_prefix,
                                   self.spec), labels=labels)

    def _chown_rw_paths(self, user: str) -> None:
        if not (self.chown_rw_paths and os.geteuid() == 0 and self._engine and self._engine.local):
            return
        uid_s, _, gid_s = user.partition(":")
        try:
            uid, gid = int(uid_s), int(gid_s or uid_s)
        except ValueError:
            return  # a user name: we cannot know its uid here
        homes = [self.spec.home] if self.spec.home else []
        for top in [*self.spec.rw_paths, *homes]:  # and what the server wrote there (settings, sockets)
            for path in [top, *(os.path.join(d, n) for d, dirs, files in os.walk(top) for n in dirs + files)]:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if st.st_uid == 0 and (st.st_uid, st.st_gid) != (uid, gid):
                        os.lchown(path, uid, gid)

    def limits_enforced(self) -> dict[str, bool]:
        return {"mem_limit": False, "cpu_limit": False, "pids_limit": False, **self._enforced,
                "disk_limit": False, "network": not self.spec.limits.network}

    def _note_enforced(self, engine: _Engine) -> None:
        limits, info = self.spec.limits, engine.info
        self._enforced = {
            "mem_limit": bool(limits.mem_limit) and info.get("MemoryLimit", True) is not False,
            "cpu_limit": bool(limits.cpu_limit) and info.get("CpuCfsQuota", True) is not False,
            "pids_limit": bool(limits.pids_limit) and info.get("PidsLimit", True) is not False,
        }
        for name, value in self._enforced.items():
            if getattr(limits, name) and not value:
                self.log.warning("The Docker engine cannot enforce %s here; it is not enforced", name)
        if limits.disk_limit:
            self.log.warning(
                "disk_limit (%d bytes) is not enforced for session %s: the agent writes to its bind-mounted "
                "workspace, which Docker cannot cap; give users a size-limited workspace file system",
                limits.disk_limit, self.spec.labels.get("session", "?"))

    async def start(self) -> None:
        if self.spec is None:
            raise SandboxError("DockerSandbox needs a SandboxSpec")
        backend = self._backend = self._backend or self._backend_for(self.parent)
        engine = self._engine = await backend.engine_async()
        kwargs = self.create_kwargs = self._kwargs()
        self._note_enforced(engine)
        await asyncio.to_thread(self._chown_rw_paths, kwargs["user"])
        key = pool_key(kwargs) if backend.settings.warm_pool_size > 0 else None
        spare = backend.take(key) if key else None
        try:
            if spare is not None:
                await self._start_spare(engine, spare)
            if self.container_id is None:
                await self._start_cold(engine, kwargs)
        except BaseException:
            await self.remove()
            raise
        if key is not None:
            backend.replenish(key, kwargs)

    async def _start_cold(self, engine: _Engine, kwargs: dict[str, Any]) -> None:
        try:
            self.container_id = await _run(_create, engine, kwargs)
        except Exception as e:
            if _not_found(e):
                raise SandboxError(f"The sandbox image {kwargs['image']} does not exist in the Docker "
                                   "engine; build it (scripts/sandbox-image or the Dockerfile)") from e
            raise SandboxError(f"Docker could not create the agent container: {_explain(e)}") from e
        self.container_name = kwargs["name"]
        await self._attach(engine)  # before start: not a byte is lost
        try:
            await _run(engine.api.start, self.container_id)
        except Exception as e:
            raise SandboxError(f"Docker could not start the agent container: {_explain(e)}") from e

    async def _start_spare(self, engine: _Engine, spare: _Spare) -> None:
        try:
            state = (await _run(engine.api.inspect_container, spare.id))["State"]
        except Exception:
            state = {}
        if not state.get("Running"):
            await _run(_remove_quietly, engine, spare.id)
            return  # a dead spare: start cold instead
        self.container_id, self.container_name, self.from_pool = spare.id, spare.name, True
        await self._attach(engine)
        name = self.create_kwargs["name"] if self.create_kwargs else None
        if name:  # the session's name, for admins reading `docker ps`; not on the critical path
            self._spawn(self._rename(engine, spare.id, name))

    async def _rename(self, engine: _Engine, cid: str, name: str) -> None:
        with contextlib.suppress(Exception):
            await _run(engine.api.rename, cid, name)
            self.container_name = name

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _attach(self, engine: _Engine) -> None:
        assert self.container_id is not None
        params = {"stdin": 1, "stdout": 1, "stderr": 1, "stream": 1}
        cid = self.container_id
        reader, writer, bridge = await engine.hijack(
            "POST", f"/containers/{cid}/attach", params,
            sdk_fallback=lambda: engine.api.attach_socket(cid, params=params))
        self._writer, self._bridge = writer, bridge
        self.stdin = writer
        self.stdout = BoundedReader(limit=STDIO_LINE_LIMIT)
        self._stream_done.clear()
        self._demux = asyncio.create_task(self._pump(reader), name="acp-docker-stdio")

    async def _pump(self, raw: asyncio.StreamReader) -> None:
        assert self.stdout is not None
        stdout = self.stdout

        try:
            await demultiplex(raw, stdout.feed_data, self._on_stderr,
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

    async def _inspect_state(self) -> dict[str, Any] | None:
        assert self._engine is not None and self.container_id is not None
        try:
            return (await _run(self._engine.api.inspect_container, self.container_id))["State"]
        except Exception as e:
            if _not_found(e):
                return None
            raise

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
            # the stream broke while the container runs: let the engine tell us when it exits
            with contextlib.suppress(Exception):
                await _run(engine.api.wait, cid, timeout=10)
            await asyncio.sleep(0.05)

    async def stop(self, timeout: float = 3.0) -> None:
        writer = self._writer
        if writer is not None and not writer.is_closing():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()  # half-close: the agent reads EOF on stdin
        if self.container_id is None or self._engine is None or self._status is not None:
            return
        engine, cid = self._engine, self.container_id
        try:
            await _run(engine.api.stop, cid, timeout=max(math.ceil(timeout), 0))
        except Exception as e:
            if not _not_found(e):
                self.log.warning("docker stop of %s failed (%s); killing it", cid[:12], _explain(e))
                with contextlib.suppress(Exception):
                    await _run(engine.api.kill, cid)
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
            await _run(_remove_quietly, self._engine, self.container_id)

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
        engine, cid = self._engine, self.container_id
        merged = self.spec.sandboxed_env({**self.spec.env, **(env or {})})
        # the exec runs in the container, but "NAME=VALUE" strings must still parse back the same
        check_command(argv, merged)
        if cwd is not None and "\x00" in cwd:
            raise SandboxError("The working directory holds a NUL byte")
        pidfile = f"/tmp/.jupyter-acp-exec-{secrets.token_hex(6)}"
        # record the command's pid (it leads the exec's process group) so that kill() can reach it
        wrapped = ["/bin/sh", "-c", 'echo $$ > "$0" 2>/dev/null; exec "$@"', pidfile, *argv]
        environment = [f"{k}={v}" for k, v in merged.items()]
        user = (self.create_kwargs or {}).get("user") or ""
        try:
            exec_id = (await _run(engine.api.exec_create, cid, wrapped, stdout=True, stderr=True,
                                  stdin=False, tty=False, environment=environment,
                                  workdir=cwd or self.workspace_path, user=user))["Id"]
        except Exception as e:
            raise OSError(errno.ESRCH, f"cannot run a command in the sandbox: {_explain(e)}") from e
        reader, writer, bridge = await engine.hijack(
            "POST", f"/exec/{exec_id}/start", body={"Detach": False, "Tty": False},
            sdk_fallback=lambda: engine.api.exec_start(exec_id, socket=True))
        return DockerCommand(self, exec_id, pidfile, user, reader, writer, bridge)


def _explain(e: BaseException) -> str:
    explanation = getattr(e, "explanation", None)
    return str(explanation or e)


class DockerCommand:
    """A command started by ``docker exec`` in the agent's container (``CommandProcess``)."""

    def __init__(self, sandbox: DockerSandbox, exec_id: str, pidfile: str, user: str,
                 raw: asyncio.StreamReader, writer: asyncio.StreamWriter, bridge: _Bridge | None) -> None:
        self.sandbox = sandbox
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
        engine = self.sandbox._engine
        assert engine is not None
        delay = 0.005
        while True:
            try:
                info = await _run(engine.api.exec_inspect, self.exec_id)
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
        engine, cid = self.sandbox._engine, self.sandbox.container_id
        if engine is None or cid is None:
            return
        script = ('p=$(cat "$0" 2>/dev/null) && { kill -KILL -- "-$p" 2>/dev/null || kill -KILL "$p"; }; '
                  'rm -f "$0"')
        try:
            exec_id = (await _run(engine.api.exec_create, cid, ["/bin/sh", "-c", script, self.pidfile],
                                  stdout=False, stderr=False, user=self.user))["Id"]
            await _run(engine.api.exec_start, exec_id, detach=True)
        except Exception as e:
            log.debug("Could not kill exec %s: %s", self.exec_id[:12], e)
