"""Talking to the Docker engine: one SDK client per backend, a thread pool, errors in words.

Every blocking SDK call runs in ``run_blocking``'s thread pool, never on the event loop. Only
the SDK's public API is used: containers are created with ``APIClient.create_container`` and
``create_host_config`` (``split_create_kwargs`` sorts the high-level ``containers.create``
arguments that ``spec.build_create_kwargs`` produces between the two, with the SDK's public
``RUN_CREATE_KWARGS`` list), which saves the extra inspect round trip ``containers.create`` makes.

Attach and exec-start are HTTP requests upgraded to a raw stream (the Engine API's documented
"hijack"). For unix and plain tcp engines ``hijack`` opens that connection with asyncio itself,
so the agent's stdin is a real ``asyncio.StreamWriter`` whose half-close sends EOF; for TLS, ssh
and npipe engines it asks the SDK for the socket and bridges it (``stdio.Bridge``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlencode, urlparse

from ...errors import SandboxError
from .stdio import Bridge

log = logging.getLogger("jupyter_acp.sandbox")

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


async def run_blocking(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking docker SDK call in the sandbox thread pool (shared by every backend: the
    engine serialises much of its work anyway, and 16 threads bound what a burst can pile up)."""
    global _executor
    if _executor is None:
        with _executor_lock:
            if _executor is None:
                _executor = ThreadPoolExecutor(max_workers=16, thread_name_prefix="jupyter-acp-docker")
    return await asyncio.get_running_loop().run_in_executor(_executor, functools.partial(fn, *args, **kwargs))


class EngineError(SandboxError):
    """The engine refused a request (``http_status`` is the HTTP status of its answer)."""

    def __init__(self, message: str, *, http_status: int = 500) -> None:
        super().__init__(message)
        self.http_status = http_status


def not_found(e: BaseException) -> bool:
    return getattr(e, "http_status", None) == 404 or type(e).__name__ == "NotFound" or (
        getattr(getattr(e, "response", None), "status_code", None) == 404)


def conflict(e: BaseException) -> bool:
    return getattr(getattr(e, "response", None), "status_code", None) == 409


def explain(e: BaseException) -> str:
    """The engine's own explanation of an error when it gave one."""
    explanation = getattr(e, "explanation", None)
    return str(explanation or e)


def split_create_kwargs(kwargs: dict[str, Any], create_keys: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """``containers.create`` keyword arguments → (``create_container`` ones, host config ones)."""
    create, host = {}, {}
    for key, value in kwargs.items():
        if key in create_keys:
            create[key] = value
        elif key == "network":  # the high-level alias of network_mode
            host["network_mode"] = value
        elif key == "volumes":
            host["binds"] = value
        else:
            host[key] = value
    return create, host


class Engine:
    """One docker SDK client plus what we learnt about the engine (shared by a backend's sandboxes)."""

    def __init__(self, docker_host: str, api_timeout: float) -> None:
        import docker  # the optional dependency: pip install 'jupyter-acp[docker]'
        from docker.models.containers import RUN_CREATE_KWARGS

        self.create_keys = frozenset(RUN_CREATE_KWARGS)
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
        self.version: str = self.api.api_version
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

    def create(self, kwargs: dict[str, Any]) -> str:
        """Create a container from ``containers.create`` arguments (blocking); returns its id."""
        create, host = split_create_kwargs(kwargs, self.create_keys)
        return self.api.create_container(host_config=self.api.create_host_config(**host), **create)["Id"]

    def remove_quietly(self, cid: str) -> None:
        """Force-remove a container (blocking); gone already or being removed is fine."""
        try:
            self.api.remove_container(cid, force=True)
        except Exception as e:
            if not (not_found(e) or conflict(e)):
                log.warning("Could not remove container %s: %s", cid[:12], e)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    async def hijack(self, method: str, path: str, params: dict[str, Any] | None = None,
                     body: dict[str, Any] | None = None,
                     sdk_fallback: Callable[[], Any] | None = None
                     ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Bridge | None]:
        """An HTTP request upgraded to a raw stream (attach, exec start) as asyncio streams."""
        if self.endpoint is None:
            if sdk_fallback is None:
                raise SandboxError(f"Cannot stream from the engine at {self.base_url}")
            bridge = Bridge(await run_blocking(sdk_fallback))
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
