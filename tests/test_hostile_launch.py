"""Nothing a hostile agent sends reaches a host-side process except as inert data.

The hostile agent (tests/agents/hostile.py) runs in a real sandbox and asks for ACP terminals
the way an attacker would: a library to preload into whatever starts the sandbox, a loader debug
log written to a host path, malformed names and sizes, a working directory outside its
workspace, endless output. The host-side launcher (``sh`` + ``bwrap``) must not see any of it,
every odd request must get a clean -32602 without host paths or tracebacks, a sandbox that does
not isolate (``local``) must offer no terminals unless the admin opted in, and what the agent
sees of the host (its environment, the source checkout) must be the least it needs.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from attack import make_attacker

import jupyter_acp
from jupyter_acp.sandbox.base import SYSTEM_PATH

ISOLATED = [pytest.param("bubblewrap", marks=pytest.mark.sandbox),
            pytest.param("docker", marks=pytest.mark.docker)]

EVIL_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
__attribute__((constructor)) static void evil(void) {
    char line[256];
    int fd = open("%(marker)s", O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd < 0) return;
    snprintf(line, sizeof line, "loaded in pid %%d uid %%d\n", (int)getpid(), (int)getuid());
    write(fd, line, strlen(line));
    close(fd);
}
"""


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.exc_text or "Traceback" in r.getMessage()]


def sandbox_workspace(attacker: Any) -> str:
    return attacker.session.sandbox.workspace_path


def server_only_path_entries() -> list[str]:
    """Entries of the server's PATH that an agent has no business seeing (not system dirs, not
    the agent's own interpreter directory)."""
    own = {os.path.dirname(os.path.abspath(sys.executable))}
    system = set(SYSTEM_PATH.split(":"))
    return [p for p in os.environ.get("PATH", "").split(":") if p and p not in system | own]


def checkout_root() -> Path:
    """The directory holding the ``jupyter_acp`` package (the source checkout when editable)."""
    return Path(jupyter_acp.__file__).resolve().parents[1]


