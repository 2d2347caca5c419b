"""Shared fixtures. Ours are prefixed ``acp_``; pytest-jupyter's start with ``jp_``."""

from __future__ import annotations

import asyncio
import fcntl
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Generator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_llm import FakeLLM

from jupyter_acp.gateway import LlmGateway
from jupyter_acp.manager import UserSessionManager
from jupyter_acp.session import AgentSession
from jupyter_acp.usage import UsageLedger

pytest_plugins = ("pytest_jupyter.jupyter_server",)


def acp_require(switch: str, ok: bool, reason: str) -> None:
    """Skip when a part is missing, or fail when the CI switch ``switch`` (=1) says it must be there.

    ``.ci/run`` sets JUPYTER_ACP_REQUIRE_SANDBOX / _DOCKER / _BROWSER so that nothing that should
    have run in CI is silently skipped.
    """
    assert switch.startswith("JUPYTER_ACP_REQUIRE_"), f"not a CI switch: {switch!r}"
    if ok:
        return
    if os.environ.get(switch) == "1":
        pytest.fail(f"{reason} (required because {switch}=1)", pytrace=False)
    pytest.skip(reason)


def acp_require_backend(kind: str) -> None:
    """Skip (or fail, under the CI switches) when the sandbox backend ``kind`` cannot run here."""
    if kind == "bubblewrap":
        from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox

        ok, why = BubblewrapSandbox.available()
        acp_require("JUPYTER_ACP_REQUIRE_SANDBOX", ok, f"bubblewrap cannot run here: {why}")
    elif kind == "docker":
        from test_docker_sandbox import require_docker

        require_docker()


#: The lock file that keeps heavy tests from browser tests, made by the xdist controller.
LOCK = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):  # (the controller, or a run without xdist)
        fd, path = tempfile.mkstemp(prefix="jupyter-acp-tests-", suffix=".lock")
        os.close(fd)
        config.stash[LOCK] = path


def pytest_unconfigure(config: pytest.Config) -> None:
    if not hasattr(config, "workerinput"):
        Path(config.stash[LOCK]).unlink(missing_ok=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """(xdist) Every worker gets the controller's lock file."""
    node.workerinput["acp_lock"] = node.config.stash[LOCK]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item,
                            nextitem: pytest.Item | None) -> Generator[None, object, object]:
    """A test marked ``heavy`` never runs beside a ``browser`` test in another xdist worker.

    The heavy tests start dozens of agents at once in the ``local`` sandbox, each in a session of
    its own (``start_new_session``), and Linux's autogroup scheduler gives every session an equal
    share of the CPU: 100 agents starting left a JupyterLab starting beside them ~1/50 of it (its
    start took 34 s instead of 1 s, and a page's 60 s waits ran out in CI). ``nice`` does not help
    across sessions. So heavy tests take an exclusive lock, browser tests a shared one, on a file
    the workers of one run share; the wait is outside pytest-timeout's clock (this wrapper runs
    first).
    """
    path = getattr(item.config, "workerinput", {}).get("acp_lock")
    kind = (fcntl.LOCK_EX if item.get_closest_marker("heavy") else
            fcntl.LOCK_SH if item.get_closest_marker("browser") else None)
    if path is None or kind is None:
        return (yield)
    with open(path, "a") as lock:
        fcntl.flock(lock, kind)
        try:
            return (yield)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture
def jp_asyncio_loop(_function_scoped_runner: Any) -> asyncio.AbstractEventLoop:
    """pytest-jupyter's server runs on pytest-asyncio's loop, the one async tests run on.

    (pytest-jupyter's own fixture makes a second loop that nothing runs while a test awaits.)
    """
    return _function_scoped_runner.get_loop()


@pytest.fixture
def jp_fetch(jp_fetch: Callable[..., Any]) -> Callable[..., Any]:
    """pytest-jupyter's ``jp_fetch`` with a 120 s request timeout instead of 20 s. ``make test``
    runs two test processes on the machine's cores, and while the other one floods a server
    with agents, starting one agent here can take longer than 20 s: a slow answer is not a
    wrong one. A request that never ends still fails the test (pytest-timeout)."""
    def fetch(*parts: str, **kwargs: Any) -> Any:
        kwargs.setdefault("request_timeout", 120)
        return jp_fetch(*parts, **kwargs)

    return fetch


@pytest.fixture
def fake() -> Iterator[FakeLLM]:
    """The local fake LLM endpoint (``fake_llm.py``: OpenAI, Gemini, Anthropic, Responses) on
    127.0.0.1, what every agent's LLM calls reach in the tests (through the gateway)."""
    with FakeLLM() as server:
        yield server


@pytest.fixture
async def gateway() -> AsyncIterator[LlmGateway]:
    """An LLM gateway of its own (routes opened by the test; closed after it)."""
    gw = LlmGateway()
    yield gw
    gw.close()


@pytest.fixture
def acp_ledger(tmp_path: Path) -> UsageLedger:
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'usage.sqlite'}")
    yield ledger
    ledger.close()


@pytest.fixture
def acp_workspace_root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    return root


@pytest.fixture
async def acp_managers(tmp_path: Path, acp_workspace_root: Path, acp_ledger: UsageLedger
                       ) -> AsyncIterator[Callable[..., UserSessionManager]]:
    """Build managers (keyword arguments are traits); every agent is stopped after the test.

    A test's own ledger (``ledger=``) is closed here again, after its manager has shut down, as
    the extension does: the shutdown writes the sessions' last state through the ledger's engine,
    which makes a new one when the test has closed the ledger already, and that engine's
    connections were left for the garbage collector (for PostgreSQL, a psycopg
    ``ResourceWarning`` in whatever test runs then: the likely source of one seen in CI)."""
    made: list[UserSessionManager] = []

    def make(**traits: Any) -> UserSessionManager:
        traits.setdefault("root_dir", str(acp_workspace_root))
        traits.setdefault("agent_home_dir", str(tmp_path / "homes"))
        traits.setdefault("monitor_interval", 0)
        traits.setdefault("sandbox", "local")
        manager = UserSessionManager(ledger=traits.pop("ledger", acp_ledger), **traits)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.shutdown()
    for manager in made:
        if manager.ledger is not acp_ledger:
            await asyncio.to_thread(manager.ledger.close)


async def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01) -> Any:
    """Poll ``predicate`` until it returns something truthy (bounded), and return that."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)


async def answer_next_permission(session: AgentSession, option_id: str | None) -> str:
    """Wait for the session's next permission request and answer it; returns the request id."""
    request_id = await wait_for(lambda: next(iter(session.pending), None))
    session.answer_permission(request_id, option_id)
    return request_id
