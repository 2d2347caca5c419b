"""The agent's ``fs/read_text_file`` and ``fs/write_text_file``, served so that they cannot be raced.

The server answers these requests with its own account, outside the sandbox, so every path the
agent sends is attacker input, and so is everything the agent can change in its workspace while
we look at it (it can swap a directory for a symlink between our check and our use, in a loop).
Nothing here therefore checks a path and then opens it by name: each request is resolved and
opened in one walk from a directory descriptor of the workspace root.

Resolution
    The agent's path is split into components up front (refused: a non-string, NUL, more than
    ``PATH_MAX`` bytes, a component of more than ``NAME_MAX`` bytes, ``..``, an absolute path not
    under the agent's root). The walk then opens one component at a time with
    ``openat(dir_fd, name, O_PATH | O_NOFOLLOW)``, holding a descriptor for every directory
    it has entered, and ``fstat``s what it got: a directory is entered, a symlink is read from the
    descriptor itself (``readlinkat(fd, "")``), anything else may only be the last component.
    Nothing is ever resolved by name from the host's ``/``.

Symlink policy
    A symlink is followed only while it stays inside the workspace, component by component
    relative to the held descriptors, exactly as the agent would see it inside its sandbox:

    * a relative target continues from the link's directory; ``..`` steps back to the held
      parent descriptor and may never climb above the workspace root (refused);
    * an absolute target is read in the agent's view: it must start with the agent's root
      (``/workspace`` in bubblewrap and Docker, the workspace's path for the local backend) or
      with the workspace's host path (a link the user made on the host), and the rest is walked
      from the root descriptor. Any other absolute target (``/etc/passwd``, or a host path that
      the server, but not the agent, would reach) is refused;
    * at most 40 symlinks per request (``ELOOP`` like the kernel); more is refused.

    ``openat2(RESOLVE_BENEATH)`` is not used: it refuses every absolute link, and
    ``RESOLVE_IN_ROOT`` reads ``/workspace/x`` as ``<root>/workspace/x``, so neither gives the
    agent's view; the walk does, and it is what runs on every kernel.

Reads
    Only a regular file is read: the final ``O_PATH`` descriptor is ``fstat``-ed first, so a
    FIFO, socket or device is refused without ever being opened for reading; the regular file is
    then reopened through ``/proc/self/fd`` (the same inode, no name lookup) with
    ``O_RDONLY | O_NONBLOCK | O_NOCTTY | O_CLOEXEC`` and checked again. At most
    ``max_file_bytes + 1`` bytes are read whatever ``st_size`` says, and a larger file is refused.
    ``line``/``limit`` count ``\\n``-terminated lines (1-based) and are sliced without splitting
    the whole text into a list.

Writes
    Missing parent directories are created with ``mkdirat`` during the same walk (a parent
    that is a symlink is followed under the policy above, never by name). The content goes to a
    temporary file made ``O_CREAT | O_EXCL | O_NOFOLLOW`` in the target's directory descriptor,
    which then replaces the target with ``renameat`` in that same directory. So a write never
    goes *through* anything: a name the agent swaps for a symlink at the last moment is
    replaced, not followed. A final component that is a symlink at walk time is followed under
    the policy (writing to a link inside the workspace updates its target; a link leading out is
    refused). An existing file keeps its permission bits (without set-uid/gid) and, where the
    server may, its owner; a new file gets ``0666 & ~umask`` and, when the server runs as root,
    the owner of its directory (so a container user can edit it). A FIFO, socket, device or
    directory at the target is refused.

Cost
    At most ``max_concurrent_fs`` requests of a session are in flight; more are refused at once,
    not queued. Each runs in a daemon thread of its own (never the event loop's shared default
    executor, which one session could fill and which shutdown waits for), and its slot is freed
    only when the thread really ends, so a session can never hold more threads than its slots.
    A request is answered with an error after ``fs_timeout`` seconds.

Errors
    Every failure is a ``RequestError``: -32002 when the file does not exist, else -32602 with a
    short reason. Messages and data name only the path as the agent sent it (cut to 200
    characters), never a host path, and no traceback is logged. Each refusal is logged as one
    warning line through the session's ``refusals.RefusalLog``: a burst a minute, then a count.

Linux only (``O_PATH``, ``/proc/self/fd``), like the sandboxes themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import stat
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from acp.exceptions import RequestError

from .limits import AgentInputLimits
from .refusals import RefusalLog

log = logging.getLogger("jupyter_acp.workspace_fs")

T = TypeVar("T")

PATH_MAX = 4096
"""Bytes in a path, its terminating NUL included (Linux)."""
NAME_MAX = 255
"""Bytes in one path component (Linux)."""
MAX_SYMLINKS = 40
"""Symlinks followed in one request (the kernel's own limit)."""
SHOWN_PATH_CHARS = 200
"""How much of the agent's path an error message or log line repeats."""

_O_PATH = getattr(os, "O_PATH", 0)
_CLOEXEC = os.O_CLOEXEC
_NOCTTY = getattr(os, "O_NOCTTY", 0)


def _read_umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race other threads)."""
    with contextlib.suppress(OSError, ValueError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


_UMASK = _read_umask()


class Refused(Exception):
    """A request refused for ``why`` (turned into a ``RequestError`` by ``WorkspaceFS``)."""

    def __init__(self, why: str, code: int = -32602) -> None:
        super().__init__(why)
        self.why, self.code = why, code


def shown_path(path: Any) -> str:
    """The agent's path as it may appear in a message or log line (cut, never a host path)."""
    if not isinstance(path, str):
        return f"<{type(path).__name__}>"
    if len(path) > SHOWN_PATH_CHARS:
        return f"{path[:SHOWN_PATH_CHARS]}... ({len(path)} characters)"
    return path


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p not in ("", ".")]


