"""jupyter-acp under a REAL JupyterHub 6.1, end to end (tests/hub.py: the rig).

One hub for the whole module: configurable-http-proxy, DummyAuthenticator with a password,
LocalProcessSpawner with real Unix users (``acp-alice``, ``acp-bob``, ``acp-admin``), each
user's server running jupyter-acp in hub mode, and the hub-managed service ``jupyter-acp``
(``python -m jupyter_acp.hub``, as root) holding the fake LLM's "real" key, the quotas and the
ledger (PostgreSQL when the machine has it, else SQLite). Everything is reached the way a
person or a script reaches it: through the proxy (``/user/<name>/api/acp/...``,
``/services/jupyter-acp/...``) with the users' own hub tokens, a kernel started through the
server's kernels API, and Chromium logged in through the hub's login form.

The hostile-user tests run as ``acp-alice`` in HER OWN kernel (started by her server: the
process, the uid and the environment her notebooks get), or as her own process
(``runuser -u acp-alice``), and try what the issue lists; each asserts that it fails and prints
what was observed. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import open_panel
from conftest import acp_require
from fake_llm import FakeLLM
from hub import (
    ADMIN,
    AGENTS_BIN,
    GROUP,
    PASSWORD,
    REAL_KEY,
    Hub,
    as_user,
    running_hub,
    service_available,
)

from jupyter_acp.agents_builtin import python_ro_paths

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

HOSTILE = Path(__file__).parent / "agents" / "hostile.py"
ALICE, BOB = "acp-alice", "acp-bob"
ALICE_QUOTA = 150_000  # room for one real Qwen Code turn (its prompts are large), then exhausted
GROUP_QUOTA = 1_500  # bob's, from his hub group: the concurrency test runs him into it
RESERVE = 60  # tokens reserved per request in flight (c.AcpHub.request_reserve_tokens)

#: Run by the hostile agent inside its sandbox: LLM calls through the base URL and key it was
#: given (the in-server route's), ``n`` threads each calling until refused (or ``max`` calls),
#: with ``pad`` bytes of prompt (the fake bills a token per 4 bytes of request).
LLM_CALLS = r"""
import json, os, sys, threading, urllib.error, urllib.request
threads, per, pad = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
codes, bodies, lock = [], [], threading.Lock()
def one():
    for _ in range(per):
        body = {"model": os.environ.get("OPENAI_MODEL") or "m",
                "messages": [{"role": "user", "content": "hi " + "x" * pad}]}
        try:
            req = urllib.request.Request(os.environ["OPENAI_BASE_URL"] + "/chat/completions",
                                         data=json.dumps(body).encode(),
                                         headers={"Authorization": "Bearer " + os.environ["OPENAI_API_KEY"],
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                code, text = r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            code, text = e.code, e.read().decode()
        except Exception as e:  # no LLM URL or key given at all, connection refused...
            code, text = f"{type(e).__name__}: {e}"[:200], ""
        with lock:
            codes.append(code)
            bodies.append(text[:300])
        if code != 200:
            return
ts = [threading.Thread(target=one) for _ in range(threads)]
[t.start() for t in ts]
[t.join() for t in ts]
env = {k: v for k, v in os.environ.items() if k.startswith(("OPENAI", "JUPYTER", "HOME"))}
print(json.dumps({"codes": codes, "bodies": bodies[-3:], "env": env}))
"""


# -- the rig ------------------------------------------------------------------------------------
def _postgres() -> Iterator[str | None]:
    """A PostgreSQL database URL for the service's ledger, or None (SQLite) where there is none."""
    import importlib.util

    from pg import postgres_bindir, running_postgres

    if postgres_bindir() is None or importlib.util.find_spec("psycopg") is None:
        acp_require("JUPYTER_ACP_REQUIRE_POSTGRES", False, "no PostgreSQL here: the service runs on SQLite")
        yield None
        return
    with running_postgres() as server:
        url = server.create_database()
        yield harden(server, url)


def harden(server: Any, url: str) -> str:
    """tests/pg.py's cluster trusts every TCP connection from 127.0.0.1: any local Unix user
    (alice!) could connect as ``acp`` and edit the ledger. A real deployment's database asks for
    a password: give ``acp`` one, require it (scram) on TCP, reload. The URL with the password
    goes into the service's root-only config file, nowhere else."""
    import subprocess

    import psycopg

    password = secrets.token_hex(16)
    with psycopg.connect(url.replace("postgresql+psycopg", "postgresql"), autocommit=True) as conn:
        conn.execute(f"ALTER ROLE acp PASSWORD '{password}'")  # (hex: nothing to quote)
    hba = server.dir / "data" / "pg_hba.conf"
    hba.write_text("local all all trust\n"  # its socket directory is the postgres account's, 0700
                   "host all all 127.0.0.1/32 scram-sha-256\nhost all all ::1/128 scram-sha-256\n")
    subprocess.run(["runuser", "-u", "postgres", "--", str(server.bindir / "pg_ctl"), "-D",
                    str(server.dir / "data"), "reload"], check=True, capture_output=True)
    time.sleep(0.5)  # the postmaster rereads pg_hba.conf on SIGHUP
    return url.replace("acp@", f"acp:{password}@")


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Hub]:
    failed_before = request.session.testsfailed
    fake = FakeLLM().start()
    t0 = time.monotonic()
    pg_gen = _postgres()
    db_url = next(pg_gen)
    pg_seconds = time.monotonic() - t0
    tmp = tmp_path_factory.mktemp("hub")
    creds = {"api": "openai", "api_key": REAL_KEY, "base_url": fake.url + "/v1", "model": "fake-model"}
    service_config = f"""
c.AcpHub.data_dir = {str(tmp / "service" / "data")!r}
c.AcpHub.credentials = {json.dumps({"llm": creds, "qwen": creds})}
c.AcpHub.user_quotas = {json.dumps({ALICE: ALICE_QUOTA})}
c.AcpHub.group_quotas = {json.dumps({GROUP: GROUP_QUOTA})}
c.AcpHub.request_reserve_tokens = {RESERVE}
c.AcpHub.admission_timeout = 5.0
"""
    if db_url:
        service_config += f"c.AcpHub.db_url = {db_url!r}\n"
    agent = {"command": [sys.executable, str(HOSTILE)], "display_name": "Hostile agent with an LLM",
             "ro_paths": [*python_ro_paths(), str(HOSTILE.parent)], "llm_api": "openai",
             "credential_env": {"api_key": "OPENAI_API_KEY", "base_url": "OPENAI_BASE_URL",
                                "model": "OPENAI_MODEL"}}
    # the site config every server loads (like /etc/jupyter): agents, sandbox; NO key
    site_config = f"""
c.UserSessionManager.sandbox = "local"
c.UserSessionManager.allow_unsandboxed = True
c.AgentConfigManager.agents = {json.dumps({"llm": agent})}
c.AgentConfigManager.extra_paths = {json.dumps([str(AGENTS_BIN)])}
"""
    try:
        with running_hub(tmp, service_config=service_config, site_config=site_config,
                         site_files={"llm_calls.py": LLM_CALLS}, fake=fake) as rig:
            rig.db_url = db_url
            rig.startup["postgres"] = pg_seconds
            print(f"PostgreSQL for the service's ledger: {pg_seconds:.1f} s" if db_url else "ledger: SQLite")
            yield rig
            if request.session.testsfailed > failed_before:
                print(f"---- hub log (tail, {rig.log}) ----\n{rig.tail(20000)}")
    finally:
        fake.stop()
        next(pg_gen, None)


def need_service(hub: Hub) -> None:
    acp_require("JUPYTER_ACP_REQUIRE_HUB", hub.service_url is not None and service_available(),
                "the hub service (jupyter_acp.hub) is not in this tree yet")


def llm_turn(hub: Hub, user: str, sid: str, threads: int = 1, per: int = 1, pad: int = 0, *,
             server: str = "") -> dict[str, Any]:
    """One prompt to the hostile agent: run LLM_CALLS in its sandbox; the script's report."""
    cmd = f"{sys.executable} {hub.site / 'llm_calls.py'} {threads} {per} {pad}"
    r = hub.acp("POST", f"sessions/{sid}/messages", user, {"message": json.dumps({"op": "sh", "cmd": cmd})},
                server=server, timeout=300)
    assert r.status_code == 200, r.text
    report = json.loads(r.json()["text"])
    assert report.get("status") == 0, report
    return json.loads(report["output"].strip().splitlines()[-1])


def new_session(hub: Hub, user: str, agent: str = "demo", server: str = "") -> str:
    r = hub.acp("POST", "sessions", user, {"agent": agent, "new": True}, server=server, timeout=180)
    assert r.status_code == 201, r.text
    assert r.json()["state"] == "ready", r.json()
    return r.json()["id"]


def quota(hub: Hub, user: str) -> dict[str, Any]:
    r = hub.service("GET", "api/quota", user)
    assert r.status_code == 200, r.text
    return r.json()


# -- the rig itself -----------------------------------------------------------------------------
def test_servers_run_as_the_real_users(hub: Hub) -> None:
    print(f"hub fixture start-up: {hub.startup}")
    for name in (ALICE, BOB):
        out = hub.run_py(name, "import os, pwd; print(os.getuid(), pwd.getpwuid(os.getuid()).pw_name, "
                               "os.environ['JUPYTERHUB_USER'], "
                               "oct(os.stat(os.path.expanduser('~')).st_mode & 0o777))")
        uid, unix_name, hub_name, mode = out.split()
        assert (int(uid), unix_name, hub_name, mode) == (hub.users[name].uid, name, name, "0o700")


# -- sessions through the proxy -----------------------------------------------------------------
def test_demo_session_over_rest_and_websocket_through_the_proxy(hub: Hub) -> None:
    import websocket

    sid = new_session(hub, ALICE)
    r = hub.acp("POST", f"sessions/{sid}/messages", ALICE, {"message": "hello through the hub"})
    assert r.status_code == 200 and r.json()["text"].endswith("hello through the hub"), r.text
    ws = websocket.create_connection(
        hub.server_url(ALICE).replace("http://", "ws://") + f"api/acp/sessions/{sid}/ws",
        header=[f"Authorization: token {hub.users[ALICE].token}"], timeout=60)
    try:
        frames: list[dict[str, Any]] = []
        while not frames or frames[-1]["type"] != "history:end":
            frames.append(json.loads(ws.recv()))
        ws.send(json.dumps({"type": "chat:message", "message": "over the socket now"}))
        while frames[-1]["type"] != "chat:response":
            frames.append(json.loads(ws.recv()))
        assert "heard 4 words: over the socket now" in frames[-1]["data"]["text"]
    finally:
        ws.close()
    assert hub.acp("DELETE", f"sessions/{sid}", ALICE).status_code == 204
    assert hub.acp("GET", f"sessions/{sid}", ALICE).status_code == 404


def test_alice_cannot_see_bobs_session(hub: Hub) -> None:
    import websocket

    bob_sid = new_session(hub, BOB)
    # on her own server, bob's id is unknown (404, like any id)
    assert hub.acp("GET", f"sessions/{bob_sid}", ALICE).status_code == 404
    # bob's server refuses her token at the door (the hub's access:servers scope)
    for method, path in (("GET", "sessions"), ("GET", f"sessions/{bob_sid}"),
                         ("POST", f"sessions/{bob_sid}/messages")):
        r = hub.acp(method, path, ALICE, {"message": "hi"} if method == "POST" else None, owner=BOB)
        assert r.status_code == 403, (method, path, r.status_code, r.text[:200])
    with pytest.raises(websocket.WebSocketBadStatusException) as ws_refused:
        websocket.create_connection(
            hub.server_url(BOB).replace("http://", "ws://") + f"api/acp/sessions/{bob_sid}/ws",
            header=[f"Authorization: token {hub.users[ALICE].token}"], timeout=30)
    assert ws_refused.value.status_code == 403
    assert [s["id"] for s in hub.acp("GET", "sessions", BOB).json()["sessions"]] == [bob_sid]
    assert hub.acp("DELETE", f"sessions/{bob_sid}", BOB).status_code == 204


# -- %acp in a kernel behind the hub ------------------------------------------------------------
def test_acp_magics_in_a_kernel_behind_the_hub(hub: Hub) -> None:
    """notebooks/01-quickstart.ipynb, executed in a kernel alice's server starts (the kernels API
    and its channels WebSocket through the proxy, as JupyterLab does): the kernel finds its
    server from JPY_PARENT_PID and its runtime file and authenticates with the
    JUPYTERHUB_API_TOKEN the server gave it. (nbclient would start a kernel of its own, outside
    the server and the hub: not what a hub user runs.)"""
    nb = json.loads((Path(__file__).parents[1] / "notebooks" / "01-quickstart.ipynb").read_text())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"] + ["%acp stop"]
    out = hub.execute(ALICE, cells)
    for cell, result in zip(cells, out, strict=True):
        assert result["error"] is None and "Traceback" not in result["text"], (cell, result)
    text = "\n".join(r["text"] for r in out)
    assert "Demo agent (no LLM)" in text and "heard 6 words: Hello agent, what can you do?" in text, text
    assert "Hello from the quick start notebook" in text  # the file the agent wrote, read back
    assert "acp: allow" in text and "end_turn · tokens:" in text and "| total tokens |" in text, text
    assert "acp: stopped session" in out[-1]["text"], out[-1]
    written = hub.users[ALICE].home / "quickstart.txt"  # in her home, as her
    assert written.stat().st_uid == hub.users[ALICE].uid


# -- the service: a real agent turn, metered in the service -------------------------------------
def test_llm_turn_is_metered_by_the_service_and_matches_the_bill(hub: Hub) -> None:
    need_service(hub)
    before_fake, before = hub.fake.billed(), quota(hub, ALICE)["used_today"]
    sid = new_session(hub, ALICE, "llm")
    report = llm_turn(hub, ALICE, sid, threads=1, per=2)
    assert report["codes"] == [200, 200], report
    env = report["env"]
    assert REAL_KEY not in json.dumps(report)
    assert env["OPENAI_BASE_URL"].startswith("http://127.0.0.1") and env["OPENAI_API_KEY"]
    billed = hub.fake.billed()["total"] - before_fake["total"]
    assert hub.fake.billed()["requests"] - before_fake["requests"] == 2
    # the fake saw the REAL key (the service's), presented by the service, never by alice's side
    assert all(rec.headers.get("authorization") == f"Bearer {REAL_KEY}" for rec in hub.fake.requests[-2:])
    assert quota(hub, ALICE)["used_today"] - before == billed
    rows = hub.service("GET", "api/usage?by=session", ALICE).json()["rows"]
    assert sum(r["total_tokens"] for r in rows if r.get("session") == sid or sid in json.dumps(r)) == billed
    assert hub.acp("DELETE", f"sessions/{sid}", ALICE).status_code == 204


def test_qwen_code_turn_through_alices_server_and_the_service(hub: Hub) -> None:
    need_service(hub)
    qwen_ok = (AGENTS_BIN / "qwen").exists()
    acp_require("JUPYTER_ACP_REQUIRE_AGENTS", qwen_ok, "Qwen Code is not installed (scripts/agents)")
    agents = {a["name"]: a for a in hub.acp("GET", "agents", ALICE).json()["agents"]}
    assert agents["qwen"]["available"], agents["qwen"]
    before_fake, before = hub.fake.billed(), quota(hub, ALICE)["used_today"]
    sid = new_session(hub, ALICE, "qwen")
    r = hub.acp("POST", f"sessions/{sid}/messages", ALICE, {"message": "hello qwen behind the hub"},
                timeout=300)
    assert r.status_code == 200, r.text
    assert "Hello from the fake LLM" in r.json()["text"], r.json()
    billed = hub.fake.billed()
    used = quota(hub, ALICE)["used_today"] - before
    print(f"qwen turn: {billed['requests'] - before_fake['requests']} LLM requests, "
          f"{billed['total'] - before_fake['total']} tokens billed, {used} in the service's ledger")
    assert used == billed["total"] - before_fake["total"] > 0
    assert r.json()["usage"]["total_tokens"] == used
    assert hub.acp("DELETE", f"sessions/{sid}", ALICE).status_code == 204


# -- hostile alice: the real key -----------------------------------------------------------------
SCAN = r"""
import os, re, json
key = bytes.fromhex({key_hex!r})  # (the key itself never passes through her server or history)
found, denied = [], []
def scan_mem(pid):
    try:
        maps = open(f"/proc/{{pid}}/maps").read().splitlines()
        with open(f"/proc/{{pid}}/mem", "rb", 0) as mem:
            for line in maps:
                addr, perms = line.split()[:2]
                if not perms.startswith("r"):
                    continue
                lo, hi = (int(x, 16) for x in addr.split("-"))
                if hi - lo > 512 << 20:
                    continue
                try:
                    mem.seek(lo)
                    if key in mem.read(hi - lo):
                        return "FOUND"
                except (OSError, OverflowError, ValueError):
                    pass
        return "scanned"
    except OSError as e:
        return type(e).__name__
"""


def test_alice_cannot_read_the_real_key(hub: Hub) -> None:
    need_service(hub)
    service_pid = hub.service_pid()
    assert service_pid, "the service process was not found"
    cfg = str(hub.service_config)
    probe = SCAN.format(key_hex=REAL_KEY.encode().hex()) + f"""
results = {{}}
for path in [{cfg!r}, "/proc/{service_pid}/environ", "/proc/{service_pid}/cmdline",
             "/proc/{service_pid}/mem"]:
    try:
        data = open(path, "rb").read(1 << 20)
        results[path] = "FOUND" if key in data else "read, no key"
    except OSError as e:
        results[path] = type(e).__name__
results["service memory"] = scan_mem({service_pid})
# her server (her kernel's parent) and every process she can see: environment, command line, memory
server = os.getppid()
results["her server memory"] = scan_mem(server)
results["her server environ"] = "FOUND" if key in open(f"/proc/{{server}}/environ", "rb").read() else "no key"
results["kernel environ"] = "FOUND" if key.decode() in json.dumps(dict(os.environ)) else "no key"
hits = []
for pid in filter(str.isdigit, os.listdir("/proc")):
    for what in ("environ", "cmdline"):
        try:
            if key in open(f"/proc/{{pid}}/{{what}}", "rb").read():
                hits.append(f"{{pid}}/{{what}}")
        except OSError:
            pass
results["any /proc/*/environ|cmdline she can read"] = hits or "no key"
# her home (the agent homes, her config, the runtime files) and the site config directory
for top in (os.path.expanduser("~"), os.environ["JUPYTER_CONFIG_PATH"], "/tmp"):
    count, hits = 0, []
    for root, dirs, files in os.walk(top):
        for f in files:
            try:
                with open(os.path.join(root, f), "rb") as fh:
                    count += 1
                    if key in fh.read(8 << 20):
                        hits.append(os.path.join(root, f))
            except OSError:
                pass
    results["files under " + top] = ("FOUND " + str(hits)) if hits else f"{{count}} files read, no key"
homes = os.path.expanduser("~/.local/share/jupyter/runtime/acp-homes")
results["agent homes (read above)"] = sorted(os.path.relpath(os.path.join(r, f), homes)
                                              for r, _, fs in os.walk(homes) for f in fs)
print(json.dumps(results))
"""
    # LLM sessions are live meanwhile: their gateway tokens, agent homes (Qwen Code's settings
    # file with its base URL and key) and routes exist
    sids = [new_session(hub, ALICE, "llm")]
    if (AGENTS_BIN / "qwen").exists():
        sids.append(new_session(hub, ALICE, "qwen"))
    try:
        results = json.loads(hub.run_py(ALICE, probe, timeout=300))
    finally:
        for sid in sids:
            hub.acp("DELETE", f"sessions/{sid}", ALICE)
    for what, result in results.items():
        print(f"alice's kernel: {what} -> {result}")
    assert not any("FOUND" in str(v) for v in results.values()), results
    assert results[cfg] == "PermissionError"
    assert results[f"/proc/{service_pid}/environ"] == "PermissionError"
    assert results["service memory"] == "PermissionError"
    # the same as her own process outside the server (runuser): the file and the service's /proc
    res = as_user(ALICE, f"open({cfg!r}).read()")
    assert res.returncode != 0 and "PermissionError" in res.stderr, res
    res = as_user(ALICE, f"open('/proc/{service_pid}/environ').read()")
    assert res.returncode != 0 and "PermissionError" in res.stderr, res


STEAL = r"""
import os, re, json
pat = re.compile(rb"jacpg1\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{20,}")
found = set()
pid = os.getppid()  # her server
maps = open(f"/proc/{pid}/maps").read().splitlines()
with open(f"/proc/{pid}/mem", "rb", 0) as mem:
    for line in maps:
        addr, perms = line.split()[:2]
        lo, hi = (int(x, 16) for x in addr.split("-"))
        if not perms.startswith("r") or hi - lo > 512 << 20:
            continue
        try:
            mem.seek(lo)
            found.update(m.group().decode() for m in pat.finditer(mem.read(hi - lo)))
        except (OSError, OverflowError, ValueError):
            pass
print(json.dumps(sorted(found)))
"""


def _claims(token: str) -> dict[str, Any]:
    import base64

    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _forge(token: str, **changes: Any) -> str:
    import base64

    head, _, mac = token.split(".")
    payload = base64.urlsafe_b64encode(json.dumps({**_claims(token), **changes},
                                                  separators=(",", ":")).encode()).rstrip(b"=").decode()
    return f"{head}.{payload}.{mac}"


def test_alice_steals_her_gateway_token_from_her_servers_memory(hub: Hub) -> None:
    """Her server holds her sessions' gateway tokens (same uid: she can read its memory). What
    such a token is worth: her own quota while the session lives, nothing once it ended, and
    nothing with another user's name written into it."""
    need_service(hub)
    sid = new_session(hub, ALICE, "llm")
    llm_turn(hub, ALICE, sid)  # the route has used its token
    tokens = [t for t in json.loads(hub.run_py(ALICE, STEAL)) if _claims(t).get("s") == sid]
    print(f"alice's kernel found {len(tokens)} gateway token(s) of session {sid} in her server's memory")
    assert tokens, "no gateway token in her server's memory (the scan or the format changed?)"
    token = tokens[0]
    assert _claims(token)["u"] == ALICE

    def use(tok: str) -> Any:
        return hub.request("POST", f"{hub.service_url}gateway/chat/completions", None,
                           {"model": "m", "messages": [{"role": "user", "content": "stolen"}]},
                           headers={"Authorization": f"Bearer {tok}"})

    before, billed = quota(hub, ALICE)["used_today"], hub.fake.billed()["total"]
    r = use(token)
    assert r.status_code == 200, r.text
    assert quota(hub, ALICE)["used_today"] - before == hub.fake.billed()["total"] - billed > 0  # hers
    forged = use(_forge(token, u=BOB))
    print(f"alice: her token with bob's name in it -> {forged.status_code} {forged.text[:100]}")
    assert forged.status_code in (401, 403), forged.text
    assert hub.acp("DELETE", f"sessions/{sid}", ALICE).status_code == 204
    after = use(token)
    print(f"alice: the stolen token after her session ended -> {after.status_code} {after.text[:100]}")
    assert after.status_code in (401, 403), after.text


# -- hostile alice: the quota --------------------------------------------------------------------
def exhaust(hub: Hub, user: str, sid: str, server: str = "") -> dict[str, Any]:
    """Big LLM requests until the service refuses (the fake bills ~pad/4 tokens a request)."""
    left = quota(hub, user)["remaining"]
    pad = max(4000, min(80_000, left // 3 * 4))
    first = len(hub.fake.requests)
    report = llm_turn(hub, user, sid, threads=1, per=20, pad=pad, server=server)
    assert report["codes"][-1] == 429 and set(report["codes"][:-1]) <= {200}, report
    biggest = max(rec.usage["total"] for rec in hub.fake.requests[first:] if rec.usage)
    q = quota(hub, user)
    print(f"{user}: overshoot {q['used_today'] - q['limit']} tokens past {q['limit']} "
          f"(one request: up to {biggest} tokens)")
    assert q["used_today"] <= q["limit"] + biggest
    return report


def refused_turn(hub: Hub, user: str, server: str = "") -> str:
    """A new LLM session's call: what the service answers now (the body of its 429)."""
    sid = new_session(hub, user, "llm", server=server)
    try:
        report = llm_turn(hub, user, sid, server=server)
    finally:
        hub.acp("DELETE", f"sessions/{sid}", user, server=server)
    assert report["codes"] == [429], report
    return report["bodies"][-1]


def test_alice_cannot_exceed_her_quota(hub: Hub) -> None:
    need_service(hub)
    sid = new_session(hub, ALICE, "llm")
    report = exhaust(hub, ALICE, sid)
    hub.acp("DELETE", f"sessions/{sid}", ALICE)
    q = quota(hub, ALICE)
    print(f"alice exhausted her quota in {len(report['codes']) - 1} requests: {q}")
    assert q["limit"] == ALICE_QUOTA and q["remaining"] == 0
    observed: dict[str, str] = {}

    # 1. her own ~/.jupyter config: hub mode off, no local quota, the ledger elsewhere → restart
    hub.run_py(ALICE, """
import os, pathlib
d = pathlib.Path(os.path.expanduser("~/.jupyter")); d.mkdir(exist_ok=True)
(d / "jupyter_server_config.py").write_text('''
c.AcpExtension.hub_mode = "off"
c.UsageLedger.max_tokens_per_user_per_day = 0
c.UsageLedger.db_url = "sqlite:////tmp/alice-fresh-ledger.sqlite"
''')
print("written")
""")
    hub.stop_server(ALICE)
    hub.start_server(ALICE)
    sid = new_session(hub, ALICE, "llm")
    report = llm_turn(hub, ALICE, sid)
    hub.acp("DELETE", f"sessions/{sid}", ALICE)
    # without hub mode her server has no key at all: the agent's call cannot reach the LLM
    observed["own config: hub_mode off + no local quota"] = f"codes {report['codes']}"
    assert 200 not in report["codes"] and REAL_KEY not in json.dumps(report), report
    # 2. her config with hub mode on but the quota check replaced (a monkeypatch in her config)
    hub.run_py(ALICE, """
import os, pathlib
pathlib.Path(os.path.expanduser("~/.jupyter/jupyter_server_config.py")).write_text('''
import jupyter_acp.hubclient as h
for name in dir(h):
    cls = getattr(h, name)
    if isinstance(cls, type) and hasattr(cls, "acheck_quota"):
        async def _ok(self, *a, **k):
            return None
        cls.acheck_quota = _ok
''')
""")
    # 3. delete every file of hers the server or the agents keep
    hub.run_py(ALICE, "import os, shutil; [shutil.rmtree(os.path.expanduser(p), ignore_errors=True) "
                      "for p in ('~/.local/share/jupyter', '~/.jupyter-acp', '~/.cache')]; print('deleted')")
    hub.stop_server(ALICE)
    hub.start_server(ALICE)
    body = refused_turn(hub, ALICE)
    observed["own config: quota check patched out + files deleted + restart"] = f"429 {body[:120]}"
    assert "quota" in body.lower(), body
    # 4. a second, named server of hers at the same time
    hub.start_server(ALICE, "second")
    try:
        body = refused_turn(hub, ALICE, server="second")
        observed["a second named server"] = f"429 {body[:120]}"
    finally:
        hub.stop_server(ALICE, "second")
    # 5. bob's name in the body of the token request, and in the quota query
    r = hub.service("POST", "api/gateway-tokens", ALICE, {"session_id": "s1", "agent": "llm", "user": BOB})
    assert r.status_code == 201, r.text
    token = r.json()["token"]
    g = hub.request("POST", f"{hub.service_url}gateway/chat/completions", None,
                    {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
                    headers={"Authorization": f"Bearer {token}"})
    observed["bob's name in the token request; the token used directly"] = f"{g.status_code} " \
        f"{g.headers.get('x-acp-quota')} {g.text[:100]}"
    assert g.status_code == 429 and g.headers.get("x-acp-quota") == "exceeded", g.text
    assert quota(hub, ALICE)["user"] == ALICE
    r = hub.service("GET", f"api/quota?user={BOB}", ALICE)
    assert r.status_code == 200 and r.json()["user"] == ALICE, r.text  # a name in the query: ignored
    for what, result in observed.items():
        print(f"alice: {what} -> {result}")
    hub.run_py(ALICE, "import os; os.remove(os.path.expanduser('~/.jupyter/jupyter_server_config.py'))")


def test_alice_cannot_read_or_change_bobs_usage(hub: Hub) -> None:
    need_service(hub)
    r = hub.service("GET", f"api/usage?by=user&user={BOB}", ALICE)
    assert r.status_code == 403, r.text
    r = hub.service("GET", "api/usage?by=user", ALICE)
    assert r.status_code == 200 and {row.get("user") for row in r.json()["rows"]} <= {ALICE}, r.text
    for method in ("POST", "PUT", "PATCH", "DELETE"):
        r = hub.service(method, "api/usage", ALICE, {"user": BOB, "total_tokens": -100000})
        assert r.status_code in (403, 405), (method, r.status_code)
    r = hub.service("GET", f"api/usage?by=user&user={BOB}", ADMIN)
    assert r.status_code == 200, r.text
    # the database is the service's: alice's process cannot open it (SQLite) or reach it as acp (PG)
    if hub.db_url:  # she knows where it is (and the user name), not the password
        no_password = re.sub(r"acp:[^@]*@", "acp@", hub.db_url).replace("+psycopg", "")
        res = as_user(ALICE, f"import psycopg; c = psycopg.connect({no_password!r}); "
                             "c.execute('DELETE FROM acp_usage'); c.commit()")
        print(f"alice connecting to the service's PostgreSQL as 'acp' without its password: "
              f"rc={res.returncode} {res.stderr.strip().splitlines()[-1:]}")
        assert res.returncode != 0 and "password" in res.stderr, res
    else:
        res = as_user(ALICE, f"open({str(hub.tmp / 'service' / 'data' / 'usage.sqlite')!r}, 'rb').read()")
        assert res.returncode != 0 and "PermissionError" in res.stderr, res


# -- concurrency: two named servers of one user against the PostgreSQL-backed service -----------
def test_concurrent_turns_from_two_named_servers_stay_within_quota(hub: Hub) -> None:
    need_service(hub)
    servers = ("", "one")  # his default server and a named one, side by side
    hub.start_server(BOB, "one")
    sids = {name: new_session(hub, BOB, "llm", server=name) for name in servers}
    start = quota(hub, BOB)
    assert start["limit"] == GROUP_QUOTA, start  # from his hub group
    before = hub.fake.billed()
    first = len(hub.fake.requests)
    reports: dict[str, Any] = {}

    def run(name: str) -> None:
        reports[name] = llm_turn(hub, BOB, sids[name], threads=6, per=200, pad=40, server=name)

    threads = [threading.Thread(target=run, args=(name,)) for name in servers]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    end = quota(hub, BOB)
    billed = hub.fake.billed()
    per_request = [rec.usage["total"] for rec in hub.fake.requests[first:] if rec.usage]
    ok = sum(rep["codes"].count(200) for rep in reports.values())
    refused = sum(rep["codes"].count(429) for rep in reports.values())
    overshoot = end["used_today"] - GROUP_QUOTA
    print(f"bob, 2 servers (default + named) x 6 threads: {ok} requests served, {refused} refused "
          f"in {elapsed:.1f} s; "
          f"used {end['used_today']} of {GROUP_QUOTA} (overshoot {overshoot} tokens; one request is "
          f"{min(per_request)}..{max(per_request)} tokens); ledger "
          f"{'PostgreSQL' if hub.db_url else 'SQLite'}")
    assert end["used_today"] - start["used_today"] == billed["total"] - before["total"]
    assert refused >= len(servers) and ok > 0
    assert end["used_today"] <= GROUP_QUOTA + max(per_request), "more than one request over the quota"
    for name in servers:
        hub.acp("DELETE", f"sessions/{sids[name]}", BOB, server=name)
    hub.stop_server(BOB, "one")


# -- the browser: the sidebar under the hub, the admin page -------------------------------------
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]
UI_TIMEOUT = 90_000


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None  # type: ignore[assignment]
    acp_require("JUPYTER_ACP_REQUIRE_BROWSER", sync_playwright is not None,
                "playwright is not installed (pip install playwright)")
    acp_require("JUPYTER_ACP_REQUIRE_BROWSER", os.access(CHROMIUM, os.X_OK),
                f"{CHROMIUM} is missing (apt-get install chromium)")
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


def login(browser: Any, hub: Hub, user: str) -> Any:
    """A new browser context logged in through the hub's login form."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.goto(f"{hub.url}hub/login")
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("input[type=submit], button[type=submit]")
    page.wait_for_load_state()
    return page


@pytest.mark.browser
def test_sidebar_under_the_hub_in_chromium(hub: Hub, browser: Any, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page = login(browser, hub, ALICE)
    page.goto(f"{hub.url}user/{ALICE}/lab")
    panel = open_panel(page, timeout=UI_TIMEOUT)
    agent = panel.locator("select.jp-AcpPanel-agent")
    expect(agent.locator('option[value="demo"]')).to_have_count(1, timeout=UI_TIMEOUT)
    agent.select_option("demo")
    panel.get_by_role("button", name="New session").click()
    expect(panel.locator(".jp-AcpPanel-status")).to_contain_text("ready", timeout=UI_TIMEOUT)
    composer = panel.locator("textarea.jp-AcpPanel-input")
    composer.fill("hello from behind the hub")
    composer.press("Enter")
    reply = panel.locator(".jp-AcpMsg-agent").last
    expect(reply).to_contain_text("heard 5 words: hello from behind the hub", timeout=UI_TIMEOUT)
    shot = tmp_path / "hub-sidebar.png"
    page.screenshot(path=str(shot))
    print(f"screenshot: {shot}")
    for s in hub.acp("GET", "sessions", ALICE).json()["sessions"]:
        hub.acp("DELETE", f"sessions/{s['id']}", ALICE)
    page.context.close()


@pytest.mark.browser
def test_admin_page_admin_sees_the_table_non_admin_gets_403(hub: Hub, browser: Any, tmp_path: Path) -> None:
    need_service(hub)
    # some usage of the admin's own: a gateway token of hers, used directly (no quota: unlimited)
    r = hub.service("POST", "api/gateway-tokens", ADMIN, {"session_id": "admin-page", "agent": "llm"})
    assert r.status_code == 201, r.text
    g = hub.request("POST", f"{hub.service_url}gateway/chat/completions", None,
                    {"model": "m", "messages": [{"role": "user", "content": "for the admin page"}]},
                    headers={"Authorization": f"Bearer {r.json()['token']}"})
    assert g.status_code == 200, g.text
    users_with_usage = [u for u in (ADMIN, ALICE, BOB) if quota(hub, u)["used_today"] > 0]
    page = login(browser, hub, ADMIN)
    resp = page.goto(f"{hub.url}services/jupyter-acp/")
    page.wait_for_selector("table", timeout=UI_TIMEOUT)
    assert resp is not None and page.locator("h1").first.inner_text().startswith("jupyter-acp usage")
    html = page.content()
    assert "<svg" in html, "no plot on the admin page"
    for name in users_with_usage:
        assert name in html, f"the admin page does not show {name}'s usage"
    page.screenshot(path=str(tmp_path / "admin.png"))
    page.context.close()

    # alice may use the service (the hub lets her through its OAuth: access:services), but her
    # token lacks custom:acp-usage:read: the service itself answers 403
    page = login(browser, hub, ALICE)
    resp = page.goto(f"{hub.url}services/jupyter-acp/")
    page.wait_for_load_state()
    assert resp is not None and resp.status == 403 and "/services/jupyter-acp/" in resp.url, \
        (resp and (resp.status, resp.url))
    assert page.locator("h1").first.inner_text().startswith("403"), page.content()[:500]
    assert not re.search(r"<table", page.content())
    page.screenshot(path=str(tmp_path / "admin-403.png"))
    page.context.close()
    # and with her token, no cookie: 403 too
    r = hub.service("GET", "", ALICE)
    assert r.status_code in (302, 403), r.status_code
    print(f"alice's token on the admin page: {r.status_code}")
