"""Bubblewrap: Linux namespaces without a daemon (Debian package ``bubblewrap``).

The agent sees a read-only system (``/usr``, a short list of harmless ``/etc`` files, the paths
its interpreter needs), an empty ``/tmp``, its private home and — the only user data —
the workspace at ``/workspace``. It has no network (only ``lo``) unless the admin allows it, no
capabilities, its own PID namespace, and dies with the server (``--die-with-parent``).

Memory, CPU and pids limits come from a cgroup made per session (v1 hierarchies ``memory``,
``cpu``, ``pids``, or a v2 group). The process joins its cgroups *before* it execs bwrap (a
one-line ``sh`` wrapper writes its own pid), so nothing the agent forks ever escapes them. The
groups are made where the server has the right to make them (``cgroup_rights``, cached): the
host's tree (``/sys/fs/cgroup[/CONTROLLER]/jupyter-acp``, usually as root), else the server's
own cgroup when it is *delegated* to the server's user (systemd ``Delegate=yes``, e.g.
SystemdSpawner, or an admin who chowned it). Where neither is possible — a single-user server
of a real Unix user under LocalProcessSpawner — the admin's policy decides
(``c.BubblewrapSandbox.limits_required``): by default the backend is *unavailable* and a session
that asks for a limit it cannot get is refused with the reason and the ways out; only an admin
who set it to False gets sandboxes without limits, each with a warning in the log. There is no
rlimit fallback: ``RLIMIT_AS`` caps one process's address space (not the group's memory, and it
breaks runtimes that reserve large virtual ranges, node among them), ``RLIMIT_NPROC`` counts
every process of the uid (the user's server and kernels too, not the sandbox's) and
``RLIMIT_CPU`` is CPU seconds, not a share of a core — none is the limit the admin set.

The launcher (the ``sh`` wrapper and ``bwrap`` itself) runs outside every namespace with the
server's rights, so nothing the agent chose reaches it as anything but data: it runs with the
fixed ``LAUNCHER_ENV`` in ``/``, and the sandboxed process's environment (the agent's, or a
terminal's, which may carry credentials) is set by ``bwrap --clearenv --setenv NAME VALUE``.
All of bwrap's options, those included, are read from a memfd (``bwrap --args FD``, bubblewrap
>= 0.5 for ``--clearenv``), so no value shows in ``ps``; only the command's own argv (after
``--``) is on bwrap's command line, because bwrap reads the command from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from traitlets import Bool
from traitlets.config import LoggingConfigurable

from ..errors import SandboxError
from .base import (
    AGENT_HOME,
    LAUNCHER_CWD,
    LAUNCHER_ENV,
    HostLaunch,
    ProcessSandbox,
    SandboxSpec,
    check_command,
)

log = logging.getLogger("jupyter_acp.sandbox")

CGROUP_ROOT = Path("/sys/fs/cgroup")
#: Where the agent finds its workspace (and the root of its fs requests).
WORKSPACE = "/workspace"
#: The unprivileged uid/gid the agent runs as inside its user namespace.
SANDBOX_UID = 1000
#: /etc entries programs need (name resolution config, TLS roots, locale, linker cache);
#: the rest of /etc (shadow, ssh keys, the server's config) stays out of sight.
ETC_ENTRIES = ("passwd", "group", "nsswitch.conf", "hosts", "resolv.conf", "localtime", "ld.so.cache",
               "ld.so.conf", "ld.so.conf.d", "ssl", "ca-certificates", "ca-certificates.conf",
               "alternatives", "mime.types", "os-release", "debian_version", "gai.conf", "host.conf")
CPU_PERIOD_US = 100_000


#: The cgroup controller of each limit, and how a refusal names it.
CONTROLLERS = {"mem_limit": "memory", "cpu_limit": "cpu", "pids_limit": "pids"}
LIMIT_WORDS = {"mem_limit": "memory", "cpu_limit": "CPU", "pids_limit": "process"}
#: Seconds ``cgroup_rights()`` keeps its answer (an admin who fixes delegation waits this long).
RIGHTS_TTL = 30.0
#: A harmless value per controller written into a throwaway group to prove the right to limit.
_PROBE_V1 = {"memory": ("memory.limit_in_bytes", "-1"), "cpu": ("cpu.cfs_quota_us", "-1"),
             "pids": ("pids.max", "max")}
_PROBE_V2 = {"memory": ("memory.max", "max"), "cpu": ("cpu.max", f"max {CPU_PERIOD_US}"),
             "pids": ("pids.max", "max")}
#: The leaf a delegated v2 cgroup's own processes (the server, its kernels) move into, so that
#: the group may enable controllers for its children ("no internal processes", cgroup v2).
SERVER_LEAF = "jupyter-server"


def _cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


def _who() -> str:
    uid = os.getuid()
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (ImportError, KeyError):
        return f"uid {uid}"


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path per v1 controller, and under ``""`` its v2 group."""
    out: dict[str, str] = {}
    try:
        text = Path("/proc/self/cgroup").read_text()
    except OSError:
        return out
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        for controller in parts[1].split(",") if parts[1] else [""]:
            out[controller] = parts[2]
    return out


