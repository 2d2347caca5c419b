"""What a container looks like, as data: ``SandboxSpec`` + admin settings → ``containers.create``
keyword arguments.

Pure (no engine, no I/O apart from the injectable ``exists``), so every isolation property of a
container (limits, mounts, capabilities, user) is unit-tested without Docker, like kubespawner's
``objects.py``. The engine module turns these keyword arguments into calls of the SDK's public
low-level API; nothing here knows about the SDK.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..base import AGENT_HOME, SandboxSpec

DEFAULT_IMAGE = "jupyter-acp-sandbox:test"
LABEL_PREFIX = "jupyter-acp."
LABEL_USER = "jupyter-acp.user"
LABEL_SESSION = "jupyter-acp.session"
LABEL_SERVER = "jupyter-acp.server"
LABEL_RUN = "jupyter-acp.run"
LABEL_POOL = "jupyter-acp.pool"
LABEL_AGENT = "jupyter-acp.agent"
#: The host directory that is a spare's home (removed with the spare, or as an orphan).
LABEL_POOL_HOME = "jupyter-acp.pool-home"
#: The host directory that is a spare's gateway socket directory (likewise).
LABEL_POOL_GATEWAY = "jupyter-acp.pool-gateway"
#: The name prefix of a spare's own directories (beside the session homes, or the gateway's
#: socket directories).
SPARE_HOME_PREFIX = ".jupyter-acp-spare-"
SPARE_HOME_PENDING = SPARE_HOME_PREFIX + "pending"
#: Where a container shows its session's LLM gateway socket directory (``SandboxSpec.gateway_dir``):
#: a fixed path, so that the agent's relay command, written before a spare is claimed, names it.
GATEWAY_TARGET = "/run/jupyter-acp-llm"
#: The mounts that belong to one session. A spare has an empty directory of its own for each,
#: beside the session's (same parent, same file system), swapped in at claim (``adopt_dir``).
SWAPPED = {AGENT_HOME: LABEL_POOL_HOME, GATEWAY_TARGET: LABEL_POOL_GATEWAY}
#: The ``jupyter-acp.session`` label of a warm-pool spare until a session takes it.
WARM_SESSION = "warm-pool"
#: /etc entries programs need (users, name service config, TLS roots, time zone, linker cache).
#: The rest of the host's /etc (shadow, ssh keys, the server's own config) stays out of sight.
#: hosts, hostname and resolv.conf are the container's own (Docker writes them).
ETC_ENTRIES = ("passwd", "group", "nsswitch.conf", "localtime", "timezone", "ld.so.cache", "ld.so.conf",
               "ld.so.conf.d", "ssl", "ca-certificates", "ca-certificates.conf", "alternatives",
               "mime.types", "os-release", "debian_version", "gai.conf", "host.conf", "protocols",
               "services")
SIZE_RE = re.compile(r"^\d+[kKmMgG]?$")


@dataclass(frozen=True)
class DockerSettings:
    """The admin's ``c.DockerSandbox.*`` settings that shape a container (see the traits), frozen
    so that one session's arguments never change under it."""

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
    """``jupyter-acp.*`` labels: the spec's labels (user, session, agent) plus server and run
    (what orphan clean-up and ``on_manager_stop`` select containers by)."""
    labels = {f"{LABEL_PREFIX}{k}": str(v) for k, v in spec.labels.items()}
    labels.setdefault(LABEL_USER, "")
    labels[LABEL_SESSION] = session if session is not None else str(spec.labels.get("session", ""))
    labels[LABEL_SERVER] = server_id
    labels[LABEL_RUN] = run_id
    return labels


def container_name(prefix: str, spec: SandboxSpec) -> str:
    """``jupyter-acp-<user>-<session>-<random>``, restricted to what Docker accepts (for admins
    reading ``docker ps``; nothing relies on it)."""
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
    if spec.gateway_dir is not None:
        bind(spec.gateway_dir, GATEWAY_TARGET, read_only=False)
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
    """What a warm-pool spare must share with a session to serve it, as a digest.

    ``kwargs`` are a *spare's* arguments (``spare_template``), which hold nothing of a session:
    the key is the image, limits, mounts (the user's workspace, the agent's read-only paths),
    user and labels other than the session's, never a name, an environment, a home or a gateway
    socket directory (only where they are: their parents)."""
    rest = {k: v for k, v in kwargs.items() if k not in ("name", "environment")}
    rest["labels"] = {k: v for k, v in kwargs.get("labels", {}).items()
                      if k not in (LABEL_SESSION, LABEL_POOL, LABEL_AGENT, *SWAPPED.values())}
    rest["mounts"] = [dict(m, Source=os.path.dirname(m["Source"])) if m.get("Target") in SWAPPED else m
                      for m in kwargs.get("mounts", [])]
    blob = json.dumps(rest, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def spare_template(kwargs: Mapping[str, Any], *, idle_command: Sequence[str]) -> dict[str, Any]:
    """A spare's create arguments, from those of a session it could serve: the same container
    minus everything of the session. It runs ``idle_command`` (the agent is exec'd into it at
    claim, with the session's environment), has no environment and no session or agent label,
    and its home and gateway socket directory (``SWAPPED``) are empty directories beside the
    session's (the pool makes fresh ones in the same parents, swapped in at claim)."""
    spare = {k: v for k, v in kwargs.items() if k not in ("name", "environment", "command")}
    spare["command"] = list(idle_command)
    spare["environment"] = {}
    spare["stdin_open"] = False
    spare["detach"] = True
    spare["labels"] = {k: v for k, v in kwargs.get("labels", {}).items()
                       if k not in (LABEL_SESSION, LABEL_AGENT)}
    spare["labels"][LABEL_SESSION] = WARM_SESSION
    spare["mounts"] = [dict(m, Source=os.path.join(os.path.dirname(m["Source"]), SPARE_HOME_PENDING))
                       if m.get("Target") in SWAPPED else m
                       for m in kwargs.get("mounts", [])]
    return spare


def with_spare_dirs(template: Mapping[str, Any], dirs: Mapping[str, str]) -> dict[str, Any]:
    """``template`` with the sources of its ``SWAPPED`` mounts set to the spare's own
    directories (``dirs``: mount target → host directory), each named in a label."""
    spare = dict(template)
    spare["mounts"] = [dict(m, Source=dirs[m["Target"]]) if m.get("Target") in dirs else m
                       for m in template.get("mounts", [])]
    spare["labels"] = {**template["labels"], **{SWAPPED[t]: d for t, d in dirs.items()}}
    return spare


def spare_dir_parents(template: Mapping[str, Any]) -> dict[str, str]:
    """Where a spare's own directories go: mount target → the parent of the sessions' ones."""
    return {m["Target"]: os.path.dirname(m["Source"]) for m in template.get("mounts", [])
            if m.get("Target") in SWAPPED}


def resolve_user(setting: str, workspace: Path) -> str:
    """``setting`` if given; else the owner of the workspace when not root; else ``1000:1000``
    (so files the agent writes in the workspace belong to the workspace's owner)."""
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
