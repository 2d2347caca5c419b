"""The Docker sandbox: one container per agent session (the design's primary backend).

Every container runs exactly one agent with the limits of its session: no network (``none``)
unless allowed, memory without swap, a CPU quota, a pids limit, a read-only root with a small
``/tmp`` tmpfs, every capability dropped, ``no-new-privileges``, an init process (so signals
reach the agent and zombies are reaped), a non-root user, and only the user's workspace mounted
read-write (at ``/workspace``, its working directory) besides the session's private home.

Configuration is ``c.DockerSandbox.*`` (``image``, ``host_mounts``, ``user``, ``warm_pool_size``,
...); the limits come from the session manager (``c.UserSessionManager.mem_limit`` and friends).

One concept per module:

* ``spec``     pure: ``SandboxSpec`` + settings → ``containers.create`` arguments, labels, names
* ``engine``   the SDK client (public API only), the thread pool, the HTTP upgrade for streams
* ``stdio``    frame demultiplexing, backpressure, the socket-pair bridge for TLS/ssh engines
* ``pool``     warm spares, started ahead of the sessions they serve
* ``backend``  ``DockerSandbox``: the admin's configurable, one per session manager
* ``sandbox``  ``ContainerSandbox``: one agent session's container (the ``Sandbox`` contract)
* ``exec``     ACP terminals: ``docker exec`` with a killable process group

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

from .backend import DockerSandbox
from .engine import Engine, EngineError
from .exec import DockerCommand
from .pool import WarmPool
from .sandbox import ContainerSandbox
from .spec import (
    DEFAULT_IMAGE,
    ETC_ENTRIES,
    LABEL_POOL,
    LABEL_PREFIX,
    LABEL_RUN,
    LABEL_SERVER,
    LABEL_SESSION,
    LABEL_USER,
    WARM_SESSION,
    DockerSettings,
    build_create_kwargs,
    container_labels,
    container_name,
    exit_status,
    pool_key,
    resolve_user,
    spare_template,
    with_spare_dirs,
)
from .stdio import BoundedReader, Bridge, demultiplex

__all__ = [
    "DEFAULT_IMAGE", "ETC_ENTRIES", "LABEL_POOL", "LABEL_PREFIX", "LABEL_RUN", "LABEL_SERVER",
    "LABEL_SESSION", "LABEL_USER", "WARM_SESSION", "BoundedReader", "Bridge", "ContainerSandbox",
    "DockerCommand", "DockerSandbox", "DockerSettings", "Engine", "EngineError", "WarmPool",
    "build_create_kwargs", "container_labels", "container_name", "demultiplex", "exit_status",
    "pool_key", "resolve_user", "spare_template", "with_spare_dirs",
]