@dataclass
class CgroupRights:
    """Where this server may make limited cgroups: per controller, the directory the session
    groups go in; for the others, why not (``reason``)."""

    bases: dict[str, Path] = field(default_factory=dict)
    reason: str = ""
    how: str = ""

    def missing(self, limits: Sequence[str] = tuple(CONTROLLERS)) -> list[str]:
        """Which of ``limits`` (``mem_limit``...) no group can be made for."""
        return [name for name in limits if CONTROLLERS[name] not in self.bases]


def _enable_v2_controllers(*levels: Path) -> None:
    for level in levels:
        for ctl in CONTROLLERS.values():
            with contextlib.suppress(OSError):
                (level / "cgroup.subtree_control").write_text(f"+{ctl}")


def _try_base(base: Path, controllers: Sequence[str], v2: bool) -> str:
    """Make ``base`` (if missing) and a throwaway group in it with each controller's limit
    written and its ``cgroup.procs`` writable: "" when that worked, else why not."""
    probe = base / f"probe-{os.getpid()}-{os.urandom(4).hex()}"
    try:
        base.mkdir(exist_ok=True)
        probe.mkdir()
    except OSError as e:
        return f"cannot create a cgroup in {base} ({e.strerror})"
    try:
        for ctl in controllers:
            name, value = (_PROBE_V2 if v2 else _PROBE_V1)[ctl]
            try:
                (probe / name).write_text(value)
            except OSError as e:
                return f"cannot set a {ctl} limit in {base} ({e.strerror})"
        if not os.access(probe / "cgroup.procs", os.W_OK):
            return f"cannot move a process into a cgroup of {base}"
        return ""
    finally:
        with contextlib.suppress(OSError):
            probe.rmdir()


def _delegate_v2(own: Path) -> str:
    """Prepare the server's own v2 group ``own`` for children with controllers, if it is
    delegated to this user: its processes move to the ``SERVER_LEAF`` child (still limited by
    ``own``), then ``own`` enables the controllers for its children. "" or why not."""
    if not (os.access(own, os.W_OK) and os.access(own / "cgroup.procs", os.W_OK)
            and os.access(own / "cgroup.subtree_control", os.W_OK)):
        return f"its own cgroup {own} is not delegated to it"
    try:
        offered = set((own / "cgroup.controllers").read_text().split())
        enabled = set((own / "cgroup.subtree_control").read_text().split())
    except OSError as e:
        return f"cannot read its own cgroup {own} ({e.strerror})"
    lacking = [ctl for ctl in CONTROLLERS.values() if ctl not in offered]
    if lacking:
        return f"its own cgroup {own} is delegated without the {', '.join(lacking)} controller(s)"
    if set(CONTROLLERS.values()) <= enabled:
        return ""
    try:
        leaf = own / SERVER_LEAF
        leaf.mkdir(exist_ok=True)
        for pid in (own / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (leaf / "cgroup.procs").write_text(pid)
        (own / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in CONTROLLERS.values()))
    except OSError as e:
        return f"cannot enable controllers in its own cgroup {own} ({e.strerror})"
    return ""


