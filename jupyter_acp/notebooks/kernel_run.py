"""Run code in a notebook's own kernel from the server, after the user allowed it.

jupyter_server 2.21 / jupyter_client 8: ``session_manager.list_sessions()`` maps a notebook's
contents path to its kernel; ``kernel_manager.get_kernel(kid).client()`` is an
``AsyncKernelClient`` of our own (its own shell/iopub sockets; the browser's connection is
untouched); ``execute_interactive(code, output_hook=...)`` filters iopub by our request's
msg_id, so the hook sees only our outputs.

The browser does *not* show outputs of another client's request, so for an open notebook
``LiveOutputs`` writes them into the cell's ycell as they come (one transaction each, with the
agent's origin): they appear live and are saved with the notebook.

A kernel is only ever found through the contents path of a notebook inside the session's
workspace (the caller builds that path), which is what keeps one user's agent away from
another user's kernels on a shared server. The agent never starts a kernel: a notebook without
a running one is refused, the user starts it. A run that takes longer than its timeout, or that
the toolbox cancels (turn cancelled, session ended), interrupts the kernel
(``kernel_manager.interrupt_kernel``): the user's kernel is left usable, not busy forever.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from jupyter_client.session import Session
from jupyter_core.utils import ensure_async
from jupyter_ydoc import YNotebook
from pycrdt import Map

MAX_OUTPUTS = 100
"""Outputs of one run kept (for the cell and for the agent); more are dropped."""
READY_TIMEOUT = 30.0
"""Seconds to wait for the kernel to answer before the run starts."""

SETTLE = 0.3
"""Seconds between the start of an abandoned request and the first interrupt: a SIGINT that
arrives while ipykernel still sets the execution up is caught by the kernel and lost."""

OUTPUT_TYPES = ("stream", "execute_result", "display_data", "error")


class KernelRunError(Exception):
    """The run could not happen (no kernel, a dead kernel); the text is for the agent."""


async def kernel_of(serverapp: Any, api_path: str) -> str | None:
    """The id of the running kernel of the notebook session at ``api_path`` (None: none)."""
    want = api_path.strip("/")
    for s in await ensure_async(serverapp.session_manager.list_sessions()):
        if str(s.get("path", "")).strip("/") == want and s.get("kernel"):
            kid = str(s["kernel"]["id"])
            if kid in serverapp.kernel_manager:
                return kid
    return None


def output_of(msg: dict[str, Any]) -> dict[str, Any] | None:
    """The nbformat output of an iopub message, or None when it is not an output."""
    kind, content = msg["header"]["msg_type"], msg["content"]
    if kind not in OUTPUT_TYPES:
        return None
    out: dict[str, Any] = {"output_type": kind, **{k: v for k, v in content.items() if k != "transient"}}
    if kind in ("execute_result", "display_data"):
        out.setdefault("metadata", {})
        out.setdefault("data", {})
    return out


class LiveOutputs:
    """Writes one run's state and outputs into a live cell (skipped once the user deletes it)."""

    def __init__(self, nb: YNotebook, cell_id: str, origin: str) -> None:
        self.nb, self.cell_id, self.origin = nb, cell_id, origin

    def _ycell(self) -> Map | None:
        for c in self.nb.ycells:
            if c.get("id") == self.cell_id:
                return c
        return None

    def start(self) -> None:
        with self.nb.ydoc.transaction(origin=self.origin):
            cell = self._ycell()
            if cell is not None:
                cell["outputs"].clear()
                cell["execution_count"] = None
                cell["execution_state"] = "busy"

    def add(self, out: dict[str, Any]) -> None:
        with self.nb.ydoc.transaction(origin=self.origin):
            cell = self._ycell()
            if cell is not None:
                cell["outputs"].append(self.nb._create_youtputs([out])[0])

    def finish(self, execution_count: int | None) -> None:
        with self.nb.ydoc.transaction(origin=self.origin):
            cell = self._ycell()
            if cell is not None:
                cell["execution_count"] = execution_count
                cell["execution_state"] = "idle"


