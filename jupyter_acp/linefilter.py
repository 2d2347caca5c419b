"""A guard between an agent's stdout and the ACP SDK.

The SDK's reader (agent-client-protocol 0.12) trusts its peer too much for a multi-user server:
a line holding a JSON array or string makes its receive loop raise and drop the connection, every
non-JSON line is logged with a full traceback, and a line without a newline is accumulated
without bound. Agents do print junk (debug output on stdout, banners), so the server puts this
filter in between. It forwards only JSON-RPC objects of shapes the SDK survives, drops the rest
with a debug log, and drops lines longer than ``limit`` bytes, reporting each drop through
``on_drop`` so the session can show it. A well-behaved agent's lines pass untouched, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

log = logging.getLogger("jupyter_acp.linefilter")


def filtered_reader(
    source: asyncio.StreamReader,
    *,
    limit: int,
    on_drop: Callable[[str, int], None] | None = None,
    label: str = "",
) -> tuple[asyncio.StreamReader, asyncio.Task[None]]:
    """A reader for the SDK, fed from ``source`` by a task (returned, to cancel it on teardown)."""
    sink = asyncio.StreamReader(limit=limit)

    async def pump() -> None:
        try:
            while True:
                try:
                    line = await source.readline()
                except ValueError:  # over the limit: asyncio dropped the buffered part
                    await _skip_rest_of_line(source, limit)
                    _drop(f"a message larger than {limit // 1024**2} MiB", limit)
                    continue
                if not line:
                    break
                stripped = line.strip()
                if stripped.startswith(b"{") and stripped.endswith(b"}") and _is_jsonrpc(stripped):
                    sink.feed_data(line)
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


def _is_jsonrpc(line: bytes) -> bool:
    """A JSON object of the shapes the SDK's receive loop survives: an ``id`` that is a string,
    an integer or null, a string ``method``, object-or-array ``params`` of a request, an object
    ``error``. (It indexes and hashes these blindly: ``"id": [1]`` ends the connection.)"""
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):
        return False
    if not isinstance(message, dict):
        return False
    msg_id = message.get("id")
    if msg_id is not None and (isinstance(msg_id, bool) or not isinstance(msg_id, (str, int))):
        return False
    if "method" in message:
        return isinstance(message["method"], str) and isinstance(message.get("params", {}), dict)
    return "error" not in message or isinstance(message["error"], dict)


async def _skip_rest_of_line(source: asyncio.StreamReader, limit: int) -> None:
    """Discard input up to the end of the current (oversized) line, in bounded chunks."""
    while True:
        try:
            await source.readuntil(b"\n")
            return
        except asyncio.LimitOverrunError as e:
            await source.readexactly(e.consumed)
        except asyncio.IncompleteReadError:
            return