def _find_rights() -> CgroupRights:
    v2 = _cgroup_v2()
    own = _own_cgroups()
    rights = CgroupRights()
    why: list[str] = []
    if v2:
        tree = CGROUP_ROOT / "jupyter-acp"
        _enable_v2_controllers(CGROUP_ROOT)
        with contextlib.suppress(OSError):
            tree.mkdir(exist_ok=True)
        _enable_v2_controllers(tree)
        problem = _try_base(tree, list(CONTROLLERS.values()), True)
        if not problem:
            return CgroupRights(dict.fromkeys(CONTROLLERS.values(), tree), how="the host's cgroup tree")
        why.append(problem)
        mine = CGROUP_ROOT / own.get("", "/").lstrip("/")
        problem = _delegate_v2(mine) if own.get("", "/") != "/" else "it runs in the root cgroup"
        if not problem:
            base = mine / "jupyter-acp"
            with contextlib.suppress(OSError):
                base.mkdir(exist_ok=True)
            _enable_v2_controllers(base)
            problem = _try_base(base, list(CONTROLLERS.values()), True)
            if not problem:
                return CgroupRights(dict.fromkeys(CONTROLLERS.values(), base),
                                    how=f"the server's delegated cgroup {mine}")
        why.append(problem)
        return CgroupRights(reason=f"this server runs as {_who()}, which {'; and '.join(why)}")
    # cgroup v1: a hierarchy per controller, each in the tree or else in the server's own group
    in_tree: dict[str, str] = {}
    in_own: dict[str, str] = {}
    for ctl in CONTROLLERS.values():
        root = CGROUP_ROOT / ctl
        if not root.is_dir():
            why.append(f"has no {ctl} cgroup hierarchy at {root}")
            continue
        in_tree[ctl] = _try_base(root / "jupyter-acp", [ctl], False)
        if not in_tree[ctl]:
            rights.bases[ctl] = root / "jupyter-acp"
            rights.how = rights.how or "the host's cgroup tree"
            continue
        path = own.get(ctl, "/")
        if path == "/" or not os.access(root / path.lstrip("/"), os.W_OK):
            in_own[ctl] = f"its own {ctl} cgroup {path} is not delegated to it"
            continue
        in_own[ctl] = _try_base(root / path.lstrip("/") / "jupyter-acp", [ctl], False)
        if not in_own[ctl]:
            rights.bases[ctl] = root / path.lstrip("/") / "jupyter-acp"
            rights.how = rights.how or f"the server's delegated cgroup {path}"
    for found in (in_tree, in_own):
        failed = [ctl for ctl, problem in found.items() if problem and ctl not in rights.bases]
        if failed:
            more = f" (and likewise for {', '.join(failed[1:])})" if failed[1:] else ""
            why.append(found[failed[0]] + more)
    if why:
        rights.reason = f"this server runs as {_who()}, which {'; and '.join(why)}"
    return rights


_rights_lock = threading.Lock()
_rights_cache: tuple[float, CgroupRights] | None = None


def cgroup_rights(*, refresh: bool = False) -> CgroupRights:
    """Where this server may make limited cgroups (cached ``RIGHTS_TTL`` seconds; blocking)."""
    global _rights_cache
    with _rights_lock:
        now = time.monotonic()
        if not refresh and _rights_cache is not None and now - _rights_cache[0] < RIGHTS_TTL:
            return _rights_cache[1]
        rights = _find_rights()
        _rights_cache = (now, rights)
        return rights


def limits_refusal(missing: Sequence[str], reason: str) -> str:
    """Why a sandbox is refused for lack of ``missing`` limits, and the admin's ways out."""
    words = [LIMIT_WORDS[name] for name in missing]
    what = words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]
    plural = "s" if len(words) > 1 else ""
    return (
        f"The bubblewrap sandbox cannot enforce the agent's {what} limit{plural} here: {reason}. "
        "The admin's policy (c.BubblewrapSandbox.limits_required = True) refuses to run an agent "
        "without them. An admin can: use the docker sandbox (c.UserSessionManager.sandbox = "
        "'docker') with a Docker engine this server may use (a rootless engine; the host's "
        "Docker socket would give the user root); run this server in a cgroup delegated to its "
        "user (systemd Delegate=yes: SystemdSpawner with unit_extra_properties = "
        "{'Delegate': 'yes'}, or systemd-run --user --scope -p Delegate=yes where the user has "
        "a systemd); or let agents run without these limits "
        "(c.BubblewrapSandbox.limits_required = False). See docs/jupyterhub.md.")


