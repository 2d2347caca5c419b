"""Refusing an agent's request cleanly: one short log line (rate-limited), never a traceback.

A hostile agent can send thousands of bad requests a second. Each refusal is answered with a
JSON-RPC error that names only what the agent sent (never a host path), and logged as one line;
past ``burst`` lines a minute per session, the log says how many were left out instead. An
unexpected exception in our own handler (a bug, or input we did not foresee) becomes a generic
internal error for the agent and one warning line for the admin, with the traceback at debug
level only, because the SDK would otherwise log a full traceback per request.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar

from acp.exceptions import RequestError
from pydantic import ValidationError

log = logging.getLogger("jupyter_acp.client")

T = TypeVar("T")

#: Methods of ``acp.Client`` that the agent calls (requests and notifications).
AGENT_CALLS = ("session_update", "request_permission", "read_text_file", "write_text_file",
               "create_terminal", "terminal_output", "wait_for_terminal_exit", "kill_terminal",
               "release_terminal", "ext_method", "ext_notification")
#: Those of them that are notifications: nothing is answered, so nothing may be raised.
NOTIFICATIONS = ("session_update", "ext_notification")


class RefusalLog:
    """At most ``burst`` log lines per ``window`` seconds; the rest are counted and summed up."""

    def __init__(self, label: str, *, burst: int = 10, window: float = 60.0,
                 logger: logging.Logger = log) -> None:
        self.label, self.burst, self.window, self.logger = label, burst, window, logger
        self._start = time.monotonic()
        self._lines = 0
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._start >= self.window:
            if self._suppressed:
                self.logger.warning("agent[%s]: %d more refusals were not logged in the last %.0f s",
                                    self.label, self._suppressed, now - self._start)
            self._start, self._lines, self._suppressed = now, 0, 0
        if self._lines >= self.burst:
            self._suppressed += 1
            return
        self._lines += 1
        self.logger.warning("agent[%s]: " + message, self.label, *args)


def guard_agent_calls(cls: type[T]) -> type[T]:
    """Class decorator: every agent-facing method answers unexpected failures cleanly.

    ``RequestError`` (a deliberate refusal), pydantic's ``ValidationError`` (the SDK answers it
    as invalid params) and cancellation pass through untouched.
    """
    for name in AGENT_CALLS:
        method = getattr(cls, name, None)
        if method is None or not inspect.iscoroutinefunction(method):
            continue
        setattr(cls, name, _guarded(name, method))
    return cls


def _guarded(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    async def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await method(self, *args, **kwargs)
        except (RequestError, ValidationError) as e:
            if name not in NOTIFICATIONS:
                raise
            _note(self, name, e)  # a notification has no answer: the SDK would log a traceback
        except Exception as e:
            _note(self, name, e)
            if name not in NOTIFICATIONS:
                raise RequestError.internal_error(
                    {"details": f"the server could not complete {name}"}) from None
        return None

    return wrapper


def _note(client: Any, name: str, error: BaseException) -> None:
    """One line: the call, the error's type, and where our code raised it (for a bug report)
    — no traceback, no message (it may hold a host path)."""
    refusals: RefusalLog | None = getattr(client, "refusals", None)
    if refusals is None:
        return
    frames = traceback.extract_tb(error.__traceback__)
    where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
    refusals.warning("%s failed (%s%s)", name, type(error).__name__, where)


class SdkTracebackFilter(logging.Filter):
    """Turns the ACP SDK's per-message tracebacks into one rate-limited line.

    The SDK (agent-client-protocol 0.12) validates an incoming notification's params and routes
    its method before our handlers run, and logs every failure there — a ``session/update`` of
    the wrong shape, an unknown notification method — with ``logging.exception`` on the root
    logger. Those failures are caused by the agent's input, so a hostile agent could fill the
    log with tracebacks. This filter, on the root logger, drops the traceback and keeps a line.
    """

    PREFIXES = ("Unhandled error while handling notification", "Unhandled error while handling request")

    def __init__(self) -> None:
        super().__init__()
        self.refusals = RefusalLog("sdk", burst=20)

    def filter(self, record: logging.LogRecord) -> bool:
        if not (isinstance(record.msg, str) and record.msg.startswith(self.PREFIXES)):
            return True
        error = record.exc_info[1] if record.exc_info else None
        self.refusals.warning("%r (%s: %r)", record.getMessage(), type(error).__name__,
                              str(error)[:200])
        return False


def install_sdk_filter() -> None:
    """Install ``SdkTracebackFilter`` on the root logger, once per process."""
    root = logging.getLogger()
    if not any(isinstance(f, SdkTracebackFilter) for f in root.filters):
        root.addFilter(SdkTracebackFilter())