class _Run:
    """One request in flight: its kernel, whether the kernel started it, whether we gave up."""

    def __init__(self, kernel_id: str) -> None:
        self.kernel_id = kernel_id
        self.started = False  # the kernel announced our execute_input: our code is what runs
        self.abandoned = False  # timed out / cancelled while still queued: stop it once it starts
        self.cancelled = False
        self.idle = False  # the kernel reported our execution over (iopub status idle)
        self.stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class KernelRuns:
    """The runs of one toolbox in flight, so that ``cancel`` can interrupt them.

    An interrupt stops whatever the kernel runs *now*. While our request still waits in the
    kernel's queue behind the user's own execution, interrupting would kill the user's code, so
    a run that times out or is cancelled is *abandoned*: the agent gets its answer at once, the
    request stays subscribed in the background, and the kernel is interrupted while (and only
    while) it reports our request running, again every 2 s since a SIGINT that lands while
    the kernel sets an execution up can be lost (later outputs are dropped). After
    ``MAX_QUEUED`` seconds in the queue the subscription ends (the request may then still run).
    As with JupyterLab's Interrupt button, ipykernel aborts requests queued behind an
    interrupted one."""

    MAX_QUEUED = 3600.0

    def __init__(self, serverapp: Any) -> None:
        self.serverapp = serverapp
        self._running: dict[asyncio.Task[Any], _Run] = {}
        self._background: set[asyncio.Task[Any]] = set()

    async def interrupt(self, kernel_id: str) -> None:
        with contextlib.suppress(Exception):  # a kernel that died meanwhile: nothing to stop
            await ensure_async(self.serverapp.kernel_manager.interrupt_kernel(kernel_id))

    def _later(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _stop(self, run: _Run, task: asyncio.Task[Any]) -> None:
        """Interrupt our abandoned request once it runs, again while the kernel still reports
        it running (a SIGINT that lands while the kernel sets the execution up can be lost);
        never once it is over, since the next request may be the user's."""
        await asyncio.wait({task}, timeout=SETTLE)  # let the kernel enter the code first
        for _ in range(5):
            if run.idle or task.done():
                return
            await self.interrupt(run.kernel_id)
            await asyncio.wait({task}, timeout=2.0)

    async def cancel(self) -> None:
        """End every run of ours now (status ``cancelled``); each request is abandoned, so the
        kernel is interrupted while it runs it (see the class docstring)."""
        for run in list(self._running.values()):
            run.cancelled = True
            if not run.stop.done():
                run.stop.set_result(None)

    async def run(self, kernel_id: str, code: str, *, timeout: float,
                  on_output: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Execute ``code``; → ``{"status", "execution_count", "outputs"}``.

        ``status`` is the kernel's (``ok``/``error``/``aborted``), or ``timeout`` / ``cancelled``
        (the kernel was interrupted, or our queued request abandoned; the outputs so far are
        kept)."""
        try:
            km = self.serverapp.kernel_manager.get_kernel(kernel_id)
        except KeyError:
            raise KernelRunError("the notebook's kernel is gone; start it again in JupyterLab") from None
        # A session of our own: ``km.client()`` would reuse the manager's session, whose id is
        # also the shell socket's zmq identity, so two such clients (two runs, or another
        # server-side client) share one identity and the kernel's replies go to the wrong one
        # (seen: the other client's execute_reply never arrived).
        session = Session(key=km.session.key, signature_scheme=km.session.signature_scheme,
                          username="jupyter-acp")
        client = km.client(session=session)
        outputs: list[dict[str, Any]] = []
        run = _Run(kernel_id)

        def hook(msg: dict[str, Any]) -> None:
            kind = msg["header"]["msg_type"]
            if kind == "execute_input":
                run.started = True
                if run.abandoned:
                    self._later(self._stop(run, task))
            elif kind == "status" and msg["content"].get("execution_state") == "idle" and run.started:
                run.idle = True
            if run.abandoned:
                return
            out = output_of(msg)
            if out is None or len(outputs) >= MAX_OUTPUTS:
                return
            outputs.append(out)
            if on_output is not None:
                on_output(out)

        async def execute() -> dict[str, Any]:
            await client.wait_for_ready(timeout=READY_TIMEOUT)
            reply: dict[str, Any] = await client.execute_interactive(
                code, output_hook=hook, timeout=None, allow_stdin=False, store_history=True)
            return reply

        async def drain(task: asyncio.Task[Any]) -> None:
            """An abandoned queued request: wait (bounded) until it started and was stopped."""
            try:
                await asyncio.wait({task}, timeout=self.MAX_QUEUED)
            finally:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                client.stop_channels()

        client.start_channels()
        task = asyncio.ensure_future(execute())
        self._running[task] = run
        status, count, handed_over = "ok", None, False
        try:
            waits: set[asyncio.Future[Any]] = {task, run.stop}
            done, _ = await asyncio.wait(waits, timeout=timeout,
                                         return_when=asyncio.FIRST_COMPLETED)
            if task not in done:
                status = "cancelled" if run.cancelled else "timeout"
            else:
                try:
                    reply = task.result()
                except (RuntimeError, TimeoutError):  # wait_for_ready: the kernel died or hangs
                    raise KernelRunError("the notebook's kernel does not answer; restart it in "
                                         "JupyterLab") from None
                else:
                    status = str(reply["content"].get("status", "ok"))
                    count = reply["content"].get("execution_count")
        finally:
            self._running.pop(task, None)
            if not task.done():  # timed out, cancelled, or we were cancelled ourselves
                run.abandoned = True
                handed_over = True
                if run.started:
                    self._later(self._stop(run, task))
                self._later(drain(task))
            if not handed_over:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                client.stop_channels()
        return {"status": status, "execution_count": count, "outputs": outputs}
