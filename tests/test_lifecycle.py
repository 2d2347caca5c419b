"""Lifecycle storms against a real Jupyter server: nothing is left behind, no limit is passed.

Old code: ``POST restart`` and ``DELETE`` of one session sent at once left agent processes that
no session listed and that idle culling never saw (``session.restart`` started the agent again
after the manager had dropped the session), past the user's ``max_sessions_per_user``.

Here many clients of one user send creates, restarts, deletes, prompts and cancels at once while
the idle monitor culls, for many rounds, in each sandbox backend. A thread meanwhile counts the
user's agent processes on the host (``/proc``: each agent's environment carries a mark) every
few milliseconds. The test asserts that the count never passed the limit, that no request got a
500, and at the end that nothing is left: no process, container, cgroup, gateway route or socket
directory, home directory or listed session. Another user's session stays untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require_backend, wait_for
from traitlets.config import Config

from jupyter_acp.agents_builtin import python_ro_paths
from jupyter_acp.sandbox.bubblewrap import CGROUP_ROOT
from jupyter_acp.testing import TokenPerUser, auth

pytestmark = pytest.mark.timeout(300)

LIMIT = 3
MARK = f"storm-{uuid.uuid4().hex[:12]}"
DEMO = [sys.executable, "-m", "jupyter_acp.agents_builtin.demo"]
#: (rounds, concurrent clients per round, operations per client) by backend: Docker starts slower
PLAN = {"local": (5, 4, 5), "bubblewrap": (5, 4, 5), "docker": (3, 4, 5)}


@pytest.fixture(params=["local", pytest.param("bubblewrap", marks=pytest.mark.sandbox),
                        pytest.param("docker", marks=pytest.mark.docker)])
def backend(request: pytest.FixtureRequest) -> str:
    acp_require_backend(request.param)
    return request.param


@pytest.fixture
def jp_server_config(tmp_path: Path, backend: str) -> Config:
    # (with the built-in demo agent's read-only paths: the venv and this package)
    demo = {"command": DEMO, "demo": True, "ro_paths": python_ro_paths()}
    return Config({
        "ServerApp": {"jpserver_extensions": {"jupyter_acp": True, "jupyter_server_terminals": False},
                      "identity_provider_class": TokenPerUser, "allow_unauthenticated_access": False},
        "UserSessionManager": {"sandbox": backend, "allow_unsandboxed": True,
                               "max_sessions_per_user": LIMIT, "monitor_interval": 0,
                               "workspace_template": "{root_dir}/{username}",
                               "agent_home_dir": str(tmp_path / "homes")},
        "DockerSandbox": {"image": "jupyter-acp-sandbox:test", "warm_pool_size": 0},
        "LlmGateway": {"socket_dir": str(tmp_path / "sockets"),
                       "allowed_endpoints": ["http://127.0.0.1:9/v1"]},
        "UsageLedger": {"db_url": f"sqlite:///{tmp_path / 'usage.sqlite'}"},
        "AgentConfigManager": {
            "agents": {
                # the demo agent behind a gateway route (it never calls its LLM): every session
                # has a route, a socket and a relay to clean up too
                "storm": {**demo, "env": {"STORM_MARK": MARK}, "llm_api": "openai",
                          "credential_env": {"api_key": "OPENAI_API_KEY",
                                             "base_url": "OPENAI_BASE_URL"}},
                "quiet": demo,
            },
            "credentials": {"storm": {"api_key": "sk-storm-not-a-key",
                                      "base_url": "http://127.0.0.1:9/v1"}},
        },
    })


#: Counts the storm user's agents on the host: processes running the demo agent's program (not
#: the gateway relay that launched it) with the mark in their environment. Run as a script so
#: that it can also sample, in a process of its own, while the server runs (no GIL shared).
COUNT = r"""
import os, sys
def count(needle):
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            if not any(a.endswith((b"agents_builtin.demo", b"jupyter-acp-demo-agent")) for a in argv) \
                    or any(a.endswith(b"relay.py") for a in argv):
                continue
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read().split(b"\0"):
                    found.append(int(entry.name))
        except OSError:
            continue
    return found
