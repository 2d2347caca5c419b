"""Bubblewrap: Linux namespaces without a daemon (Debian package ``bubblewrap``).

The agent sees a read-only system (``/usr``, a short list of harmless ``/etc`` files, the paths
its interpreter needs), an empty ``/tmp``, its private home and — the only user data —
the workspace at ``/workspace``. It has no network (only ``lo``) unless the admin allows it, no
capabilities, its own PID namespace, and dies with the server (``--die-with-parent``).

Memory, CPU and pids limits come from a cgroup made per session (v1 hierarchies ``memory``,
``cpu``, ``pids``, or a v2 group) when the server may write the cgroup tree — usually as root.
The process joins its cgroups *before* it execs bwrap (a one-line ``sh`` wrapper writes its own
pid), so nothing the agent forks ever escapes them. Where the tree is not writable the session
still starts and ``limits_enforced()`` says which limits are not held.

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
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

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


def _cgroup_v2() -> bool:
    return (CGROUP_ROOT / "cgroup.controllers").exists()


class CgroupSet:
    """The cgroup(s) of one sandbox: created with limits, joined by the agent, removed after."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.v2 = _cgroup_v2()
        self.dirs: dict[str, Path] = {}
        self.enforced = {"mem_limit": False, "cpu_limit": False, "pids_limit": False}
        self.mem_limit: int | None = None

    def _dir(self, controller: str) -> Path:
        base = CGROUP_ROOT if self.v2 else CGROUP_ROOT / controller
        return base / "jupyter-acp" / self.name

    def create(self, mem_limit: int | None, cpu_limit: float | None, pids_limit: int | None) -> None:
        self.mem_limit = mem_limit
        wanted = {"memory": mem_limit, "cpu": cpu_limit, "pids": pids_limit}
        if self.v2:
            self._enable_v2_controllers()
        for controller, value in wanted.items():
            if not value:
                continue
            path = self._dir(controller)
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                log.warning("No %s cgroup for sandbox %s (%s): that limit is not enforced",
                            controller, self.name, e.strerror)
                continue
            self.dirs[controller] = path
            try:
                self._write_limit(path, controller, value)
            except OSError as e:
                log.warning("Could not set the %s limit of sandbox %s: %s", controller, self.name, e)
                continue
            name = {"memory": "mem_limit", "cpu": "cpu_limit", "pids": "pids_limit"}[controller]
            self.enforced[name] = True

    def _enable_v2_controllers(self) -> None:
        parent = CGROUP_ROOT / "jupyter-acp"
        with contextlib.suppress(OSError):
            parent.mkdir(exist_ok=True)
            for ctl in ("memory", "cpu", "pids"):
                for level in (CGROUP_ROOT, parent):
                    with contextlib.suppress(OSError):
                        (level / "cgroup.subtree_control").write_text(f"+{ctl}")

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


class BubblewrapSandbox(ProcessSandbox):
    kind: ClassVar[str] = "bubblewrap"

    def __init__(self, spec: SandboxSpec) -> None:
        super().__init__(spec)
        self.cgroups = CgroupSet(spec.labels.get("session") or os.urandom(8).hex())
        self._oom_kills = 0

    @classmethod
    def available(cls, *, parent: Any = None) -> tuple[bool, str]:
        return _probe()

    @property
    def workspace_path(self) -> str:
        return WORKSPACE

    def limits_enforced(self) -> dict[str, bool]:
        return {**self.cgroups.enforced, "disk_limit": False, "network": not self.spec.limits.network}

    async def prepare(self) -> None:
        limits = self.spec.limits
        self.cgroups.create(limits.mem_limit, limits.cpu_limit, limits.pids_limit)

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
