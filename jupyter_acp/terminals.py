"""ACP terminals (``terminal/*``): the agent's commands, checked before anything starts.

A terminal request is attacker input (see the trust boundaries in ``docs/security.md``): its
command, arguments, environment, working directory and output limit are checked here, and a
request that does not fit is refused with JSON-RPC -32602 and a message that names no host path
— never an internal error with a traceback. What passes runs *inside the session's sandbox*
(``Sandbox.spawn_command``; the host-side launcher never sees the agent's environment), and:

* ``command`` is a non-empty string and ``args`` a list of strings, without NUL bytes, at most
  ``MAX_ARGS`` items and ``MAX_ARGV_BYTES`` in all;
* ``env`` names match ``[A-Za-z_][A-Za-z0-9_]*``, values hold no NUL byte, at most
  ``MAX_ENV_VARS`` variables and ``MAX_ENV_BYTES`` in all;
* ``cwd`` lies inside the workspace as the sandbox sees it (relative to it, or absolute under
  it), at most ``MAX_CWD_BYTES``;
* the output kept is ``min(outputByteLimit, limits.max_terminal_output_bytes)`` (the end of the
  output, as the protocol says), and a session holds at most ``limits.max_terminals`` terminals
  (released ones do not count);
* a sandbox that does not isolate (``local``) offers none unless the admin opted in
  (``c.UserSessionManager.allow_unsandboxed_terminals``).

Each refusal is logged in one line through the session's ``RefusalLog`` (rate-limited, see
``refusals.py``).

The session's clients see a terminal's output through ``terminal:output`` events (``OutputFeed``,
docs/api.md): the end of the kept output so far, at most ``EVENT_OUTPUT_BYTES``, and its exit
status; sent when it changed, at most once per ``OUTPUT_INTERVAL`` per terminal, and once more
when the command ends and when the agent releases it. Each is a snapshot that replaces the last
in the session's history (``history.EventHistory``), so no amount of output can push the
conversation out of it. What the agent's commands print is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from acp import schema
from acp.exceptions import RequestError

from .errors import SandboxError
from .limits import AgentInputLimits
from .refusals import RefusalLog
from .sandbox.base import ENV_NAME, signal_group
from .workspace_fs import PATH_MAX

if TYPE_CHECKING:
    from .sandbox.base import CommandProcess, Sandbox

log = logging.getLogger("jupyter_acp.terminals")

#: Arguments of one command (the command included).
MAX_ARGS = 1024
#: Bytes of the command and its arguments together (UTF-8).
MAX_ARGV_BYTES = 256 * 1024
#: Environment variables one terminal may set.
MAX_ENV_VARS = 256
#: Bytes of those variables' names and values together (UTF-8).
MAX_ENV_BYTES = 256 * 1024
#: Bytes of the working directory.
MAX_CWD_BYTES = PATH_MAX
#: Bytes read from a terminal's output at a time.
READ_CHUNK = 65536
#: Seconds between two ``terminal:output`` events of one terminal while it prints.
OUTPUT_INTERVAL = 0.25
#: Bytes of output (the end of what is kept) one ``terminal:output`` event carries: enough for
#: a tool card, small enough that the history's snapshot budget holds many terminals.
EVENT_OUTPUT_BYTES = 64 * 1024

#: Where a terminal's ``terminal:output`` data goes (the session's history).
OutputSink = Callable[[dict[str, Any]], object]


class TerminalRefused(Exception):
    """A terminal request that does not fit; ``why`` names no host path and no agent value."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


def refusal(why: str) -> RequestError:
    """The error an agent gets for a terminal request that does not fit (no host detail)."""
    return RequestError(-32602, f"Terminal refused: {why}")


def _size(text: str, what: str) -> int:
    """UTF-8 size of ``text``; a string that is not valid Unicode text (a lone surrogate from a
    JSON ``\\ud800`` escape) or holds a NUL byte is refused."""
    if "\x00" in text:
        raise TerminalRefused(f"{what} holds a NUL byte")
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        raise TerminalRefused(f"{what} is not valid UTF-8 text") from None


@dataclass(frozen=True)
class TerminalRequest:
    """A checked ``terminal/create``: what the sandbox is asked to run."""

    argv: list[str]
    env: dict[str, str]
    cwd: str
    """As the sandbox sees it (inside ``Sandbox.workspace_path``)."""
    byte_limit: int
    """Output bytes kept."""