class CgroupSet:
    """The cgroup(s) of one sandbox: created with limits, joined by the agent, removed after."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.v2 = _cgroup_v2()
        self.dirs: dict[str, Path] = {}
        self.enforced = dict.fromkeys(CONTROLLERS, False)
        self.problems: list[str] = []
        self.mem_limit: int | None = None

    def create(self, mem_limit: int | None, cpu_limit: float | None, pids_limit: int | None,
               rights: CgroupRights | None = None) -> None:
        """Make a group per wanted controller where ``rights`` (default: ``cgroup_rights()``)
        says one can be made; ``enforced`` and ``problems`` tell what came of it."""
        self.mem_limit = mem_limit
        wanted = {"mem_limit": mem_limit, "cpu_limit": cpu_limit, "pids_limit": pids_limit}
        if not any(wanted.values()):
            return
        rights = rights if rights is not None else cgroup_rights()
        for name, value in wanted.items():
            controller = CONTROLLERS[name]
            base = rights.bases.get(controller)
            if not value or base is None:
                continue
            path = base / self.name
            try:
                path.mkdir(exist_ok=True)
            except OSError as e:
                self.problems.append(f"cannot create {path} ({e.strerror})")
                continue
            self.dirs[controller] = path
            try:
                self._write_limit(path, controller, value)
            except OSError as e:
                self.problems.append(f"cannot set the {controller} limit in {path} ({e.strerror})")
                continue
            self.enforced[name] = True

    def _write_limit(self, path: Path, controller: str, value: Any) -> None:
        if controller == "memory":
            if self.v2:
                (path / "memory.max").write_text(str(int(value)))
                with contextlib.suppress(OSError):
                    (path / "memory.swap.max").write_text("0")
            else:
                (path / "memory.limit_in_bytes").write_text(str(int(value)))
                with contextlib.suppress(OSError):  # absent without swap accounting
                    (path / "memory.memsw.limit_in_bytes").write_text(str(int(value)))
        elif controller == "cpu":
            quota = max(1000, int(float(value) * CPU_PERIOD_US))
            if self.v2:
                (path / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            else:
                (path / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (path / "cpu.cfs_quota_us").write_text(str(quota))
        elif controller == "pids":
            (path / "pids.max").write_text(str(int(value)))

    def procs_files(self) -> list[str]:
        return [str(p / "cgroup.procs") for p in self.dirs.values()]

    def oom_kills(self) -> int:
        """How many processes the kernel killed for memory in this group (0 if unknown)."""
        path = self.dirs.get("memory")
        if path is None:
            return 0
        name = "memory.events" if self.v2 else "memory.oom_control"
        try:
            text = (path / name).read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return 0

    def remove(self, timeout: float = 5.0) -> None:
        """Kill what is left in the groups and remove them. Blocking (run it in a thread): a
        killed process leaves its group only once the kernel has reaped it, and until then
        ``rmdir`` fails with EBUSY, so this retries for up to ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        for path in self.dirs.values():
            while True:
                self._kill_members(path)
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        log.warning("Could not remove the cgroup %s: %s", path, e.strerror)
                        break
                    time.sleep(0.01)
        self.dirs.clear()

    @staticmethod
    def _kill_members(path: Path) -> None:
        """Kill whatever is still in the group (a daemonised child), so rmdir can succeed."""
        try:
            pids = (path / "cgroup.procs").read_text().split()
        except OSError:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError, ValueError):
                os.kill(int(pid), 9)


@functools.lru_cache(maxsize=1)
def _probe() -> tuple[bool, str]:
    exe = shutil.which("bwrap")
    if exe is None:
        return False, "bubblewrap is not installed (Debian: apt-get install bubblewrap)"
    # the options go through --args and include --clearenv, as every launch's do (bubblewrap >= 0.5)
    options = ["--unshare-all", "--die-with-parent", "--ro-bind", "/usr", "/usr",
               *_usr_symlinks(), "--proc", "/proc", "--dev", "/dev", "--uid", str(SANDBOX_UID),
               "--gid", str(SANDBOX_UID), "--cap-drop", "ALL", "--clearenv"]
    fd = _args_fd(options)
    try:
        result = subprocess.run([exe, "--args", str(fd), "--", "/usr/bin/true"], capture_output=True,
                                text=True, timeout=10, env=dict(LAUNCHER_ENV), cwd=LAUNCHER_CWD,
                                pass_fds=(fd,))
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"bwrap does not run here: {e}"
    finally:
        os.close(fd)
    if result.returncode != 0:
        return False, f"bwrap cannot create namespaces here (bubblewrap >= 0.5 is needed): " \
                      f"{result.stderr.strip()[:300]}"
    return True, ""


