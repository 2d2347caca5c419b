"""Sandbox limits under a real Unix user: refused, explicitly unlimited, or held by delegation.

A single-user server under JupyterHub's LocalProcessSpawner runs as the user's own Unix account,
which may not create cgroups. These tests run the session manager exactly so — as the real user
``acp-limits`` (created with useradd; we are root), through ``runuser`` — and show:

- without cgroup rights the bubblewrap backend is unavailable and a session is refused with the
  reason and the admin's options (``c.BubblewrapSandbox.limits_required``, default True): no
  agent starts without its limits;
- with the admin's explicit opt-in (``limits_required = False``) the agent runs, and the log and
  the session's ``limits.enforced`` say it runs without limits;
- with a cgroup delegated to the user (what systemd's ``Delegate=yes`` gives a unit; here root
  makes and chowns it, as systemd would), the server makes the session's groups in it and the
  memory limit holds: a memory hog is killed.

As root (the cgroup tree writable) the limits hold too: tests/test_bubblewrap.py kills a memory
hog and a fork bomb there; here only the chooser's view of it is checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import acp_require

from jupyter_acp.sandbox.bubblewrap import CGROUP_ROOT, BubblewrapSandbox, _cgroup_v2, cgroup_rights

pytestmark = pytest.mark.sandbox

USER = "acp-limits"
SWITCH = "JUPYTER_ACP_REQUIRE_SANDBOX"

#: Runs as the real user: a session manager configured from argv[1] (JSON), one session of the
#: demo agent, one message; prints one JSON line with what happened.
CHILD = textwrap.dedent('''
    import asyncio, json, sys
    from traitlets.config import Config
    from jupyter_acp.agents import AgentSpec
    from jupyter_acp.manager import UserSessionManager
    from jupyter_acp.usage import UsageLedger
    from jupyter_acp.sandbox.base import SandboxSpec
    from jupyter_acp.sandbox.bubblewrap import BubblewrapSandbox, cgroup_rights

    async def main(args):
        config = Config()
        config.BubblewrapSandbox.limits_required = args["limits_required"]
        home = args["home"]
        ledger = UsageLedger(db_url=f"sqlite:///{home}/usage.sqlite")
        manager = UserSessionManager(
            config=config, sandbox=args["sandbox"], root_dir=home, agent_home_dir=home + "/homes",
            monitor_interval=0, mem_limit=args["mem_limit"], ledger=ledger)
        rights = cgroup_rights()
        out = {"cgroup": open("/proc/self/cgroup").read(), "how": rights.how, "reason": rights.reason,
               "backends": manager.backends()}
        # the automatic choice for a real (non-demo) agent: docker if it works, else a refusal
        real = AgentSpec(name="real", display_name="A real agent", command=["/bin/true"])
        auto = UserSessionManager(config=config, monitor_interval=0, root_dir=home, ledger=ledger)
        try:
            out["auto_choice"] = auto.backend_for(real).kind
        except Exception as e:
            out["auto_choice_error"] = f"{type(e).__name__}: {e}"
        # the sandbox itself refuses too, even when started without the chooser
        box = BubblewrapSandbox.create(SandboxSpec(
            argv=["/bin/sh", "-c", "echo ran > /workspace/ran"], workspace=__import__("pathlib").Path(home),
            labels={"session": "direct-" + str(__import__("os").getpid())}), parent=manager)
        try:
            await box.start()
            out["direct"] = await box.wait()
            await box.remove()
        except Exception as e:
            out["direct_error"] = f"{type(e).__name__}: {e}"
        try:
            session = await manager.create_user_session("acp-limits", "demo")
        except Exception as e:
            out["error"] = f"{type(e).__name__}: {e}"
        else:
            out["limits"] = session.stats()["limits"]
            out["cgroup_dirs"] = [str(p) for p in session.sandbox.cgroups.dirs.values()]
            try:
                result = await asyncio.wait_for(
                    manager.send_message("acp-limits", session.id, args["message"]), 90)
                out["stop_reason"] = result.stop_reason
            except Exception as e:
                out["turn_error"] = f"{type(e).__name__}: {e}"
        await manager.shutdown()
        print(json.dumps(out))

    asyncio.run(main(json.loads(sys.argv[1])))
''')


def _run_as_user(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", USER, "--", *argv], capture_output=True, text=True,
                          timeout=120, cwd="/", **kwargs)


@pytest.fixture(scope="module")
def user() -> str:
    """The real Unix user ``acp-limits`` (made with useradd when missing)."""
    tools = [t for t in ("useradd", "runuser", "bwrap") if shutil.which(t) is None]
    acp_require(SWITCH, os.geteuid() == 0 and not tools,
                f"needs root and {', '.join(tools) or 'nothing else'} to run the server as a real user")
    if subprocess.run(["id", USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", "/nonexistent",
                        "--shell", "/usr/sbin/nologin", USER], check=True, capture_output=True)
    ok, why = BubblewrapSandbox.available()
    acp_require(SWITCH, ok, f"bubblewrap cannot run here: {why}")
    probe = _run_as_user(["bwrap", "--unshare-all", "--ro-bind", "/", "/", "--", "/bin/true"])
    acp_require(SWITCH, probe.returncode == 0,
                f"bwrap cannot create namespaces as an unprivileged user: {probe.stderr.strip()}")
    return USER


@pytest.fixture(scope="module")
def user_python(user: str) -> Iterator[str]:
    """A Python the real user can run that imports this jupyter_acp: this venv's interpreter
    when the user may run it, else a venv of a same-version system Python (made by the user)
    that reads this venv's site-packages (e.g. a venv under root's 0700 home)."""
    check = ["-c", "import jupyter_acp.manager"]
    if _run_as_user([sys.executable, *check]).returncode == 0:
        yield sys.executable
        return
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    base = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    acp_require(SWITCH, base is not None,
                f"{sys.executable} is not executable by {user} and there is no system {version}")
    assert base is not None
    where = tempfile.mkdtemp(prefix="acp-limits-venv-", dir="/tmp")
    try:
        os.chmod(where, 0o755)
        shutil.chown(where, user)
        made = _run_as_user([base, "-m", "venv", "--without-pip", f"{where}/venv"])
        assert made.returncode == 0, made.stderr
        site = Path(_run_as_user([f"{where}/venv/bin/python", "-c",
                                  "import sysconfig; print(sysconfig.get_path('purelib'))"]).stdout.strip())
        (site / "jupyter-acp-tests.pth").write_text(
            f"import site; site.addsitedir({sysconfig.get_path('purelib')!r})\n")
        python = f"{where}/venv/bin/python"
        ok = _run_as_user([python, *check])
        acp_require(SWITCH, ok.returncode == 0, f"{user} cannot import jupyter_acp: {ok.stderr[-500:]}")
        yield python
    finally:
        shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def home(user: str) -> Iterator[str]:
    """A directory of the user's own: the server's root dir, agent homes and ledger."""
    where = tempfile.mkdtemp(prefix="acp-limits-home-", dir="/tmp")
    shutil.chown(where, user)
    yield where
    shutil.rmtree(where, ignore_errors=True)


def run_server(python: str, home: str, *, limits_required: bool = True, message: str = "hello",
               mem_limit: str = "256M", prefix: list[str] | None = None) -> tuple[dict[str, Any], str]:
    """Run ``CHILD`` as the real user (after ``prefix``, a root command that ends in exec): its
    JSON report and its stderr (the server's log)."""
    args = json.dumps({"limits_required": limits_required, "home": home, "sandbox": "bubblewrap",
                       "message": message, "mem_limit": mem_limit})
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": home,
           "PYTHONDONTWRITEBYTECODE": "1", "LANG": "C.UTF-8"}
    argv = ["runuser", "-u", USER, "--", python, "-c", CHILD, args]
    proc = subprocess.run([*(prefix or []), *argv], capture_output=True, text=True, timeout=180,
                          cwd="/", env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def assert_refusal(message: str) -> None:
    """The refusal names what is missing, why, and each way out."""
    assert "cannot enforce the agent's memory" in message, message
    assert f"runs as user {USER}" in message and "Permission denied" in message, message
    assert "c.BubblewrapSandbox.limits_required = True" in message
    assert "'docker'" in message and "Delegate=yes" in message
    assert "c.BubblewrapSandbox.limits_required = False" in message


def test_refused_without_cgroup_rights(user_python, home):
    """LocalProcessSpawner as it is: the user's server may not create cgroups, so no agent runs
    — not through the chooser, not by starting the sandbox directly."""
    out, log = run_server(user_python, home)
    assert "jupyter-acp" not in out["cgroup"] and not out["how"]
    bubblewrap = next(b for b in out["backends"] if b["kind"] == "bubblewrap")
    assert bubblewrap["available"] is False
    assert_refusal(bubblewrap["reason"])
    # asked for bubblewrap: the session is refused with that reason
    assert out["error"].startswith("SandboxError: The bubblewrap sandbox cannot run here: "), out
    assert_refusal(out["error"])
    assert "limits" not in out and "stop_reason" not in out
    # the sandbox refuses at start too, before anything ran
    assert out["direct_error"].startswith("SandboxError: The bubblewrap sandbox cannot enforce"), out
    assert not os.path.exists(f"{home}/ran")
    # the automatic choice: docker if this user may use an engine, else the refusal, never bubblewrap
    if "auto_choice" in out:
        assert out["auto_choice"] == "docker", out
    else:
        assert out["auto_choice_error"].startswith("AgentUnavailable: No sandbox can run A real agent"), out
        assert_refusal(out["auto_choice_error"])
    assert "WITHOUT" not in log


def test_admin_opt_in_runs_unlimited_and_says_so(user_python, home):
    """``c.BubblewrapSandbox.limits_required = False``: the agent runs, without limits, and the
    log and the session's ``limits.enforced`` say so."""
    out, log = run_server(user_python, home, limits_required=False)
    assert out["stop_reason"] == "end_turn", out
    enforced = out["limits"]["enforced"]
    assert not (enforced["mem_limit"] or enforced["cpu_limit"] or enforced["pids_limit"]), enforced
    assert enforced["network"] is True  # the namespaces still hold: no network
    assert out["limits"]["mem_limit"]  # asked for, not held
    assert "runs WITHOUT its memory, CPU, process limit(s), as the admin allows " \
           "(c.BubblewrapSandbox.limits_required = False)" in log, log[-2000:]
    assert f"runs as user {USER}" in log
    assert out["direct"] == 0 and os.path.exists(f"{home}/ran")  # (default limits, unheld)


@contextlib.contextmanager
def delegated_cgroup(user: str) -> Iterator[list[str]]:
    """A cgroup delegated to ``user`` as systemd's ``Delegate=yes`` does (the group and its
    ``cgroup.procs``/``subtree_control``/``threads`` chowned), and the root command that starts
    a process in it."""
    name = f"acp-limits-test-{os.getpid()}"
    if _cgroup_v2():
        groups = [CGROUP_ROOT / name]
        for ctl in ("memory", "cpu", "pids"):
            with contextlib.suppress(OSError):
                (CGROUP_ROOT / "cgroup.subtree_control").write_text(f"+{ctl}")
    else:
        groups = [CGROUP_ROOT / ctl / name for ctl in ("memory", "cpu", "pids")]
    try:
        for group in groups:
            group.mkdir()
            shutil.chown(group, user)
            for entry in ("cgroup.procs", "tasks", "cgroup.subtree_control", "cgroup.threads"):
                if (group / entry).exists():
                    shutil.chown(group / entry, user)
    except OSError as e:
        acp_require(SWITCH, False, f"cannot make a delegated cgroup here: {e}")
    join = " ".join(f'echo $$ > "{g}/cgroup.procs" &&' for g in groups)
    try:
        yield ["/bin/sh", "-c", f'{join} exec "$@"', "join-delegated-cgroup"]
    finally:
        for group in groups:  # children first (the session groups are gone already)
            for child in sorted(group.rglob("*"), key=lambda p: -len(p.parts)):
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        for pid in (child / "cgroup.procs").read_text().split():
                            os.kill(int(pid), signal.SIGKILL)
                    with contextlib.suppress(OSError):
                        child.rmdir()
            with contextlib.suppress(OSError):
                group.rmdir()


def test_limits_hold_in_a_cgroup_delegated_to_the_user(user, user_python, home):
    """The same user's server in a cgroup delegated to it: the session's groups are made there,
    every limit is enforced, and a memory hog is killed at the limit."""
    with delegated_cgroup(user) as prefix:
        out, log = run_server(user_python, home, message="/oom", mem_limit="96M", prefix=prefix)
    assert "delegated cgroup" in out["how"], out
    enforced = out["limits"]["enforced"]
    assert enforced["mem_limit"] and enforced["cpu_limit"] and enforced["pids_limit"], enforced
    assert all("acp-limits-test-" in d for d in out["cgroup_dirs"]), out["cgroup_dirs"]
    assert "ran out of memory (the sandbox limit is 96 MiB)" in out["turn_error"], out
    assert "WITHOUT" not in log


def test_root_has_the_cgroup_tree():
    """As root the groups come from the host's tree (where test_bubblewrap.py shows the memory,
    pids and CPU limits holding); the chooser offers bubblewrap."""
    acp_require(SWITCH, os.geteuid() == 0, "needs root")
    rights = cgroup_rights(refresh=True)
    acp_require(SWITCH, not rights.missing(), f"the cgroup tree is not writable here: {rights.reason}")
    assert rights.how == "the host's cgroup tree"
    assert BubblewrapSandbox.available() == (True, "")