_ERRNO_REASONS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "too many levels of symbolic links",
    errno.ENAMETOOLONG: "file name too long",
    errno.ENOSPC: "no space left on the workspace",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.ENOTEMPTY: "is a directory",
    errno.EEXIST: "already exists",
    errno.EXDEV: "crosses a file system",
    errno.EMFILE: "too many open files on the server",
    errno.ENFILE: "too many open files on the server",
}


def _os_refusal(e: OSError) -> Refused:
    if e.errno == errno.ENOENT:
        return Refused("not found", -32002)
    # never e.filename or str(e): only the reason, which names no path
    code = e.errno or 0
    return Refused(_ERRNO_REASONS.get(code, f"cannot access the file ({errno.errorcode.get(code, code)})"))


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "is a directory"
    if stat.S_ISFIFO(mode):
        return "not a regular file (a FIFO)"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device)"
    return "not a regular file"


class _Walk:
    """One resolution from the workspace root: the held directory descriptors and the link count."""

    def __init__(self, fs: WorkspaceFS) -> None:
        self.fs = fs
        try:
            root = os.open(fs.host_root, os.O_RDONLY | _O_PATH | os.O_DIRECTORY | _CLOEXEC)
        except OSError as e:
            code = -32002 if e.errno == errno.ENOENT else -32602
            raise Refused("the workspace is not available", code) from None
        self.stack = [root]
        self.links = 0

    def close(self) -> None:
        for fd in self.stack:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.stack = []

    @property
    def dir_fd(self) -> int:
        return self.stack[-1]

    def _to_root(self) -> None:
        while len(self.stack) > 1:
            os.close(self.stack.pop())

    def _follow(self, target: str, pending: deque[str]) -> None:
        """Queue the components of a link's ``target`` (read relative to the held descriptors)."""
        self.links += 1
        if self.links > MAX_SYMLINKS:
            raise Refused("too many levels of symbolic links")
        if not target:
            raise Refused("not found", -32002)
        parts = _split(target)
        if target.startswith("/"):
            rest = self.fs._beneath_root(parts)
            if rest is None:
                raise Refused("a symlink leads outside the workspace")
            self._to_root()
            parts = rest
        pending.extendleft(reversed(parts))

    def resolve(self, parts: list[str], *, create: bool) -> tuple[int, str, os.stat_result | None]:
        """Walk ``parts``; → (final object's ``O_PATH`` fd or -1, its name, its stat or None).

        The final object is held open (``O_PATH``, the caller closes it) and is never a symlink
        or a directory; ``self.dir_fd`` is then its directory. With ``create``, missing
        directories are made and a missing final component gives (-1, name, None).
        """
        pending = deque(parts)
        retries = 0
        while pending:
            name = pending.popleft()
            if name == "..":  # only from a link's target: the agent's own path may not hold '..'
                if len(self.stack) == 1:
                    raise Refused("a symlink leads outside the workspace")
                os.close(self.stack.pop())
                continue
            last = not pending
            try:
                fd = os.open(name, os.O_RDONLY | _O_PATH | os.O_NOFOLLOW | _CLOEXEC, dir_fd=self.dir_fd)
            except FileNotFoundError:
                if not create:
                    raise Refused("not found", -32002) from None
                if last:
                    return -1, name, None
                retries += 1
                if retries > MAX_SYMLINKS:
                    raise Refused("the workspace changed while it was being written") from None
                with contextlib.suppress(FileExistsError):
                    os.mkdir(name, 0o777, dir_fd=self.dir_fd)
                pending.appendleft(name)
                continue
            try:
                st = os.fstat(fd)
                target = os.readlink("", dir_fd=fd) if stat.S_ISLNK(st.st_mode) else None
            except BaseException:
                os.close(fd)
                raise
            if target is not None:  # read from the link we hold, not whatever is there now
                os.close(fd)
                self._follow(target, pending)
            elif stat.S_ISDIR(st.st_mode):
                self.stack.append(fd)
            elif last:
                return fd, name, st
            else:
                os.close(fd)
                raise Refused("not a directory")
        raise Refused("is a directory")