def check_request(command: Any, args: Any, env: Any, cwd: Any, output_byte_limit: Any, *,
                  workspace: str, max_output_bytes: int) -> TerminalRequest:
    """Check a ``terminal/create`` request against the rules above, or raise ``TerminalRefused``."""
    # command and arguments
    if not isinstance(command, str) or not command:
        raise TerminalRefused("the command must be a non-empty string")
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)) or not all(isinstance(a, str) for a in args):
        raise TerminalRefused("the arguments must be a list of strings")
    argv = [command, *args]
    if len(argv) > MAX_ARGS:
        raise TerminalRefused(f"more than {MAX_ARGS} arguments")
    total = 0
    for arg in argv:
        total += _size(arg, "an argument")
        if total > MAX_ARGV_BYTES:
            raise TerminalRefused(f"the command line is longer than {MAX_ARGV_BYTES} bytes")
    # environment
    env_map: dict[str, str] = {}
    items = env or []
    if not isinstance(items, (list, tuple)):
        raise TerminalRefused("the environment must be a list of variables")
    if len(items) > MAX_ENV_VARS:
        raise TerminalRefused(f"more than {MAX_ENV_VARS} environment variables")
    total = 0
    for item in items:
        name = getattr(item, "name", None)
        value = getattr(item, "value", None)
        if not isinstance(name, str) or not isinstance(value, str):
            raise TerminalRefused("an environment variable needs a string name and value")
        if not ENV_NAME.match(name):
            raise TerminalRefused("an environment variable name must match [A-Za-z_][A-Za-z0-9_]*")
        total += _size(name, "an environment variable name") + _size(value, "an environment value")
        if total > MAX_ENV_BYTES:
            raise TerminalRefused(f"the environment is larger than {MAX_ENV_BYTES} bytes")
        env_map[name] = value
    # working directory, as the sandbox sees it
    if cwd is None:
        where = workspace
    else:
        if not isinstance(cwd, str) or not cwd:
            raise TerminalRefused("the working directory must be a non-empty string")
        if _size(cwd, "the working directory") > MAX_CWD_BYTES:
            raise TerminalRefused(f"the working directory is longer than {MAX_CWD_BYTES} bytes")
        where = posixpath.normpath(posixpath.join(workspace, cwd))
        root = posixpath.normpath(workspace)
        if where != root and not where.startswith(root.rstrip("/") + "/"):
            raise TerminalRefused("the working directory must be inside the workspace")
    # output kept
    if output_byte_limit is None:
        limit = max_output_bytes
    elif (isinstance(output_byte_limit, bool) or not isinstance(output_byte_limit, int)
          or output_byte_limit < 0):
        raise TerminalRefused("outputByteLimit must be a non-negative integer")
    else:
        limit = min(output_byte_limit, max_output_bytes)
    return TerminalRequest(argv=argv, env=env_map, cwd=where, byte_limit=limit)


class Terminal:
    """One command started by the agent through ``terminal/create``, output capped."""

    def __init__(self, proc: CommandProcess, byte_limit: int,
                 on_output: Callable[[], object] | None = None) -> None:
        self.proc = proc
        self.limit = max(0, byte_limit)
        self.output = bytearray()
        self.truncated = False
        #: bytes read in all (the output kept stops growing at the limit; this does not)
        self.received = 0
        self._on_output = on_output
        self.reader = asyncio.create_task(self._read(), name="acp-terminal-output")

    async def _read(self) -> None:
        stream = self.proc.stdout
        if stream is None:
            return
        try:
            while chunk := await stream.read(READ_CHUNK):
                self.output += chunk
                if len(self.output) > self.limit:
                    # the protocol keeps the end of the output, cut at a character boundary
                    cut = _char_boundary(self.output, len(self.output) - self.limit)
                    del self.output[:cut]
                    self.truncated = True
                self.received += len(chunk)
                if self._on_output is not None:
                    self._on_output()
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            log.debug("Terminal output ended: %s", e)

    def exit_status(self) -> schema.TerminalExitStatus | None:
        code = self.proc.returncode
        if code is None:
            return None
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"SIG{-code}"
            return schema.TerminalExitStatus(signal=name)
        return schema.TerminalExitStatus(exit_code=code)

    async def wait(self) -> schema.TerminalExitStatus:
        await self.proc.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader
        return self.exit_status() or schema.TerminalExitStatus()

    def kill(self) -> None:
        if self.proc.returncode is not None:
            return
        if isinstance(self.proc, asyncio.subprocess.Process):
            # it leads its own process group (the launcher and what it left behind)
            signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()


def _char_boundary(data: bytearray | bytes, cut: int) -> int:
    """``cut`` moved forward past UTF-8 continuation bytes: where a kept end of ``data`` starts
    without half a character."""
    while 0 < cut < len(data) and (data[cut] & 0xC0) == 0x80:
        cut += 1
    return cut


def _tail(data: bytearray | bytes, limit: int) -> tuple[str, bool]:
    """The last ``limit`` bytes of ``data`` (cut at a character boundary) as text, and whether
    anything was cut."""
    cut = _char_boundary(data, max(0, len(data) - limit))
    return bytes(data[cut:]).decode(errors="replace"), cut > 0


