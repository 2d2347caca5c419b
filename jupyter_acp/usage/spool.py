"""The ledger's spool: usage records the database did not take, kept on local disk until it does.

A usage database that is down, locked or read-only must neither lose a turn's usage nor wedge
the session (issue 14, item 11). ``UsageLedger`` then appends the record here and replays it
into the database later (after its next successful write, and every ``spool_retry_interval``).

The file is JSON lines, append-only, ``fsync``'d before the turn ends: a record in the spool is
as durable as one in the database. It is the server account's only (0600, in a 0700 directory
we create): it holds every user's usage. Each record carries a unique ``record_uid``; a replay
inserts only the records whose uid the database does not hold yet, in one transaction, and
truncates the spool only after that commit — a replay that crashes halfway is simply done again,
with nothing counted twice. An ``flock`` on the file serialises servers that share it (two
servers of one account use the same Jupyter data directory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("jupyter_acp.usage")


def private_dir(path: Path) -> None:
    """Create ``path`` (0700) if missing. An existing directory keeps its mode: it may be an
    admin's (chmod'ing, say, /var/lib would break other things); ours were created 0700."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)


def _fsync_dir(path: Path) -> None:
    """Make a new directory entry durable (a file created, then the machine loses power)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class UsageSpool:
    """An append-only, owner-only file of ledger rows (dicts of ``acp_usage`` columns)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: where rows go that the database refuses for good (e.g. a value its column cannot
        #: hold): kept, never replayed, so that one bad row cannot block all the others
        self.rejected_path = path.with_name(path.name + ".rejected")

    def has_records(self) -> bool:
        """Cheap (one ``stat``): called before every ledger read and write."""
        try:
            return self.path.stat().st_size > 0
        except OSError:  # (none yet; or unreachable: then appending fails too, and says why)
            return False

    def _open(self, path: Path, flags: int) -> int:
        private_dir(path.parent)
        existed = path.exists()
        fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
        if not existed:
            _fsync_dir(path.parent)
        return fd

    def append(self, row: dict[str, Any]) -> None:
        """Add one row, durably (written and ``fsync``'d) before returning; raises ``OSError``."""
        self._append(self.path, [row])

    def reject(self, rows: list[dict[str, Any]], why: str) -> None:
        """Set rows the database refuses aside (logged too: an admin fixes and re-enters them)."""
        for row in rows:
            log.error("Usage ledger: the database refuses a spooled record (%s); it is kept in %s: %s",
                      why, self.rejected_path, json.dumps(row, sort_keys=True))
        self._append(self.rejected_path, rows)

    def _append(self, path: Path, rows: list[dict[str, Any]]) -> None:
        data = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows).encode()
        fd = self._open(path, os.O_RDWR | os.O_APPEND)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data  # a crash mid-append left a torn line: keep ours whole
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)  # (releases the lock)

    def read(self) -> list[dict[str, Any]]:
        """The rows waiting, without a lock (for reads: a row being appended is left out)."""
        try:
            with open(self.path, "rb") as f:
                return _parse(f.read(), self.path)
        except FileNotFoundError:
            return []

    @contextlib.contextmanager
    def draining(self) -> Iterator[list[dict[str, Any]]]:
        """The rows waiting, under an exclusive lock; emptied when the block ends without an
        exception (i.e. after the caller's database commit), else left as it was."""
        if not self.has_records():
            yield []
            return
        fd = self._open(self.path, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            with os.fdopen(os.dup(fd), "rb") as f:
                rows = _parse(f.read(), self.path, whole=True)
            yield rows
            os.ftruncate(fd, 0)
            os.fsync(fd)
        finally:
            os.close(fd)


def _parse(data: bytes, path: Path, *, whole: bool = False) -> list[dict[str, Any]]:
    """The rows of a spool's bytes. ``whole``: read under the lock, so a bad last line is a torn
    append (a crash), not one being written, and is reported like any damaged line."""
    rows = []
    lines = data.split(b"\n")
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("record_uid"), str):
            rows.append(row)
        elif whole or n < len(lines) - 1:  # (else the last may be one being appended right now)
            log.error("Usage ledger: skipped a damaged line %d of the spool %s: %r", n + 1, path,
                      line[:200])
    return rows