class WorkspaceFS:
    """Serves the agent's ``fs/*`` requests inside ``host_root``; see the module docstring."""

    def __init__(self, host_root: Path | str, agent_root: str, limits: AgentInputLimits | None = None,
                 *, label: str = "", refusals: RefusalLog | None = None, fsync: bool = False,
                 refused_writes: dict[str, str] | None = None) -> None:
        self.host_root = os.path.realpath(host_root)
        #: file name suffix (lower case) → why a write to such a file is refused (checked on the
        #: name the walk resolved, so a symlink ``x.txt`` → ``nb.ipynb`` is refused too)
        self.refused_writes = {k.lower(): v for k, v in (refused_writes or {}).items()}
        self.agent_root = agent_root
        self.limits = limits or AgentInputLimits()
        #: the session's rate-limited log of refusals (shared with its terminals), else our own
        self.refusals: RefusalLog = refusals or RefusalLog(label or "?", logger=log)
        self.fsync = fsync
        # the root as the agent names it, and as the host does (a link made by the user on the
        # host, or by a local agent); either way the rest is walked beneath the root descriptor
        # (but a request naming the host path is refused unless it is the agent's own view:
        # the agent of a sandbox must not learn where its workspace lives on the host)
        self._roots: list[list[str]] = []
        for root in (agent_root, str(host_root), self.host_root):
            if _split(root) not in self._roots:
                self._roots.append(_split(root))
        self._request_roots = [_split(agent_root)]
        if os.path.realpath(agent_root) == self.host_root:
            self._request_roots.append(_split(self.host_root))
        self._slots_lock = threading.Lock()
        self._in_flight = 0

    # -- the agent's path --------------------------------------------------------------------
    def _beneath_root(self, parts: list[str], *, request: bool = False) -> list[str] | None:
        for root in self._request_roots if request else self._roots:
            if parts[: len(root)] == root:
                return parts[len(root):]
        return None

    def components(self, path: Any) -> list[str]:
        """The components of the agent's ``path`` below the workspace root, or ``Refused``."""
        if not isinstance(path, str):
            raise Refused("the path must be a string")
        if not path:
            raise Refused("empty path")
        if "\x00" in path:
            raise Refused("the path contains a NUL character")
        try:
            encoded = os.fsencode(path)
        except UnicodeError:
            raise Refused("the path is not valid text") from None
        if len(encoded) >= PATH_MAX:
            raise Refused(f"the path is longer than {PATH_MAX - 1} bytes")
        parts = _split(path)
        if any(len(os.fsencode(p)) > NAME_MAX for p in parts):
            raise Refused(f"a path component is longer than {NAME_MAX} bytes")
        if ".." in parts:
            raise Refused("'..' is not allowed")
        if path.startswith("/"):
            rest = self._beneath_root(parts, request=True)
            if rest is None:
                raise Refused("outside the workspace")
            return rest
        return parts

    # -- errors, logging, slots ---------------------------------------------------------------
    def _error(self, path: Any, refused: Refused) -> RequestError:
        shown = shown_path(path)
        self._log_refusal(shown, refused.why)
        if refused.code == -32002:
            return RequestError(-32002, f"Resource not found: {shown}", {"uri": shown, "path": shown})
        return RequestError(-32602, f"Access denied: {refused.why}", {"path": shown, "reason": refused.why})

    def _log_refusal(self, shown: str, why: str) -> None:
        self.refusals.warning("file access to %r refused: %s", shown, why)

    def _release(self) -> None:
        with self._slots_lock:
            self._in_flight -= 1

    @property
    def in_flight(self) -> int:
        """Requests (threads) of this session still running."""
        with self._slots_lock:
            return self._in_flight

    async def _offload(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` in a daemon thread of its own, within this session's slots and timeout."""
        with self._slots_lock:
            if self._in_flight >= self.limits.max_concurrent_fs:
                raise Refused(f"too many file requests in flight (at most {self.limits.max_concurrent_fs})")
            self._in_flight += 1
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # never "never retrieved"

        def settle(ok: bool, value: Any) -> None:
            if not fut.done():
                if ok:
                    fut.set_result(value)
                else:
                    fut.set_exception(value)

        def body() -> None:
            value: T | BaseException
            try:
                ok, value = True, fn()
            except BaseException as e:  # handed to the loop, raised there
                ok, value = False, e
            finally:
                self._release()  # only once the I/O is over: a stuck thread keeps its slot
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(settle, ok, value)

        try:
            threading.Thread(target=body, name="acp-fs", daemon=True).start()
        except RuntimeError:
            self._release()
            raise Refused("the server cannot start another thread") from None
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.limits.fs_timeout)
        except TimeoutError:
            raise Refused(f"timed out after {self.limits.fs_timeout:g} s") from None

    async def _serve(self, path: Any, fn: Callable[[], T]) -> T:
        try:
            try:
                return await self._offload(fn)
            except OSError as e:
                raise _os_refusal(e) from None
            except Refused:
                raise
            except Exception as e:  # a bug of ours: one line, no traceback, nothing of the host
                log.error("Agent file access failed unexpectedly: %s", type(e).__name__)
                raise Refused(f"cannot access the file ({type(e).__name__})") from None
        except Refused as r:
            raise self._error(path, r) from None

    # -- fs/read_text_file -------------------------------------------------------------------
    async def read(self, path: Any, line: int | None = None, limit: int | None = None) -> str:
        try:
            parts = self.components(path)
            for name, value in (("line", line), ("limit", limit)):
                if value is not None and (not isinstance(value, int) or value < 0):
                    raise Refused(f"{name} must be a non-negative integer")
        except Refused as r:
            raise self._error(path, r) from None
        cap = self.limits.max_file_bytes
        return await self._serve(path, lambda: _slice(self._read_bytes(parts, cap).decode("utf-8", "replace"),
                                                       line, limit))

    async def read_bytes(self, path: Any, cap: int) -> bytes:
        """A file's bytes (at most ``cap``), for the server's own reads on behalf of the user
        (``@path`` mentions, prompt_content.py): the same walk and refusals as the agent's
        reads, so a mention reaches no further than the agent could."""
        try:
            parts = self.components(path)
        except Refused as r:
            raise self._error(path, r) from None
        return await self._serve(path, lambda: self._read_bytes(parts, cap))

    def _read_bytes(self, parts: list[str], cap: int) -> bytes:
        walk = _Walk(self)
        try:
            pfd, name, st = walk.resolve(parts, create=False)
            try:
                assert st is not None
                if not stat.S_ISREG(st.st_mode):
                    raise Refused(_kind(st.st_mode))
                if st.st_size > cap:
                    raise Refused(f"the file is larger than {cap} bytes")
                flags = os.O_RDONLY | os.O_NONBLOCK | _NOCTTY | _CLOEXEC
                try:  # the very inode the walk holds, no name involved
                    fd = os.open(f"/proc/self/fd/{pfd}", flags)
                except FileNotFoundError:  # no /proc: by name, without following, then compare
                    fd = os.open(name, flags | os.O_NOFOLLOW, dir_fd=walk.dir_fd)
            finally:
                os.close(pfd)
            try:
                now = os.fstat(fd)
                if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):
                    raise Refused("the file changed while it was being read")
                data = bytearray()
                while len(data) <= cap:
                    chunk = os.read(fd, min(cap + 1 - len(data), 1024 * 1024))
                    if not chunk:
                        break
                    data += chunk
            finally:
                os.close(fd)
        finally:
            walk.close()
        if len(data) > cap:
            raise Refused(f"the file is larger than {cap} bytes")
        return bytes(data)

    # -- fs/write_text_file ------------------------------------------------------------------
    async def write(self, path: Any, content: Any) -> None:
        cap = self.limits.max_file_bytes
        try:
            parts = self.components(path)
            if not parts:
                raise Refused("is a directory")
            if not isinstance(content, str):
                raise Refused("the content must be a string")
            if len(content) > cap:
                raise Refused(f"the content is larger than {cap} bytes")
            try:
                data = content.encode("utf-8")
            except UnicodeError:
                raise Refused("the content is not valid Unicode text") from None
            if len(data) > cap:
                raise Refused(f"the content is larger than {cap} bytes")
        except Refused as r:
            raise self._error(path, r) from None
        await self._serve(path, lambda: self._write_bytes(parts, data))

    def _write_bytes(self, parts: list[str], data: bytes) -> None:
        walk = _Walk(self)
        try:
            pfd, name, st = walk.resolve(parts, create=True)
            if pfd >= 0:
                os.close(pfd)
            for suffix, why in self.refused_writes.items():
                if name.lower().endswith(suffix):
                    raise Refused(why)
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise Refused(_kind(st.st_mode))
            self._replace(walk.dir_fd, name, st, data)
        finally:
            walk.close()

    def _replace(self, dir_fd: int, name: str, old: os.stat_result | None, data: bytes) -> None:
        """Write ``data`` to a new file in ``dir_fd`` and rename it over ``name`` (never through it)."""
        tmp = f".jupyter-acp-{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _NOCTTY | _CLOEXEC, 0o600,
                     dir_fd=dir_fd)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                if old is not None:
                    mode, owner = stat.S_IMODE(old.st_mode) & 0o1777, (old.st_uid, old.st_gid)
                else:
                    mode, owner = 0o666 & ~_UMASK, None
                    if os.geteuid() == 0:
                        d = os.fstat(dir_fd)
                        owner = (d.st_uid, d.st_gid)
                mine = os.fstat(fd)
                if owner is not None and owner != (mine.st_uid, mine.st_gid):
                    with contextlib.suppress(OSError):
                        os.fchown(fd, *owner)
                os.fchmod(fd, mode)
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            raise


def _slice(text: str, line: int | None, limit: int | None) -> str:
    """Lines ``line`` (1-based) to ``line + limit - 1`` of ``text``, without a list of all lines."""
    if line is None and limit is None:
        return text
    pos = 0
    for _ in range(max((line or 1) - 1, 0)):
        nl = text.find("\n", pos)
        if nl < 0:
            return ""
        pos = nl + 1
    if limit is None:
        return text[pos:]
    end = pos
    for _ in range(limit):
        nl = text.find("\n", end)
        if nl < 0:
            return text[pos:]
        end = nl + 1
    return text[pos:end]