def _args_fd(args: Sequence[str]) -> int:
    """A readable fd (memfd, else an unlinked temporary file) holding ``args`` NUL-separated,
    for ``bwrap --args FD``. The caller passes it to bwrap and closes it afterwards."""
    data = b"".join(a.encode("utf-8", "surrogateescape") + b"\x00" for a in args)
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("jupyter-acp-bwrap-args", os.MFD_CLOEXEC)
    else:  # pragma: no cover - Linux has memfd_create
        fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _usr_symlinks() -> list[str]:
    """Merged-/usr layout: /bin, /lib, ... are links into /usr (Debian since bookworm)."""
    out: list[str] = []
    for name in ("bin", "sbin", "lib", "lib64", "lib32", "libx32"):
        target = Path("/") / name
        if target.is_symlink():
            out += ["--symlink", os.readlink(target), f"/{name}"]
        elif target.is_dir():
            out += ["--ro-bind", str(target), f"/{name}"]
    return out


class BubblewrapSettings(LoggingConfigurable):
    """The admin's settings of the bubblewrap backend, ``c.BubblewrapSandbox.*`` in the Jupyter
    server's config (the per-session ``BubblewrapSandbox`` reads them from its manager's)."""

    limits_required = Bool(
        True,
        help="""Refuse to run an agent whose memory, CPU or process limit this server cannot
        enforce (it may not create cgroups: e.g. a real Unix user's server under JupyterHub's
        LocalProcessSpawner without a delegated cgroup). The bubblewrap backend is then
        unavailable, so the automatic choice falls back to docker where that works, and a
        session is refused with the reason. False: such agents run WITHOUT those limits (each
        start logs a warning and the session's ``limits.enforced`` says so).""",
    ).tag(config=True)

    _instances: ClassVar[weakref.WeakKeyDictionary[Any, BubblewrapSettings]] = weakref.WeakKeyDictionary()
    _default: ClassVar[dict[str, BubblewrapSettings]] = {}

    @classmethod
    def for_parent(cls, parent: Any) -> BubblewrapSettings:
        """The settings of ``parent`` (the session manager; None: the defaults)."""
        if parent is None:
            return cls._default.setdefault("", cls())
        settings = cls._instances.get(parent)
        if settings is None:
            settings = cls._instances[parent] = cls(parent=parent)
        return settings


# The admin writes ``c.BubblewrapSandbox.limits_required``, the backend's name everywhere else
# (``--help-all`` shows it so): traitlets names a configurable's config section after its class.
BubblewrapSettings.__name__ = "BubblewrapSandbox"


def _wanted(parent: Any) -> list[str]:
    """The limits (``mem_limit``...) a session manager ``parent`` asks of every sandbox: memory
    always (agents have defaults of their own), CPU and processes unless set to 0."""
    return [name for name in CONTROLLERS
            if name == "mem_limit" or getattr(parent, name, None) != 0]


