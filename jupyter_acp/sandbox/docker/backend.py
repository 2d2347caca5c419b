"""``DockerSandbox``: the admin's configuration of the Docker backend and its shared state.

One instance per session manager (its traitlets ``parent``), so ``c.DockerSandbox.*`` in the
Jupyter server config reaches it like any configurable. It owns what the manager's sessions
share: the engine client, the run id, the warm pool, the cached availability answer. It is not
a session: ``create`` returns a ``ContainerSandbox`` (``sandbox.py``), one per agent session.
The session manager talks to backends through the class (``backend("docker").create(...)``,
``.available``, ``.on_manager_start``...), so those are class methods finding the instance of
the given parent.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import time
import uuid
import weakref
from typing import Any, ClassVar

from traitlets import Bool, Dict, Float, Integer, List, TraitError, Unicode, default, validate
from traitlets.config import LoggingConfigurable

from ...errors import SandboxError
from ..base import SandboxSpec
from .engine import Engine, not_found, run_blocking
from .pool import WarmPool, remove_spare_home
from .sandbox import ContainerSandbox
from .spec import (
    DEFAULT_IMAGE,
    ETC_ENTRIES,
    GATEWAY_TARGET,
    LABEL_RUN,
    LABEL_SERVER,
    SIZE_RE,
    SWAPPED,
    WARM_SESSION,
    DockerSettings,
    build_create_kwargs,
    container_labels,
    container_name,
    pool_key,
    resolve_user,
    spare_template,
)


class DockerSandbox(LoggingConfigurable):
    """The Docker backend: an agent per container (admin settings: ``c.DockerSandbox.*``)."""

    kind: ClassVar[str] = "docker"
    isolated: ClassVar[bool] = True
    provides_terminals: ClassVar[bool] = True
    gateway_target: ClassVar[str | None] = GATEWAY_TARGET

    _instances: ClassVar[weakref.WeakKeyDictionary[Any, DockerSandbox]] = weakref.WeakKeyDictionary()
    _default: ClassVar[dict[str, DockerSandbox]] = {}

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
        if value and not SIZE_RE.match(value):
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
        help="""How many started spare containers to keep for each pool key: a user's workspace
        with one agent kind's image, limits and read-only paths (see ``pool.py``). A spare holds
        nothing of any session and serves any new session with that key: its agent is started in
        it with the session's environment and home. 0: no pool.""",
    ).tag(config=True)

    warm_pool_idle_timeout = Float(
        600.0,
        help="Seconds an unused pool key keeps its spares. 0: until the server stops.",
    ).tag(config=True)

    warm_pool_idle_command = List(
        Unicode(),
        ["sleep", "infinity"],
        help="""What a spare container runs until a session takes it (the agent is then started
        beside it with ``docker exec``). It must exist in the image (or ``host_mounts``).""",
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

    limits_required = Bool(
        True,
        help="""Refuse to start an agent whose memory, CPU or process limit the engine cannot
        enforce (e.g. a rootless engine without cgroup delegation reports ``MemoryLimit:
        false``), instead of running it without that limit. False: run it, with a warning in
        the log and the limit shown as not enforced in the session. The same policy as
        ``c.BubblewrapSandbox.limits_required``.""",
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

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.run_id = uuid.uuid4().hex[:16]
        self.engine: Engine | None = None
        self.checked: tuple[float, bool, str] | None = None
        self.pool = WarmPool(size=self.warm_pool_size, idle_timeout=self.warm_pool_idle_timeout,
                             name_prefix=self.name_prefix, engine=self.engine_async, log=self.log)

    # -- the instance of a session manager ----------------------------------------------------
    @classmethod
    def for_parent(cls, parent: Any) -> DockerSandbox:
        """The backend of ``parent`` (the session manager), made on first use."""
        if parent is None:
            if "" not in cls._default:
                cls._default[""] = cls()
            return cls._default[""]
        backend = cls._instances.get(parent)
        if backend is None:
            backend = cls._instances[parent] = cls(parent=parent)
        return backend

    def _forget(self) -> None:
        if self.parent is None:
            self._default.pop("", None)
        else:
            self._instances.pop(self.parent, None)

    def get_engine(self) -> Engine:
        if self.engine is None:
            self.engine = Engine(self.docker_host, self.api_timeout)
        return self.engine

    async def engine_async(self) -> Engine:
        if self.engine is None:
            try:
                await run_blocking(self.get_engine)
            except ImportError as e:
                raise SandboxError("The docker Python package is missing: pip install 'jupyter-acp[docker]'"
                                   ) from e
            except Exception as e:
                where = self.docker_host or "the default socket"
                raise SandboxError(f"No Docker engine answers at {where}: {e}") from e
        assert self.engine is not None
        return self.engine

    def settings_for(self, user: str, engine: Engine | None) -> DockerSettings:
        """The frozen settings one container is built from."""
        return DockerSettings(
            image=self.image, workspace_mount_path=self.workspace_mount_path,
            host_mounts=tuple(self.host_mounts), host_etc_entries=tuple(self.host_etc_entries),
            read_only=self.read_only, tmpfs_size=self.tmpfs_size, user=user,
            network_name=self.network_name, log_driver=self.log_driver,
            storage_opt_supported=bool(engine and engine.storage_opt_supported),
            extra_create_kwargs=dict(self.extra_create_kwargs),
        )

    def create_kwargs_for(self, spec: SandboxSpec, *, engine: Engine | None = None,
                          session: str | None = None) -> dict[str, Any]:
        """``containers.create`` arguments of a session (``session``: its label, if not the spec's)."""
        user = resolve_user(self.user, spec.workspace)
        if user.split(":")[0] in ("0", "root"):
            raise SandboxError("c.DockerSandbox.user must not be root (0)")
        labels = container_labels(spec, server_id=self.server_id, run_id=self.run_id, session=session)
        return build_create_kwargs(spec, self.settings_for(user, engine),
                                   name=container_name(self.name_prefix, spec), labels=labels)

    def check(self) -> tuple[bool, str]:
        """Engine up and image present (blocking; ``available`` caches it)."""
        where = self.docker_host or "the default socket"
        try:
            engine = self.get_engine()
        except ImportError:
            return False, "the docker Python package is not installed (pip install 'jupyter-acp[docker]')"
        except Exception as e:
            return False, f"no Docker engine answers at {where} ({type(e).__name__}: {e})"
        try:
            engine.api.ping()
            engine.api.inspect_image(self.image)
        except Exception as e:
            if not_found(e):
                return False, (f"the image {self.image} is not in the engine at {where}; build it "
                               "with scripts/sandbox-image (tests) or jupyter_acp/sandbox/Dockerfile")
            self.engine = None
            engine.close()
            return False, f"the Docker engine at {where} does not answer ({type(e).__name__}: {e})"
        return True, ""

    # -- the backend contract the session manager calls (see base.Sandbox) -------------------
    @classmethod
    def create(cls, spec: SandboxSpec, *, parent: Any = None) -> ContainerSandbox:
        return ContainerSandbox(spec, cls.for_parent(parent))

    @classmethod
    def available(cls, *, parent: Any = None) -> tuple[bool, str]:
        backend = cls.for_parent(parent)
        now = time.monotonic()
        if backend.checked is not None and now - backend.checked[0] < backend.availability_ttl:
            return backend.checked[1], backend.checked[2]
        ok, why = backend.check()
        backend.checked = (now, ok, why)
        return ok, why

    @classmethod
    async def on_manager_start(cls, *, parent: Any = None) -> None:
        """Remove orphans: containers of this server (same ``server_id``) from an earlier run."""
        backend = cls.for_parent(parent)
        try:
            engine = await backend.engine_async()
            found = await run_blocking(engine.api.containers, all=True,
                                       filters={"label": [f"{LABEL_SERVER}={backend.server_id}"]})
        except Exception as e:
            backend.log.warning("Could not look for orphaned agent containers: %s", e)
            return
        orphans = [c for c in found if (c.get("Labels") or {}).get(LABEL_RUN) != backend.run_id]
        if orphans:
            backend.log.info("Removing %d agent container(s) left by an earlier run of this server",
                             len(orphans))
            await asyncio.gather(*(run_blocking(engine.remove_quietly, c["Id"]) for c in orphans))
            for c in orphans:  # a crashed run's spares leave their (empty) own directories
                for label in SWAPPED.values():
                    await asyncio.to_thread(remove_spare_home, (c.get("Labels") or {}).get(label))

    @classmethod
    async def on_manager_stop(cls, *, parent: Any = None) -> None:
        """Remove every container of this run (sessions and warm pool), then forget the engine."""
        backend = cls.for_parent(parent)
        await backend.pool.close()
        engine = backend.engine
        if engine is not None:
            try:
                found = await run_blocking(engine.api.containers, all=True,
                                           filters={"label": [f"{LABEL_RUN}={backend.run_id}"]})
                await asyncio.gather(*(run_blocking(engine.remove_quietly, c["Id"]) for c in found))
            except Exception as e:
                backend.log.warning("Could not remove the agent containers of this run: %s", e)
            engine.close()
        backend._forget()

    # -- warm pool -----------------------------------------------------------------------------
    @classmethod
    async def prewarm(cls, spec: SandboxSpec, *, parent: Any = None) -> None:
        """Start ``warm_pool_size`` spares for sessions like ``spec`` now (e.g. when a user opens the UI)."""
        backend = cls.for_parent(parent)
        if backend.pool.size <= 0:
            return
        kwargs = backend.create_kwargs_for(spec, engine=await backend.engine_async(), session=WARM_SESSION)
        template = spare_template(kwargs, idle_command=backend.warm_pool_idle_command)
        backend.pool.replenish(pool_key(template), template)

    @classmethod
    def pool_status(cls, *, parent: Any = None) -> dict[str, int]:
        """Ready spares per configuration key (for stats and tests)."""
        return cls.for_parent(parent).pool.status()

    @classmethod
    async def pool_settled(cls, *, parent: Any = None) -> None:
        """Wait until no spare is being started."""
        await cls.for_parent(parent).pool.settled()
