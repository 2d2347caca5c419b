"""A guard between an agent's stdout and the ACP SDK.

The SDK's reader (agent-client-protocol 0.12) trusts its peer too much for a multi-user server:
a line holding a JSON array or string makes its receive loop raise and drop the connection, every
non-JSON line is logged with a full traceback, and a line without a newline is accumulated
without bound. Agents do print junk (debug output on stdout, banners), so the server puts this
filter in between. It forwards only JSON-RPC objects of shapes the SDK survives, drops the rest
with a debug log, and drops lines longer than ``limit`` bytes, reporting each drop through
``on_drop`` so the session can show it. A well-behaved agent's lines pass untouched, in order.

It is also where a fast agent is slowed down to the server's pace. The SDK starts one task per
message it reads, and reads for as long as lines are buffered, so whatever this filter hands it
becomes tasks (each holding its message) before any of them runs. The filter therefore hands
over at most ``MAX_QUEUED_LINES`` lines (or one line past ``MAX_QUEUED_BYTES``) and then waits
until the SDK has taken them; meanwhile the agent's pipe fills and the agent waits. A long line
is assembled here from the agent's stdout in bounded pieces, so the stdout buffer itself stays
small (``sandbox.base.STDIO_LINE_LIMIT``) whatever ``limit`` is.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .shrink import cut_to_fit

if TYPE_CHECKING:
    from asyncio.streams import _ReaduntilBuffer  # (typeshed's: what StreamReader.readuntil takes)

    #: the ``separator`` of ``StreamReader.readuntil`` (3.13 also takes a tuple of them)
    if sys.version_info >= (3, 13):
        ReaduntilSeparator = _ReaduntilBuffer | tuple[_ReaduntilBuffer, ...]
    else:
        ReaduntilSeparator = _ReaduntilBuffer

log = logging.getLogger("jupyter_acp.linefilter")

#: Lines handed to the SDK and not yet read by it, at most (so, tasks it starts in one go).
MAX_QUEUED_LINES = 256
#: Bytes of such lines, at most (one larger line alone is let through).
MAX_QUEUED_BYTES = 1024 * 1024


class LineQueue(asyncio.StreamReader):
    """The SDK's end of the filter: whole lines, bounded. A ``StreamReader`` (the SDK checks)
    whose reading methods (``readuntil``, ``readline``: what the SDK's stdio transport calls)
    take whole lines from a queue; a line is passed on as the same ``bytes``, never copied
    into a buffer. ``feed_data`` is not used: lines come in through ``put``."""

    def __init__(self, max_lines: int = MAX_QUEUED_LINES, max_bytes: int = MAX_QUEUED_BYTES) -> None:
        super().__init__()
        self._lines: collections.deque[bytes] = collections.deque()
        self._bytes = 0
        self._max_lines, self._max_bytes = max_lines, max_bytes
        self._eof = False
        self._readable: asyncio.Future[None] | None = None
        self._writable: asyncio.Future[None] | None = None

    def full(self) -> bool:
        return bool(self._lines) and (len(self._lines) >= self._max_lines or self._bytes >= self._max_bytes)

    async def put(self, line: bytes) -> None:
        """Queue one line, first waiting while the queue is full."""
        while self.full():
            self._writable = asyncio.get_running_loop().create_future()
            try:
                await self._writable
            finally:
                self._writable = None
        self._lines.append(line)
        self._bytes += len(line)
        _wake(self._readable)

    def feed_eof(self) -> None:
        self._eof = True
        _wake(self._readable)

    def at_eof(self) -> bool:
        return self._eof and not self._lines

    async def readuntil(self, separator: ReaduntilSeparator = b"\n") -> bytes:
        """The next line (with its newline, if it had one); ``IncompleteReadError`` at the end.
        (Lines are queued whole: ``separator`` is always taken as the newline the SDK asks for.)"""
        while not self._lines:
            if self._eof:
                raise asyncio.IncompleteReadError(b"", None)
            self._readable = asyncio.get_running_loop().create_future()
            try:
                await self._readable
            finally:
                self._readable = None
        line = self._lines.popleft()
        self._bytes -= len(line)
        _wake(self._writable)
        return line

    async def readline(self) -> bytes:
        try:
            return await self.readuntil()
        except asyncio.IncompleteReadError as e:
            return e.partial

    async def readexactly(self, n: int) -> bytes:  # never needed: readuntil has no limit here
        raise asyncio.IncompleteReadError(b"", n)

    async def read(self, n: int = -1) -> bytes:
        raise NotImplementedError("LineQueue is read line by line")

    def feed_data(self, data: object) -> None:
        raise NotImplementedError("LineQueue is fed line by line (put)")


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


def filtered_reader(
    source: asyncio.StreamReader,
    *,
    limit: int,
    on_drop: Callable[[str, int], None] | None = None,
    label: str = "",
    update_limit: int | None = None,
) -> tuple[LineQueue, asyncio.Task[None]]:
    """A reader for the SDK, fed from ``source`` by a task (returned, to cancel it on teardown).
    Lines longer than ``limit`` bytes are dropped (and reported through ``on_drop``). A
    ``session/update`` longer than ``update_limit`` has its long strings cut here (as the
    session would cut its event, ``shrink.fit_event``): parsed once, not at full size by the SDK,
    the schema and the session's serializer in turn."""
    sink = LineQueue()

    async def pump() -> None:
        try:
            while True:
                line = await _read_line(source, limit)
                if line is None:
                    _drop(f"a message larger than {_size(limit)}", limit)
                    continue
                if not line:
                    break
                stripped = line.strip()
                is_object = stripped.startswith(b"{") and stripped.endswith(b"}")
                message = _jsonrpc(stripped) if is_object else None
                if message is not None:
                    if _smuggles(message):
                        line = _without_smuggled(message)
                    if update_limit is not None and len(line) > update_limit:
                        line = _cut_update(message, line, update_limit)
                    await sink.put(line)
                elif stripped:
                    log.debug("agent[%s] non-JSON-RPC output dropped: %r", label, stripped[:200])
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            sink.feed_eof()

    def _drop(what: str, size: int) -> None:
        log.warning("agent[%s] sent %s; it was dropped", label, what)
        if on_drop is not None:
            with contextlib.suppress(Exception):
                on_drop(what, size)

    return sink, asyncio.create_task(pump(), name=f"acp-linefilter-{label}")


def _size(n: int) -> str:
    return f"{n // 1024**2} MiB" if n >= 1024**2 and n % 1024**2 == 0 else f"{n:,} bytes"


async def _read_line(source: asyncio.StreamReader, limit: int) -> bytes | None:
    """The next line of ``source`` (``b""`` at its end; the last line may lack its newline), or
    None for a line over ``limit`` bytes, skipped to its end. A line longer than the source's own
    buffer limit is assembled from pieces, so ``source`` never buffers much more than that."""
    chunks: list[bytes] = []
    size = 0
    while True:
        try:
            part = await source.readuntil(b"\n")  # usually the whole line, at once
            ended = True
        except asyncio.IncompleteReadError as e:  # the end of the output
            part, ended = e.partial, True
        except asyncio.LimitOverrunError as e:  # longer than the source's buffer: a piece of it
            part, ended = await source.readexactly(e.consumed), False
        size += len(part)
        if size > limit:
            chunks.clear()
            if not ended:
                await _skip_rest_of_line(source)
            return None
        if ended:
            return b"".join([*chunks, part]) if chunks else part
        chunks.append(part)


async def _skip_rest_of_line(source: asyncio.StreamReader) -> None:
    """Discard input up to the end of the current (oversized) line, in bounded chunks."""
    while True:
        try:
            await source.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as e:
            await source.readexactly(e.consumed)
        except asyncio.IncompleteReadError:
            return


def _cut_update(message: dict[str, Any], line: bytes, limit: int) -> bytes:
    """A ``session/update`` line over ``limit`` bytes with its long strings cut (other lines, and
    updates that cutting strings does not shrink enough, as they are: the session copes)."""
    if message.get("method") != "session/update":
        return line
    fitted = cut_to_fit(message, len(line), limit, json.dumps)
    return line if fitted is None else fitted[1].encode() + b"\n"


def _jsonrpc(line: bytes) -> dict[str, Any] | None:
    """The message if it is a JSON object of the shapes the SDK's receive loop survives: an
    ``id`` that is a string, an integer or null, a string ``method``, object-or-array ``params``
    of a request, an object ``error``. (It indexes and hashes these blindly: ``"id": [1]`` ends
    the connection.)"""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None
    msg_id = message.get("id")
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, (str, int))):
        return None
    if "method" in message:
        ok = isinstance(message["method"], str) and isinstance(message.get("params", {}), dict)
    else:
        ok = "error" not in message or isinstance(message["error"], dict)
    return message if ok else None


#: Keyword arguments of our ``acp.Client`` handlers. The SDK merges a request's ``_meta`` into
#: those arguments *after* validating the params, so ``"_meta": {"path": "/etc/shadow"}`` would
#: replace the validated ``path`` with an unvalidated value of any type.
HANDLER_ARGUMENTS = frozenset({
    "session_id", "update", "tool_call", "options", "path", "line", "limit", "content", "command",
    "args", "env", "cwd", "output_byte_limit", "terminal_id", "method", "params"})


def _smuggles(message: dict[str, Any]) -> bool:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    return isinstance(meta, dict) and not HANDLER_ARGUMENTS.isdisjoint(meta)


def _without_smuggled(message: dict[str, Any]) -> bytes:
    """The message again, without the ``_meta`` keys that would override handler arguments."""
    meta = message["params"]["_meta"]
    message["params"]["_meta"] = {k: v for k, v in meta.items() if k not in HANDLER_ARGUMENTS}
    return json.dumps(message).encode() + b"\n"
