"""Real agents (Qwen Code, Gemini CLI, Claude Code, Codex from npm) end to end through
UserSessionManager.

Each agent runs in a sandbox (bubblewrap: no network; Docker; and local for Qwen and Gemini)
and reaches the fake LLM (``fake_llm.py``) only through the server's LLM gateway. A session
streams a reply, writes a file in the workspace after a permission request the test answers
(Qwen and Gemini through ACP ``fs/write_text_file``; Claude and Codex write themselves, inside
the sandbox), Claude and Codex also run a command inside the sandbox (it dumps its environment
into the workspace: no real key there), and the ledger must equal what the fake LLM billed —
request by request, cached and reasoning tokens included. The executables come from
``scripts/agents`` (``make agents``); without them these tests skip, or fail when
``JUPYTER_ACP_REQUIRE_AGENTS=1`` (CI). Session-ready time and RSS are printed (``pytest -s``)
for the record, never asserted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import acp_require, acp_require_backend
from fake_llm import TOOL_DONE_REPLY, FakeLLM

from jupyter_acp.client import AcpClient
from jupyter_acp.errors import AuthenticationRequired
from jupyter_acp.session import SessionState

pytestmark = pytest.mark.agent
REPO = Path(__file__).resolve().parent.parent
REAL_KEY = "sk-real-key-kept-by-the-server"


def agents_bin() -> str | None:
    """Where ``scripts/agents`` put the executables (or $JUPYTER_ACP_AGENTS_DIR's)."""
    prefix = os.environ.get("JUPYTER_ACP_AGENTS_DIR") or str(REPO / ".cache" / "agents")
    path = os.path.join(prefix, "node_modules", ".bin")
    return path if os.path.isdir(path) else None


#: The executable of each agent, where it differs from the agent's name.
EXECUTABLES = {"claude": "claude-agent-acp", "codex": "codex-acp"}


def require_agent(name: str) -> str:
    """The bin directory holding agent ``name``'s executable (skip or, in CI, fail without)."""
    directory = agents_bin()
    found = shutil.which(EXECUTABLES.get(name, name), path=directory) if directory else None
    acp_require("JUPYTER_ACP_REQUIRE_AGENTS", found is not None,
                f"{name!r} is not installed; run scripts/agents (make agents)")
    assert directory is not None
    return directory


@pytest.fixture(params=[pytest.param("bubblewrap", marks=pytest.mark.sandbox), "local",
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return request.param


@pytest.fixture
def fs_writes(monkeypatch):
    """Every ACP fs/write_text_file the agents send (a spy: the real method still runs)."""
    calls: list[tuple[str, str]] = []
    original = AcpClient.write_text_file

    async def spy(self, session_id, path, content, **kwargs):
        calls.append((path, content))
        return await original(self, session_id, path, content, **kwargs)

    monkeypatch.setattr(AcpClient, "write_text_file", spy)
    return calls


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def agent_pid(sandbox) -> int:
    """The host pid of the sandbox's first process (a container's init for docker)."""
    if sandbox.kind != "docker":
        return sandbox.process.pid
    import docker

    client = docker.DockerClient(version="auto", **docker.utils.kwargs_from_env())
    try:
        return client.api.inspect_container(sandbox.container_id)["State"]["Pid"]
    finally:
        client.close()


async def answer_permissions(session, answered: list, stop: asyncio.Event) -> None:
    """Answer every permission request "allow once", like a user clicking it, until ``stop``."""
    while not stop.is_set():
        for request_id, pending in list(session.pending.items()):
            if request_id not in [a[0] for a in answered]:
                answered.append((request_id, pending))
                allow = next(o for o in pending.options if o.kind == "allow_once")
                session.answer_permission(request_id, allow.option_id)
        await asyncio.sleep(0.02)


def ledger_rows(ledger, session_id: str) -> list[tuple[int, ...]]:
    return sorted((r["input_tokens"], r["output_tokens"], r["thought_tokens"], r["cached_read_tokens"],
                   r["cached_write_tokens"], r["total_tokens"]) for r in ledger.turns(session_id))


def billed_rows(fake: FakeLLM) -> list[tuple[int, ...]]:
    return sorted((b["input"], b["output"], b["thought"], b["cached_read"], b["cached_write"], b["total"])
                  for b in fake.billed_requests())


async def run_agent_session(acp_managers, fake: FakeLLM, backend: str, agent: str, creds: dict,
                            fs_writes: list, mode: str | None, edit_existing: bool = False,
                            run_command: bool = False) -> None:
    """One session doing everything: a streamed reply, a file written after a permission
    request, with ``run_command`` a command run inside the sandbox, the ledger compared with
    the fake's bills request by request. Agents that use ACP ``fs/*`` (Qwen, Gemini) must have
    written through it; the others (Claude, Codex) write inside the sandbox themselves."""
    bin_dir = require_agent(agent)
    manager = acp_managers(sandbox=backend, allow_unsandboxed=True)
    manager.agents.extra_paths = [bin_dir]
    manager.agents.credentials = {agent: creds}  # the admin's defaults; the real key stays here
    if backend == "docker" and os.getuid() == 0:  # the agent's uid, as for a user's own workspace
        os.chown(manager.root_dir, 1000, 1000)   # (a root-owned one is read-only to it)
    started = time.monotonic()
    session = await manager.create_user_session("alice", agent)
    ready = time.monotonic() - started
    assert session.state is SessionState.READY and session.sandbox.kind == backend
    assert session.metered_by_gateway and REAL_KEY not in str(session.sandbox_spec.env)
    assert REAL_KEY not in str(session.sandbox_spec.argv)
    events: list[dict] = []
    session.subscribe(events.append)

    # 1. a streamed reply
    result = await manager.send_message("alice", session.id, "hello there agent")
    assert result.stop_reason == "end_turn"
    assert "Hello from the fake LLM. You said: hello there agent" in result.text
    chunks = [e for e in events if e["type"] == "session_update"
              and e["data"]["sessionUpdate"] == "agent_message_chunk" and e["data"]["content"].get("text")]
    assert len(chunks) > 1  # streamed, not one block
    rss = tree_rss(agent_pid(session.sandbox))

    # 2. a tool call that writes a file, after a permission request answered by "the user";
    #    then (run_command) a command inside the sandbox, also after a permission request
    if mode:  # the admin's policy ("ask") already put it in the mode that asks
        modes = session.stats()["modes"]
        assert modes["currentModeId"] == mode
        forbidden = {m["id"] for m in modes.get("forbiddenModes", [])}
        assert forbidden & {"yolo", "bypassPermissions", "full-access", "auto", "auto-edit", "autoEdit"
                            } and mode not in forbidden
        await session.set_mode(mode)
        assert session.stats()["modes"]["currentModeId"] == mode
    target = f"{session.sandbox.workspace_path}/hello.txt"
    if edit_existing:  # the user's file, which the agent rewrites
        (session.sandbox_spec.workspace / "hello.txt").write_text("old text\n")
    prompt = f"please write {target} containing hi from {agent}"
    if run_command:
        prompt += f", then run `env > {session.sandbox.workspace_path}/ran.txt`"
    answered: list = []
    stop = asyncio.Event()
    answering = asyncio.ensure_future(answer_permissions(session, answered, stop))
    try:
        result = await asyncio.wait_for(manager.send_message("alice", session.id, prompt), 90)
    finally:
        stop.set()
        await answering
    assert TOOL_DONE_REPLY in result.text, result.text
    assert (session.sandbox_spec.workspace / "hello.txt").read_text().strip() == f"hi from {agent}"
    if not run_command:  # Qwen and Gemini write through ACP, not behind the client's back
        assert (target, f"hi from {agent}") in fs_writes
    # Qwen announces the call (tool_call) before asking; Gemini asks first and only updates it
    updates = [e["data"] for e in events if e["type"] == "session_update"
               and e["data"]["sessionUpdate"] in ("tool_call", "tool_call_update")]
    assert answered and answered[0][1].tool_call["kind"] == "edit"
    assert updates[-1]["status"] == "completed"
    outcomes = [e["data"]["outcome"] for e in events if e["type"] == "permission_resolved"]
    assert outcomes == ["selected"] * len(answered)
    if run_command:  # it ran inside the sandbox: its home, the dummy key, never the real one
        env = (session.sandbox_spec.workspace / "ran.txt").read_text()
        assert "HOME=/home/agent" in env and REAL_KEY not in env and "jacp-" in env
        assert len(answered) == 2 and answered[1][1].tool_call["kind"] == "execute"

    # 3. the ledger holds exactly what the endpoint billed, request by request
    billed = fake.billed()
    totals = manager.ledger.session_totals(session.id)
    assert ledger_rows(manager.ledger, session.id) == billed_rows(fake)
    assert (totals["input_tokens"], totals["output_tokens"], totals["total_tokens"]) == \
        (billed["input"], billed["output"], billed["total"])
    assert billed["requests"] >= 3 and totals["turns"] == 2
    assert session.stats()["tokens"]["total_tokens"] == billed["total"]
    # only the LLM calls the fake knows (no unknown endpoint, e.g. telemetry, reached it)
    assert {r.kind for r in fake.requests} <= {"text", "tool_call", "tool_done", "count_tokens"}
    assert all(r.headers.get("authorization", "").endswith(REAL_KEY) or REAL_KEY in
               (r.headers.get("x-goog-api-key"), r.headers.get("x-api-key")) for r in fake.requests)
    print(f"\n[{agent} in {backend}] session ready {ready:.2f} s, RSS after a turn "
          f"{rss / 1024**2:.0f} MiB, {billed['requests']} LLM requests, {billed['total']} tokens "
          f"(cached {billed['cached_read']} read / {billed['cached_write']} written, "
          f"reasoning {billed['thought']})")
    await manager.delete_user_session("alice", session.id)


async def test_qwen_code(acp_managers, fake, backend, fs_writes):
    creds = {"api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "fake-model"}
    await run_agent_session(acp_managers, fake, backend, "qwen", creds, fs_writes, mode="default")


async def test_gemini_cli(acp_managers, fake, backend, fs_writes):
    creds = {"api_key": REAL_KEY, "base_url": fake.url, "model": "gemini-2.5-flash"}
    # Gemini CLI 0.61 cannot create a *new* file through ACP fs: it takes any JSON-RPC error of
    # fs/read_text_file (the SDK rejects with a plain object) for a real failure, not ENOENT.
    # So its turn edits an existing file of the user's.
    await run_agent_session(acp_managers, fake, backend, "gemini", creds, fs_writes, mode="default",
                            edit_existing=True)


@pytest.fixture(params=[pytest.param("bubblewrap", marks=pytest.mark.sandbox),
                        pytest.param("docker", marks=pytest.mark.docker)])
def isolated_backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return request.param


async def test_claude_code(acp_managers, fake, isolated_backend, fs_writes):
    creds = {"api_key": REAL_KEY, "base_url": fake.url, "model": "claude-sonnet-4-5"}
    await run_agent_session(acp_managers, fake, isolated_backend, "claude", creds, fs_writes,
                            mode="default", run_command=True)


async def test_codex(acp_managers, fake, isolated_backend, fs_writes):
    creds = {"api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "gpt-5.3-codex"}
    await run_agent_session(acp_managers, fake, isolated_backend, "codex", creds, fs_writes,
                            mode="read-only", run_command=True)


async def test_qwen_without_an_api_key_says_what_is_missing(acp_managers):
    bin_dir = require_agent("qwen")
    manager = acp_managers(sandbox="local", allow_unsandboxed=True)
    manager.agents.extra_paths = [bin_dir]
    with pytest.raises(AuthenticationRequired, match="Qwen Code needs an API key") as info:
        session = await manager.create_user_session("alice", "qwen")
        await manager.send_message("alice", session.id, "hello")
    assert "c.AgentConfigManager.credentials['qwen']" in str(info.value)


@pytest.mark.parametrize("agent", ["qwen", "gemini"])
async def test_without_the_gateway_the_agents_own_reports_are_the_record(acp_managers, fake, agent):
    """Gateway off (admin choice; the agent then holds the real key and needs the network): the
    ledger records what the agent reports over ACP, normalised — Qwen's per-request ``_meta.usage``,
    Gemini's ``_meta.quota`` on the prompt response. With the hidden LLM calls turned off in their
    settings, that equals what the endpoint billed."""
    bin_dir = require_agent(agent)
    manager = acp_managers(sandbox="local", allow_unsandboxed=True)
    manager.gateway.enabled = False
    manager.agents.extra_paths = [bin_dir]
    base = fake.url + "/v1" if agent == "qwen" else fake.url
    manager.agents.credentials = {agent: {"api_key": REAL_KEY, "base_url": base, "model": "gemini-2.5-flash"
                                          if agent == "gemini" else "fake-model"}}
    session = await manager.create_user_session("alice", agent)
    assert not session.metered_by_gateway
    result = await manager.send_message("alice", session.id, "count my tokens")
    assert "Hello from the fake LLM" in result.text
    billed = fake.billed()
    totals = manager.ledger.session_totals(session.id)
    assert result.usage.source == {"qwen": "request_meta", "gemini": "gemini_quota"}[agent]
    assert (totals["input_tokens"], totals["output_tokens"]) == (billed["input"], billed["output"])
    if agent == "qwen":  # Qwen also reports its context window once contextWindowSize is set
        assert session.stats()["context"] == {"used": billed["input"], "size": 131072}