class OutputFeed:
    """One terminal's ``terminal:output`` events: sent when its output or exit status changed,
    at most once per ``OUTPUT_INTERVAL`` (``changed``), and at once when it ends (``send``)."""

    def __init__(self, terminal_id: str, sink: OutputSink) -> None:
        self.terminal_id = terminal_id
        self.sink = sink
        self.term: Terminal | None = None
        self._sent: tuple[int, Any] | None = None  # (bytes received, exit status) last sent
        self._last = float("-inf")  # loop time of the last event
        self._timer: asyncio.TimerHandle | None = None

    def changed(self) -> None:
        """New output: an event now, or when ``OUTPUT_INTERVAL`` has passed since the last."""
        if self._timer is None:
            loop = asyncio.get_running_loop()
            delay = max(0.0, self._last + OUTPUT_INTERVAL - loop.time())
            self._timer = loop.call_later(delay, self.send)

    def send(self) -> None:
        """An event with the output and exit status as they are now, unless already sent."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        term = self.term
        if term is None:
            return
        status = term.exit_status()
        state = (term.received, None if status is None else (status.exit_code, status.signal))
        if state == self._sent:
            return
        self._sent = state
        self._last = asyncio.get_running_loop().time()
        output, cut = _tail(term.output, EVENT_OUTPUT_BYTES)
        self.sink({"terminal_id": self.terminal_id, "output": output, "truncated": term.truncated or cut,
                   "exit_status": None if status is None else {"exit_code": status.exit_code,
                                                               "signal": status.signal}})

    async def watch(self) -> None:
        """Send the final event once the command has ended and its output is read."""
        term = self.term
        if term is None:
            return
        await term.proc.wait()
        await asyncio.wait([term.reader])
        self.send()


class Terminals:
    """The terminals of one session: created after ``check_request``, bounded in number."""

    def __init__(self, sandbox: Sandbox, limits: AgentInputLimits, refusals: RefusalLog,
                 on_output: OutputSink | None = None) -> None:
        self.sandbox = sandbox
        self.limits = limits
        self.refusals = refusals
        #: where ``terminal:output`` events go (None: nowhere)
        self.on_output = on_output
        self.live: dict[str, Terminal] = {}
        self.feeds: dict[str, OutputFeed] = {}
        self._watchers: set[asyncio.Task[None]] = set()
        self._starting = 0

    def __len__(self) -> int:
        return len(self.live)

    def __contains__(self, terminal_id: object) -> bool:
        return terminal_id in self.live

    def refuse(self, why: str) -> RequestError:
        """``refusal(why)``, logged in one line (rate-limited by the session's ``RefusalLog``)."""
        self.refusals.warning("terminal refused: %s", why)
        return refusal(why)

    async def create(self, command: Any, args: Any, env: Any, cwd: Any, output_byte_limit: Any) -> str:
        """Check the request, start it in the sandbox, and return the new terminal's id."""
        if not self.sandbox.provides_terminals:
            raise self.refuse("this session offers no terminals (its agent runs without a sandbox)")
        if self.limits.max_terminals <= 0:
            raise self.refuse("terminals are turned off on this server")
        if len(self.live) + self._starting >= self.limits.max_terminals:
            raise self.refuse(f"at most {self.limits.max_terminals} terminals at once; release one first")
        try:
            request = check_request(command, args, env, cwd, output_byte_limit,
                                    workspace=self.sandbox.workspace_path,
                                    max_output_bytes=self.limits.max_terminal_output_bytes)
        except TerminalRefused as e:
            raise self.refuse(e.why) from None
        self._starting += 1
        try:
            proc = await self.sandbox.spawn_command(request.argv, cwd=request.cwd, env=request.env)
        except (OSError, SandboxError, ValueError) as e:
            log.debug("Could not start a terminal of session %s: %s", self.refusals.label, e)
            code = getattr(e, "errno", None)
            detail = f" ({os.strerror(code)})" if isinstance(code, int) and code in errno.errorcode else ""
            raise self.refuse(f"the command could not be started in the sandbox{detail}") from None
        finally:
            self._starting -= 1
        terminal_id = f"term-{uuid.uuid4().hex[:12]}"
        if self.on_output is None:
            self.live[terminal_id] = Terminal(proc, request.byte_limit)
            return terminal_id
        feed = self.feeds[terminal_id] = OutputFeed(terminal_id, self.on_output)
        feed.term = self.live[terminal_id] = Terminal(proc, request.byte_limit, feed.changed)
        watcher = asyncio.create_task(feed.watch(), name="acp-terminal-exit")
        self._watchers.add(watcher)
        watcher.add_done_callback(self._watchers.discard)
        return terminal_id

    def get(self, terminal_id: Any) -> Terminal:
        term = self.live.get(terminal_id) if isinstance(terminal_id, str) else None
        if term is None:
            raise RequestError(-32602, "Unknown terminal", None)
        return term

    def release(self, terminal_id: Any) -> None:
        term = self.live.pop(terminal_id, None) if isinstance(terminal_id, str) else None
        if term is not None:
            term.kill()
            term.reader.cancel()
        feed = self.feeds.pop(terminal_id, None) if isinstance(terminal_id, str) else None
        if feed is not None:
            feed.send()  # (its watcher sends the exit status once the killed command is gone)

    def close(self) -> None:
        """Kill every terminal the agent left running."""
        for terminal_id in list(self.live):
            self.release(terminal_id)