def tracked_top_level() -> set[str]:
    """What the repository tracks at the top of the checkout (empty if not a git checkout)."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=checkout_root(), capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split("/", 1)[0] for line in out.splitlines() if line}


async def make(acp_managers: Any, kind: str, **traits: Any) -> Any:
    if kind == "local":
        traits.setdefault("allow_unsandboxed_terminals", True)
    return await make_attacker(acp_managers, kind, **traits)


# -- the launcher never sees the agent's environment ------------------------------------------
@pytest.mark.parametrize("kind", ISOLATED)
async def test_ld_preload_and_ld_debug_never_reach_the_host(acp_managers, kind, tmp_path):
    attacker = await make(acp_managers, kind)
    ws = attacker.workspace
    marker = tmp_path / "preload-marker"  # outside the workspace, on the host
    source = ws / "evil.c"
    source.write_text(EVIL_C % {"marker": marker})
    gcc = ["gcc", "-shared", "-fPIC", "-o", str(ws / "evil.so"), str(source)]
    await asyncio.to_thread(subprocess.run, gcc, check=True, capture_output=True, timeout=60)
    inside = f"{sandbox_workspace(attacker)}/evil.so"
    for lib in (str(ws / "evil.so"), inside):
        report = await attacker.terminal("/bin/true", env=[{"name": "LD_PRELOAD", "value": lib}])
        assert "error" not in report, report  # the request itself is fine: it runs in the sandbox
    debug = tmp_path / "lddebug"
    report = await attacker.terminal("/bin/true", env=[{"name": "LD_DEBUG", "value": "all"},
                                                        {"name": "LD_DEBUG_OUTPUT", "value": str(debug)}])
    assert "error" not in report, report
    assert not marker.exists(), marker.read_text()  # no host process loaded the agent's library
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith("lddebug")]
    # the agent's own environment (set at session start) is no different
    report = await attacker("sh", cmd=f"LD_PRELOAD={inside} /bin/true; echo done")
    assert report["output"].endswith("done\n") and not marker.exists()


# -- odd terminal requests: clean -32602, no host path, no traceback ---------------------------
ODD_REQUESTS = [
    ("env name with =", {"command": "/bin/true", "env": [{"name": "A=B", "value": "1"}]}),
    ("env name with a digit first", {"command": "/bin/true", "env": [{"name": "1X", "value": "1"}]}),
    ("empty env name", {"command": "/bin/true", "env": [{"name": "", "value": "1"}]}),
    ("env name with NUL", {"command": "/bin/true", "env": [{"name": "X\u0000", "value": "1"}]}),
    ("env value with NUL", {"command": "/bin/true", "env": [{"name": "X", "value": "a\u0000b"}]}),
    ("too many env vars", {"command": "/bin/true",
                           "env": [{"name": f"V{i}", "value": "1"} for i in range(1000)]}),
    ("NUL in an argument", {"command": "/bin/echo", "args": ["a\u0000b"]}),
    ("NUL in the command", {"command": "/bin/true\u0000x"}),
    ("empty command", {"command": ""}),
    ("too many arguments", {"command": "/bin/echo", "args": ["x"] * 5000}),
    ("a huge argument", {"command": "/bin/echo", "args": ["x" * 300_000]}),
    ("cwd outside (absolute)", {"command": "/bin/pwd", "cwd": "/etc"}),
    ("cwd outside (dot-dot)", {"command": "/bin/pwd", "cwd": "../.."}),
    ("cwd of 100 KB", {"command": "/bin/pwd", "cwd": "a/" * 50_000}),
    ("cwd with NUL", {"command": "/bin/pwd", "cwd": "a\u0000b"}),
]


@pytest.mark.parametrize("kind", [*ISOLATED, "local"])
async def test_odd_terminal_requests_are_refused_cleanly(acp_managers, kind, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    attacker = await make(acp_managers, kind)
    host_paths = {str(attacker.workspace), str(tmp_path), str(checkout_root())}
    requests = [*ODD_REQUESTS,
                ("cwd outside (sandbox view)", {"command": "/bin/pwd",
                                                "cwd": sandbox_workspace(attacker) + "/../etc"})]
    for what, params in requests:
        report = await attacker("call", method="create_terminal", params=params)
        assert "error" in report, (what, report)
        error = report["error"]
        assert error["code"] == -32602, (what, error)
        text = json.dumps(error)
        assert not any(p in text for p in host_paths), (what, error)
        assert "Traceback" not in text, (what, error)
    # past the agent-side SDK: the server's SDK drops (or refuses) what its schema does not allow
    for params in ({"command": "/bin/true", "outputByteLimit": -1}, {"command": "/bin/true", "args": "x"},
                   {"command": ["/bin/true"]}, {"command": "/bin/true", "env": {"A": "B"}}):
        report = await attacker("raw", method="terminal/create", params=params)
        assert report.get("error", {}).get("code") in (None, -32602), report
        if "ok" in report:
            tid = report["ok"]["terminalId"]
            await attacker("call", method="release_terminal", params={"terminal_id": tid})
    # the SDK merges ``_meta`` into the handler's arguments: smuggled keys are dropped before it
    # sees them (linefilter), so the validated params are what runs
    for meta in ({"cwd": "/etc"}, {"env": [{"name": "A=B", "value": "1"}]}, {"command": ["/bin/true"]},
                 {"args": ["a\u0000b"]}, {"output_byte_limit": "all"}):
        params = {"command": "/bin/pwd", "_meta": meta}
        report = await attacker("raw", method="terminal/create", params=params)
        assert "ok" in report, (meta, report)
        tid = report["ok"]["terminalId"]
        await attacker("call", method="wait_for_terminal_exit", params={"terminal_id": tid})
        out = await attacker("call", method="terminal_output", params={"terminal_id": tid})
        await attacker("call", method="release_terminal", params={"terminal_id": tid})
        assert out["ok"]["output"].strip() == sandbox_workspace(attacker), (meta, out)
    # and a terminal that fits still runs, in the workspace
    report = await attacker.terminal("/bin/pwd", cwd="sub/..")
    assert report["ok"]["output"].strip() == sandbox_workspace(attacker), report
    assert tracebacks(caplog) == []
    refusals = [r for r in caplog.records if "terminal refused" in r.getMessage()]
    assert 1 <= len(refusals) <= 25  # one line per refusal, rate-limited
    assert not any(p in r.getMessage() for r in refusals for p in host_paths)


@pytest.mark.parametrize("kind", [*ISOLATED, "local"])
async def test_terminal_output_and_count_are_bounded(acp_managers, kind, caplog):
    caplog.set_level(logging.DEBUG)
    attacker = await make(acp_managers, kind, max_terminals=2, max_terminal_output_bytes="256K")
    ceiling = 256 * 1024
    # the agent asks to keep 2**62 bytes of 64 MiB printed: only the ceiling is kept (the end)
    report = await attacker("term_stat", params={
        "command": "/bin/sh", "args": ["-c", "head -c 67108864 /dev/zero | tr '\\0' a; echo END"],
        "output_byte_limit": 2**62})
    assert "error" not in report, report
    assert report["bytes"] <= ceiling and report["truncated"] is True, report
    assert report["tail"].endswith("aEND\n")
    # at most max_terminals at once
    made = []
    for _ in range(2):
        report = await attacker("call", method="create_terminal", params={"command": "sleep", "args": ["30"]})
        made.append(report["ok"]["terminalId"])
    report = await attacker("call", method="create_terminal", params={"command": "sleep", "args": ["30"]})
    assert report["error"]["code"] == -32602 and "at most 2 terminals" in report["error"]["message"]
    await attacker("call", method="release_terminal", params={"terminal_id": made.pop()})
    report = await attacker("call", method="create_terminal", params={"command": "/bin/true"})
    assert "ok" in report, report  # a released terminal frees its slot
    made.append(report["ok"]["terminalId"])
    for tid in made:
        await attacker("call", method="release_terminal", params={"terminal_id": tid})
    # twenty at once cannot slip past the count while the first ones are still starting
    report = await attacker("many", method="terminal/create", params={"command": "sleep", "args": ["30"]},
                            count=20)
    assert report["results"] == {"ok": 2, "-32602": 18}, report
    # unknown terminal ids are refused without echoing them
    report = await attacker("call", method="terminal_output", params={"terminal_id": "x" * 10_000})
    assert report["error"]["code"] == -32602 and "x" * 100 not in json.dumps(report)
    assert tracebacks(caplog) == []


# -- no unsandboxed terminals by default -------------------------------------------------------
async def test_local_sandbox_offers_no_terminals_unless_the_admin_opts_in(acp_managers):
    plain = acp_managers(sandbox="local")  # the demo agent may run there, terminal-less
    session = await plain.create_user_session("alice", "demo")
    assert session.sandbox.provides_terminals is False
    result = await plain.send_message("alice", session.id, "/shell id")
    assert result.text == "This client offers no terminal."  # none advertised at initialize
    attacker = await make_attacker(acp_managers, "local")  # allow_unsandboxed, not terminals
    report = await attacker("call", method="create_terminal", params={"command": "id"})
    assert report["error"]["code"] == -32602 and "no terminals" in report["error"]["message"], report

    opted = acp_managers(sandbox="local", allow_unsandboxed_terminals=True)
    session = await opted.create_user_session("alice", "demo")
    result = await opted.send_message("alice", session.id, "/shell id -u")
    assert result.text.strip() == f"exit 0: {os.getuid()}"


# -- least exposure ----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ISOLATED)
async def test_the_sandbox_sees_no_host_paths_and_no_checkout(acp_managers, kind):
    attacker = await make(acp_managers, kind)
    host_ws = str(attacker.workspace)
    leaks = server_only_path_entries()
    dump = ("env; echo ---; for f in /proc/self/environ /proc/[0-9]*/environ; do "
            "tr '\\0' '\\n' < $f 2>/dev/null; echo; done")
    agent = (await attacker("sh", cmd=dump))["output"]
    term = (await attacker.terminal("/bin/sh", ["-c", dump]))["ok"]["output"]
    for seen in (agent, term):
        assert "PATH=" in seen
        assert host_ws not in seen  # no PWD or anything else naming the workspace's host path
        assert "HOME=/home/agent" in seen and attacker.session.sandbox_spec.home not in seen
        assert not [p for p in leaks if p in seen], [p for p in leaks if p in seen]
    assert f"PWD={sandbox_workspace(attacker)}" in term
    # only the package directory of an editable install is mounted, not the checkout
    root = checkout_root()
    listing = (await attacker("sh", cmd=f"ls -A {root}"))["output"].split()
    tracked = tracked_top_level()
    # (``tests`` holds the hostile agent, which its harness mounts; ``.venv`` is the interpreter)
    assert set(listing) & tracked <= {"jupyter_acp", "tests"}, listing
    if "tests" in listing:
        assert (await attacker("sh", cmd=f"ls -A {root}/tests"))["output"].split() == ["agents"]
    # and the demo agent (an editable install) still imports and runs there
    session = await attacker.manager.create_user_session("alice", "demo")
    assert (await attacker.manager.send_message("alice", session.id, "hello")).text
    result = await attacker.manager.send_message("alice", session.id, f"/shell ls -A {root}")
    assert result.text.startswith("exit 0: ")
    assert set(result.text[len("exit 0: "):].split()) & tracked <= {"jupyter_acp"}, result.text
