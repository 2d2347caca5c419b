"""The agent's stdio as asyncio streams, from Docker's attach/exec streams.

``acp.connect_to_agent`` needs an ``asyncio.StreamWriter`` for stdin and a ``StreamReader`` for
stdout. Docker hands out one raw bidirectional stream per attach or exec, with stdout and
stderr multiplexed in frames (``demultiplex``). The engine module opens that stream straight on
asyncio for unix and plain tcp engines; for other transports (TLS, ssh, npipe) the SDK's
blocking socket is joined to asyncio by ``Bridge`` (a socket pair and two threads).
``BoundedReader`` carries backpressure back into the container: a flood of output waits in the
container's pipe, not in the server's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ...linefilter import ReaduntilSeparator

FRAME_HEADER = 8


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
            header = await raw.readexactly(FRAME_HEADER)
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


class Bridge:
    """Joins a blocking socket-like object (TLS, ssh, npipe) to asyncio via a socket pair.

    ``outer`` is the end asyncio opens; two daemon threads copy bytes between ``inner`` and the
    engine's socket, and pass a half-close on (EOF on the agent's stdin)."""

    def __init__(self, hijacked: Any) -> None:
        self.hijacked = hijacked  # keeps the SDK's response (and so the connection) alive
        # the SDK's SocketIO wraps the real socket; use it directly when it is there
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