class BubblewrapSandbox(ProcessSandbox):
    kind: ClassVar[str] = "bubblewrap"

    def __init__(self, spec: SandboxSpec, *, settings: BubblewrapSettings | None = None) -> None:
        super().__init__(spec)
        self.settings = settings or BubblewrapSettings.for_parent(None)
        self.cgroups = CgroupSet(spec.labels.get("session") or os.urandom(8).hex())
        self._oom_kills = 0

    @classmethod
    def create(cls, spec: SandboxSpec, *, parent: Any = None) -> BubblewrapSandbox:
        return cls(spec, settings=BubblewrapSettings.for_parent(parent))

    @classmethod
    def available(cls, *, parent: Any = None) -> tuple[bool, str]:
        """bwrap runs here and, unless the admin allows sandboxes without limits, this server
        may make the cgroups of the limits ``parent`` sets (both cached: cheap)."""
        ok, why = _probe()
        if not ok:
            return ok, why
        if BubblewrapSettings.for_parent(parent).limits_required:
            rights = cgroup_rights()
            missing = rights.missing(_wanted(parent))
            if missing:
                return False, limits_refusal(missing, rights.reason)
        return True, ""

    @property
    def workspace_path(self) -> str:
        return WORKSPACE

    def limits_enforced(self) -> dict[str, bool]:
        return {**self.cgroups.enforced, "disk_limit": False, "network": not self.spec.limits.network}

    async def prepare(self) -> None:
        """Make the session's cgroups; refuse (``SandboxError``) if a limit it asks for cannot
        be held and the admin requires limits, else warn that it runs without it."""
        limits = self.spec.limits
        wanted = {"mem_limit": limits.mem_limit, "cpu_limit": limits.cpu_limit,
                  "pids_limit": limits.pids_limit}
        if not any(wanted.values()):
            return
        rights = await asyncio.to_thread(cgroup_rights)
        self.cgroups.create(limits.mem_limit, limits.cpu_limit, limits.pids_limit, rights)
        missing = [name for name, value in wanted.items() if value and not self.cgroups.enforced[name]]
        if not missing:
            return
        reason = "; ".join(self.cgroups.problems) or rights.reason or "no cgroup could be made"
        if self.settings.limits_required:
            await asyncio.to_thread(self.cgroups.remove)
            raise SandboxError(limits_refusal(missing, reason))
        log.warning("Sandbox %s runs WITHOUT its %s limit(s), as the admin allows "
                    "(c.BubblewrapSandbox.limits_required = False): %s", self.cgroups.name,
                    ", ".join(LIMIT_WORDS[name] for name in missing), reason)

    def launch(self, argv: Sequence[str], *, cwd: str, env: dict[str, str]) -> HostLaunch:
        check_command(argv, env)
        if "\x00" in cwd:
            raise SandboxError("The working directory holds a NUL byte")
        options = self.options(cwd=cwd, env=env)
        fd = _args_fd(options)
        cmd = [shutil.which("bwrap") or "bwrap", "--args", str(fd), "--", *argv]
        procs = self.cgroups.procs_files()
        if procs:
            # join every cgroup, then become bwrap: the agent cannot start outside its limits
            script = ('for f in "$@"; do [ "$f" = -- ] && break; echo $$ > "$f" || exit 125; shift; done; '
                      'shift; exec "$@"')
            cmd = ["/bin/sh", "-c", script, "jupyter-acp-sandbox", *procs, "--", *cmd]
        return HostLaunch(argv=cmd, env=dict(LAUNCHER_ENV), cwd=LAUNCHER_CWD, pass_fds=(fd,))

    def options(self, *, cwd: str, env: dict[str, str]) -> list[str]:
        """bwrap's options (everything before ``--``) for a process in ``cwd`` with ``env``."""
        spec = self.spec
        cmd = ["--unshare-all"]
        if spec.limits.network:
            cmd.append("--share-net")
        cmd += ["--die-with-parent", "--new-session", "--hostname", "jupyter-acp",
                "--ro-bind", "/usr", "/usr", *_usr_symlinks()]
        cmd += ["--tmpfs", "/etc"]
        for entry in ETC_ENTRIES:
            if os.path.lexists(f"/etc/{entry}"):
                cmd += ["--ro-bind-try", f"/etc/{entry}", f"/etc/{entry}"]
        cmd += ["--remount-ro", "/etc"]
        # /tmp before the paths: a venv or agent install under /tmp must stay visible on top of it
        cmd += ["--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp"]
        for path in spec.ro_paths:
            cmd += ["--ro-bind-try", path, path]
        for path in spec.rw_paths:
            cmd += ["--bind", path, path]
        if spec.home is not None:
            cmd += ["--bind", spec.home, AGENT_HOME]
        # last, so that it wins over a read-only path that contains it
        cmd += ["--bind", str(spec.workspace), WORKSPACE, "--remount-ro", "/", "--chdir", cwd,
                "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID), "--cap-drop", "ALL"]
        # the sandboxed process's whole environment: nothing of the launcher's (bwrap sets PWD)
        cmd.append("--clearenv")
        for name, value in spec.sandboxed_env(env).items():
            cmd += ["--setenv", name, value]
        return cmd

    async def wait(self) -> int:
        status = await super().wait()
        self._oom_kills = max(self._oom_kills, self.cgroups.oom_kills())
        return status

    def exit_reason(self, status: int | None) -> str:
        self._oom_kills = max(self._oom_kills, self.cgroups.oom_kills())
        if status is not None and self._oom_kills and self.cgroups.mem_limit:
            mib = self.cgroups.mem_limit / 1024**2
            return (f"the agent ran out of memory (the sandbox limit is {mib:.0f} MiB) and was "
                    "killed; ask your admin for a larger mem_limit")
        return super().exit_reason(status)

    async def remove(self) -> None:
        self._oom_kills = max(self._oom_kills, self.cgroups.oom_kills())
        await asyncio.to_thread(self.cgroups.remove)