"""

SAMPLE = COUNT + r"""
import select, time
needle, peak, samples = sys.argv[1].encode(), 0, 0
while not select.select([sys.stdin], [], [], 0.002)[0]:
    peak, samples = max(peak, len(count(needle))), samples + 1
print(peak, samples)
"""


def marked_processes() -> list[int]:
    """Host pids of the storm user's agents (see ``COUNT``)."""
    scope: dict[str, Any] = {}
    exec(COUNT, scope)
    return scope["count"](f"STORM_MARK={MARK}".encode())


class Sampler:
    """A process that counts the storm user's agents every few milliseconds until stopped,
    and reports the highest count it saw."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", SAMPLE, f"STORM_MARK={MARK}"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.peak = self.samples = 0

    def stop(self) -> None:
        out, _ = self.proc.communicate("stop\n", timeout=30)
        self.peak, self.samples = map(int, out.split())


def docker_containers(session_ids: set[str]) -> list[str]:
    import docker

    from jupyter_acp.sandbox.docker import LABEL_SESSION

    client = docker.DockerClient(version="auto", **docker.utils.kwargs_from_env())
    try:
        found = client.api.containers(all=True, filters={"label": [LABEL_SESSION]})
    finally:
        client.close()
    return [c["Id"][:12] for c in found if c["Labels"].get(LABEL_SESSION) in session_ids]


async def test_lifecycle_storm_leaves_nothing_behind(jp_fetch: Any, jp_serverapp: Any, backend: str,
                                                     tmp_path: Path) -> None:
    manager = jp_serverapp.web_app.settings["acp_manager"]
    statuses: dict[str, dict[int, int]] = {}
    ids: set[str] = set()  # every session the storm created
    live: set[str] = set()  # those not yet seen deleted or culled

    async def call(method: str, path: str, body: Any = None, user: str = "alice",
                   timeout: float = 120) -> tuple[int, Any]:
        kwargs: dict[str, Any] = {"method": method, "headers": auth(user), "raise_error": False,
                                  "request_timeout": timeout}
        if method == "POST":
            kwargs["body"] = json.dumps(body or {})
        resp = await jp_fetch("api", "acp", *path.split("/"), **kwargs)
        op = f"{method} {path.split('/')[-1] if path.count('/') > 1 else path.split('/')[0]}"
        statuses.setdefault(op, {}).setdefault(resp.code, 0)
        statuses[op][resp.code] += 1
        assert resp.code < 500, f"{method} {path} answered {resp.code}: {resp.body[:300]!r}"
        return resp.code, json.loads(resp.body) if resp.body else None

    # bob is in a long turn all along (a turn is never culled): it must go on undisturbed
    code, quiet = await call("POST", "sessions", {"agent": "quiet"}, user="bob")
    assert code == 201
    bob_turn = asyncio.ensure_future(call("POST", f"sessions/{quiet['id']}/messages",
                                          {"message": "/sleep 600"}, user="bob", timeout=600))
    bob = manager.get_user_session("bob", quiet["id"])
    # (its /sleep has streamed both its chunks: nothing more comes until bob cancels)
    await wait_for(lambda: bob.state.value == "busy" and sum(
        1 for e in bob.events() if e["type"] == "session/update"
        and e["data"].get("sessionUpdate") == "agent_message_chunk") >= 2)
    bob_seq = bob.last_seq

    async def client(rng: random.Random, ops: int) -> None:
        for _ in range(ops):
            known = sorted(live) or sorted(ids) or ["nonexistent"]
            target = rng.choice(known)
            op = rng.choice(["create", "create", "restart", "delete", "prompt", "cancel", "cull"])
            if op == "create":
                code, data = await call("POST", "sessions", {"agent": "storm", "new": True})
                assert code in (201, 429, 409, 422), (code, data)
                if code == 201:
                    ids.add(data["id"])
                    live.add(data["id"])
            elif op == "restart":
                code, _ = await call("POST", f"sessions/{target}/restart")
                assert code in (200, 404, 409, 422), code
            elif op == "delete":
                code, _ = await call("DELETE", f"sessions/{target}")
                assert code in (204, 404), code
                live.discard(target)
            elif op == "prompt":
                text = rng.choice(["/sleep 0.2", "hello storm", "/sleep 1"])
                code, _ = await call("POST", f"sessions/{target}/messages", {"message": text})
                assert code in (200, 404, 409, 502), code
            elif op == "cancel":
                code, _ = await call("POST", f"sessions/{target}/cancel")
                assert code in (200, 202, 204, 404, 409), code
            else:  # the idle monitor's run, with a bound most sessions pass
                live.difference_update(await manager.cleanup(max_age=0.5))
            await asyncio.sleep(rng.random() * 0.05)

    rounds, clients, ops = PLAN[backend]
    sampler = Sampler()
    started = time.monotonic()
    try:
        for n in range(rounds):
            rng = random.Random(f"{backend}-{n}")
            await asyncio.gather(*(client(random.Random(rng.random()), ops) for _ in range(clients)))
        for session_id in list(ids):  # whatever is left, the user deletes
            await call("DELETE", f"sessions/{session_id}")
        elapsed = time.monotonic() - started
    finally:
        sampler.stop()
    print(f"\n{backend}: {rounds} rounds x {clients} clients x {ops} ops in {elapsed:.1f} s, "
          f"{len(ids)} sessions created, peak {sampler.peak} agent processes (limit {LIMIT}) over "
          f"{sampler.samples} samples; answers {statuses}")

    assert sampler.samples > 100
    assert ids, "the storm never created a session"
    assert sampler.peak <= LIMIT, f"{sampler.peak} agents of one user ran at once (limit {LIMIT})"
    # nothing of the storm user is left anywhere
    assert marked_processes() == []
    assert [s.id for s in manager.all_sessions() if s.user == "alice"] == []
    assert manager.sessions_held("alice") == 0
    assert set(manager.gateway.routes) & ids == set()
    assert [p.name for p in (tmp_path / "sockets").iterdir()] == []
    assert sorted(p.name for p in (tmp_path / "homes").iterdir()) == [quiet["id"]]
    assert session_cgroups(ids) == []
    if backend == "docker":
        assert docker_containers(ids) == []
    # and the other user's turn went on as if nothing happened, to its end when bob wants
    code, data = await call("GET", f"sessions/{quiet['id']}", user="bob")
    assert code == 200 and data["state"] == "busy" and data["last_seq"] == bob_seq
    assert not bob_turn.done()
    code, _ = await call("POST", f"sessions/{quiet['id']}/cancel", user="bob")
    code, turn = await bob_turn
    assert code == 200 and turn["stop_reason"] == "cancelled"
    code, turn = await call("POST", f"sessions/{quiet['id']}/messages", {"message": "still here"},
                            user="bob")
    assert code == 200 and "still here" in turn["text"]


def session_cgroups(ids: set[str]) -> list[Path]:
    """The cgroups of these sessions still on the host. (A walk of the whole tree can meet a
    directory that another test's sandbox removes meanwhile: it is walked again.)"""
    for _ in range(10):
        try:
            return [p for sid in ids for p in CGROUP_ROOT.glob(f"**/jupyter-acp/{sid}")]
        except FileNotFoundError:
            continue
    raise AssertionError("the cgroup tree kept changing under the walk")


async def test_a_deleted_session_never_comes_back(jp_fetch: Any, jp_serverapp: Any, backend: str
                                                  ) -> None:
    """The race of the issue, made certain: a restart under way when the delete arrives."""
    manager = jp_serverapp.web_app.settings["acp_manager"]
    headers = auth("alice")

    async def fetch(method: str, *path: str, body: Any = None) -> Any:
        return await jp_fetch("api", "acp", *path, method=method, headers=headers, raise_error=False,
                              request_timeout=120,
                              **({"body": json.dumps(body or {})} if method == "POST" else {}))

    for _ in range(8):
        resp = await fetch("POST", "sessions", body={"agent": "storm", "new": True})
        assert resp.code == 201, resp.body
        sid = json.loads(resp.body)["id"]
        restart = asyncio.ensure_future(fetch("POST", "sessions", sid, "restart"))
        await asyncio.sleep(random.random() * 0.05)
        delete = await fetch("DELETE", "sessions", sid)
        assert delete.code == 204
        assert (await restart).code in (200, 404)  # done before the delete, or refused as gone
        assert (await fetch("GET", "sessions", sid)).code == 404
    assert marked_processes() == []
    assert manager.sessions_held("alice") == 0


@pytest.mark.parametrize("backend", ["bubblewrap"], indirect=True)
async def test_session_files_are_private(jp_fetch: Any, jp_serverapp: Any, backend: str,
                                         tmp_path: Path) -> None:
    """What the server creates for a session is its account's only: another account on the
    host can neither read an agent's home nor knock on its LLM gateway socket."""
    manager = jp_serverapp.web_app.settings["acp_manager"]
    resp = await jp_fetch("api", "acp", "sessions", method="POST", headers=auth("alice"),
                          body=json.dumps({"agent": "storm"}))
    session = manager.get_user_session("alice", json.loads(resp.body)["id"])
    route = manager.gateway.routes[session.id]

    def mode(path: str | Path) -> str:
        return oct(os.stat(path).st_mode & 0o777)

    assert mode(tmp_path / "homes") == "0o700"
    assert mode(tmp_path / "homes" / session.id) == "0o700"
    assert mode(os.path.dirname(route.socket_path)) == "0o700"
    assert mode(route.socket_path) == "0o600"
    # and the sandbox's user still reaches the socket (what the relay does): the gateway itself
    # answers (502: this test's upstream is closed), not a refused connection
    probe = ("import socket\n"
             f"s = socket.socket(socket.AF_UNIX); s.connect({route.socket_path!r})\n"
             f"s.sendall(b'GET /v1/models HTTP/1.0\\r\\n'\n"
             f"          b'Authorization: Bearer {route.dummy_key}\\r\\n\\r\\n')\n"
             "print('gateway answered', s.recv(64).split()[1].decode())")
    script = manager.workspace_root("alice") / "probe.py"
    script.write_text(probe)
    result = await manager.send_message("alice", session.id, f"/shell {sys.executable} probe.py")
    assert "gateway answered 502" in result.text, result.text
    await manager.ledger.atokens_today("alice")  # (the ledger's file is made at its first use)
    assert mode(tmp_path / "usage.sqlite") == "0o600"


@pytest.mark.parametrize("backend", ["local"], indirect=True)
async def test_a_restart_that_loses_the_conversation_says_so(jp_fetch: Any, jp_serverapp: Any,
                                                             backend: str, tmp_path: Path) -> None:
    """Old code: a failed ``session/load`` was only logged; the user saw the old transcript while
    the agent had forgotten it. Now an event says so, once, and the session works on."""
    headers = auth("alice")

    async def api(method: str, *path: str, body: Any = None) -> Any:
        resp = await jp_fetch("api", "acp", *path, method=method, headers=headers, raise_error=False,
                              **({"body": json.dumps(body or {})} if method == "POST" else {}))
        return resp.code, json.loads(resp.body) if resp.body else None

    def lost(events: list[dict[str, Any]]) -> list[str]:
        return [e["data"]["message"] for e in events
                if e["type"] == "error" and e["data"].get("context_lost")]

    code, session = await api("POST", "sessions", body={"agent": "quiet"})
    sid = session["id"]
    assert (await api("POST", "sessions", sid, "messages", body={"message": "remember me"}))[0] == 200
    # a restart that restores the conversation says nothing of the kind
    code, _ = await api("POST", "sessions", sid, "restart")
    code, history = await api("GET", "sessions", sid, "history")
    assert code == 200 and lost(history["events"]) == []
    # the agent's saved conversation is gone (its home is the session's): the load fails
    saved = list((tmp_path / "homes" / sid).glob(".jupyter-acp-demo/*.json"))
    assert saved
    for path in saved:
        path.unlink()
    seq = history["events"][-1]["seq"]
    code, _ = await api("POST", "sessions", sid, "restart")
    assert code == 200
    code, history = await api("GET", "sessions", sid, "history")
    messages = lost([e for e in history["events"] if e["seq"] > seq])
    assert len(messages) == 1 and "could not restore the conversation" in messages[0], messages
    assert "starts fresh" in messages[0]
    code, turn = await api("POST", "sessions", sid, "messages", body={"message": "fresh start"})
    assert code == 200 and "fresh start" in turn["text"]


@pytest.mark.parametrize("backend", ["local"], indirect=True)
async def test_a_turn_that_fails_says_why_before_it_ends(jp_fetch: Any, backend: str) -> None:
    """Old code: the ``error`` of an agent that died mid-turn came after the turn's
    ``chat:response``, so clients that stop at the turn's end waited for it (the kernel client
    two seconds) or missed it."""
    headers = auth("alice")
    resp = await jp_fetch("api", "acp", "sessions", method="POST", headers=headers,
                          body=json.dumps({"agent": "quiet"}))
    sid = json.loads(resp.body)["id"]
    for command in ("/crash", "/fail"):
        resp = await jp_fetch("api", "acp", "sessions", sid, "messages", method="POST",
                              headers=headers, body=json.dumps({"message": command}),
                              raise_error=False)
        assert resp.code in (200, 502), resp.body
        history = json.loads((await jp_fetch("api", "acp", "sessions", sid, "history",
                                              headers=headers)).body)["events"]
        end = max(i for i, e in enumerate(history) if e["type"] == "chat:response")
        start = max(i for i, e in enumerate(history) if e["type"] == "chat:message")
        errors = [i for i, e in enumerate(history) if e["type"] == "error" and start < i]
        assert errors and all(i < end for i in errors), (command, [e["type"] for e in history])
        if command == "/crash":  # the agent is gone: bring it back for the next command
            await jp_fetch("api", "acp", "sessions", sid, "restart", method="POST", headers=headers,
                           body="{}")


@pytest.mark.parametrize("backend", ["local"], indirect=True)
async def test_a_session_waiting_for_permission_is_deleted_at_once(jp_fetch: Any, jp_serverapp: Any,
                                                                   backend: str) -> None:
    """Old code: a DELETE while the agent waited for the user's permission never answered (the
    permission wait swallowed the stop's cancellation, and the SDK then waited forever to send
    its reply)."""
    manager = jp_serverapp.web_app.settings["acp_manager"]
    headers = auth("alice")
    resp = await jp_fetch("api", "acp", "sessions", method="POST", headers=headers,
                          body=json.dumps({"agent": "quiet"}))
    sid = json.loads(resp.body)["id"]
    session = manager.get_user_session("alice", sid)
    turn = asyncio.ensure_future(jp_fetch("api", "acp", "sessions", sid, "messages", method="POST",
                                          headers=headers, raise_error=False,
                                          body=json.dumps({"message": "/write p.txt hi"})))
    await wait_for(lambda: session.pending)
    started = time.monotonic()
    resp = await jp_fetch("api", "acp", "sessions", sid, method="DELETE", headers=headers,
                          request_timeout=20)
    took = time.monotonic() - started
    print(f"\nDELETE with a permission pending: {took:.3f} s")
    assert resp.code == 204  # (before: no answer; request_timeout=20 turns that into a failure)
    assert (await asyncio.wait_for(turn, 10)).code == 409
    assert marked_processes() == [] and manager.sessions_held("alice") == 0
