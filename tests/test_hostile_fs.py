"""A hostile agent cannot race, block or crash the server's fs/* service (jupyter_acp/workspace_fs.py).

The attacker is real: a thread (or the hostile agent inside its sandbox) swapping a directory and
a symlink to an outside directory with ``renameat2(RENAME_EXCHANGE)`` in a tight loop, FIFOs
without a writer, symlink loops, sockets, devices, absurd paths. Nothing is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import logging
import os
import socket
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from acp.exceptions import RequestError
from attack import BACKENDS, Attacker, make_attacker
from conftest import wait_for

from jupyter_acp.limits import AgentInputLimits
from jupyter_acp.workspace_fs import WorkspaceFS

HOSTILE = Path(__file__).parent / "agents" / "hostile.py"
_spec = importlib.util.spec_from_file_location("hostile_agent", HOSTILE)
assert _spec and _spec.loader
hostile = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(hostile)

ROOT = "/workspace"
TRIES = 3000


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.exc_text or "Traceback" in r.getMessage()]


def unblock_fifos(paths: list[Path], seconds: float = 5.0) -> None:
    """Give every FIFO a writer and a reader that close at once, so that whoever is stuck on it
    (the old code) ends.

    Returns at once when no one reads them; else keeps going while readers keep coming."""
    deadline = time.monotonic() + seconds
    last_reader = None  # no reader in the first round: done at once
    while time.monotonic() < deadline:
        for path in paths:
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_RDONLY | os.O_NONBLOCK))  # wakes a stuck writer
            with contextlib.suppress(OSError):
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # ENXIO: no reader
                last_reader = time.monotonic()
        if last_reader is None or time.monotonic() - last_reader > 0.5:
            return
        time.sleep(0.05)


@pytest.fixture
def race(tmp_path: Path) -> tuple[Path, Path]:
    """``ws/race/d`` (a directory holding ``secret``) and ``ws/race/l`` (a link to ``outside``)."""
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "race" / "d").mkdir(parents=True)
    (ws / "race" / "d" / "secret").write_text("inside\n")
    outside.mkdir()
    (outside / "secret").write_text("OUTSIDE\n")
    os.symlink(outside, ws / "race" / "l")
    return ws, outside


# -- the TOCTOU race, unit level ------------------------------------------------------------------
async def test_swapping_a_directory_for_a_link_never_reaches_outside(race):
    ws, _ = race
    fs = WorkspaceFS(ws, ROOT)
    swapper = hostile.Swapper(str(ws / "race" / "d"), str(ws / "race" / "l"))
    counts = {"outside": 0, "inside": 0, "refused": 0, "missing": 0}
    started = time.monotonic()
    swapper.start()
    try:
        for _ in range(TRIES):
            try:
                text = await fs.read(f"{ROOT}/race/d/secret", None, None)
                counts["outside" if "OUTSIDE" in text else "inside"] += 1
            except RequestError as e:
                counts["missing" if e.code == -32002 else "refused"] += 1
    finally:
        swapper.stop.set()
        swapper.join()
    print(f"\nrace/read: {counts} in {time.monotonic() - started:.1f} s, {swapper.swaps} swaps")
    assert swapper.swaps > 0 and counts["inside"] > 0
    assert counts["outside"] == 0, counts


async def test_writes_while_swapping_never_land_outside(race):
    ws, outside = race
    fs = WorkspaceFS(ws, ROOT)
    swapper = hostile.Swapper(str(ws / "race" / "d"), str(ws / "race" / "l"))
    counts = {"written": 0, "refused": 0}
    swapper.start()
    try:
        for i in range(TRIES):
            try:
                await fs.write(f"{ROOT}/race/d/secret", f"written {i}\n")
                counts["written"] += 1
            except RequestError:
                counts["refused"] += 1
    finally:
        swapper.stop.set()
        swapper.join()
    created = sorted(p.name for p in outside.iterdir())
    print(f"\nrace/write: {counts}, {swapper.swaps} swaps, outside holds {created}")
    assert swapper.swaps > 0 and counts["written"] > 0
    assert created == ["secret"] and (outside / "secret").read_text() == "OUTSIDE\n"
    real_dir = next(p for p in (ws / "race" / "d", ws / "race" / "l") if not p.is_symlink())
    assert sorted(p.name for p in real_dir.iterdir()) == ["secret"]  # no temporary file left


# -- FIFOs, devices, sizes, slots ---------------------------------------------------------------
async def test_fifos_are_refused_at_once_and_block_no_one(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    fifos = [ws / f"fifo-{k}" for k in range(8)]
    for path in fifos:
        os.mkfifo(path)
    other_ws = tmp_path / "other"
    other_ws.mkdir()
    (other_ws / "notes.txt").write_text("hello\n")
    mallory, alice = WorkspaceFS(ws, ROOT), WorkspaceFS(other_ws, ROOT)

    async def attempt(path: Path) -> Any:
        try:
            return await mallory.read(f"{ROOT}/{path.name}", None, None)
        except RequestError as e:
            return e

    started = time.monotonic()
    attack = asyncio.gather(*(attempt(p) for p in fifos))
    answered: list[float] = []
    attack.add_done_callback(lambda _: answered.append(time.monotonic() - started))
    try:
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        assert await asyncio.wait_for(alice.read(f"{ROOT}/notes.txt", None, None), 5) == "hello\n"
        other_read = time.monotonic() - t0
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "pool free"), 5) == "pool free"
        results = await asyncio.wait_for(attack, 5)
    finally:
        unblock_fifos(fifos)
    print(f"\nfifo: 8 reads answered in {answered[0]:.3f} s; another session's read took {other_read:.3f} s")
    assert answered[0] < 2
    assert all(isinstance(r, RequestError) and r.code == -32602 for r in results), results
    reasons = {r.data["reason"] for r in results}
    assert reasons <= {"not a regular file (a FIFO)", "too many file requests in flight (at most 2)"}
    assert mallory.in_flight == 0
    assert not [t for t in threading.enumerate() if t.name == "acp-fs"]


async def test_a_fifo_with_a_writer_cannot_pass_the_cap(tmp_path):
    """The old code read 24 MiB from a FIFO past the 20 MiB cap (st_size is 0)."""
    ws = tmp_path / "ws"
    ws.mkdir()
    fifo = ws / "stream"
    os.mkfifo(fifo)

    def writer() -> None:
        with contextlib.suppress(OSError), open(fifo, "wb") as f:
            for _ in range(32):
                f.write(b"x" * (1024 * 1024))

    threading.Thread(target=writer, daemon=True).start()
    fs = WorkspaceFS(ws, ROOT, AgentInputLimits(max_file_bytes=1024 * 1024))
    try:
        with pytest.raises(RequestError) as info:
            await asyncio.wait_for(fs.read(f"{ROOT}/stream", None, None), 10)
    finally:  # the writer waits for a reader: give it one that closes at once
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))
    assert info.value.code == -32602 and "FIFO" in str(info.value.data)


async def test_the_size_cap_is_the_admins(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "big").write_bytes(b"a" * 1025)
    (ws / "fits").write_bytes(b"a" * 1024)
    fs = WorkspaceFS(ws, ROOT, AgentInputLimits(max_file_bytes=1024))
    assert len(await fs.read("fits", None, None)) == 1024
    for op in (fs.read("big", None, None), fs.write("new", "b" * 1025), fs.write("new", "é" * 600)):
        with pytest.raises(RequestError) as info:
            await op
        assert info.value.code == -32602 and "larger than 1024 bytes" in str(info.value)
    assert not (ws / "new").exists()


async def test_requests_beyond_the_slots_are_refused_not_queued(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "big").write_bytes(b"a\n" * (4 * 1024 * 1024))
    fs = WorkspaceFS(ws, ROOT, AgentInputLimits(max_concurrent_fs=2))
    results = await asyncio.gather(*(fs.read("big", None, None) for _ in range(8)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, RequestError)]
    assert 0 < len(refused) <= 6 and all("too many file requests" in str(r) for r in refused)
    assert all(len(r) == 8 * 1024 * 1024 for r in results if isinstance(r, str))
    await asyncio.sleep(0.1)
    assert fs.in_flight == 0


async def test_a_slow_request_times_out_and_keeps_its_slot_until_done(tmp_path):
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "big").write_bytes(b"a\n" * (4 * 1024 * 1024))
    fs = WorkspaceFS(ws, ROOT, AgentInputLimits(fs_timeout=0.001, max_concurrent_fs=1))
    with pytest.raises(RequestError) as info:
        await fs.read("big", None, None)
    assert info.value.code == -32602 and "timed out" in str(info.value)
    assert fs.in_flight == 1  # the thread still runs: its slot is not given to another request
    with pytest.raises(RequestError, match="too many file requests"):
        await fs.read("big", None, None)
    await wait_for(lambda: fs.in_flight == 0)


async def test_lines_and_limits_are_sliced_keeping_line_ends(tmp_path):
    """`\n` lines, 1-based; unlike the old `read_text`, CRLF comes back as it is in the file."""
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "f").write_text("one\ntwo\r\nthree\nfour")
    fs = WorkspaceFS(ws, ROOT)
    assert await fs.read("f", 2, 2) == "two\r\nthree\n"
    assert await fs.read("f", 4, None) == "four"
    assert await fs.read("f", None, 1) == "one\n"
    assert await fs.read("f", 9, 3) == ""
    assert await fs.read("f", 0, 0) == ""


async def test_writes_keep_mode_replace_links_inside_and_create_parents(tmp_path):
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "script.sh").write_text("old\n")
    os.chmod(ws / "sub" / "script.sh", 0o750)
    os.symlink("sub/script.sh", ws / "rel-link")
    os.symlink(f"{ROOT}/sub/script.sh", ws / "abs-link")
    fs = WorkspaceFS(ws, ROOT)
    await fs.write("rel-link", "via relative link\n")
    assert (ws / "sub" / "script.sh").read_text() == "via relative link\n"
    await fs.write("abs-link", "via absolute link\n")
    assert (ws / "sub" / "script.sh").read_text() == "via absolute link\n"
    assert stat.S_IMODE(os.stat(ws / "sub" / "script.sh").st_mode) == 0o750
    assert (ws / "rel-link").is_symlink() and (ws / "abs-link").is_symlink()
    assert await fs.read(f"{ROOT}/abs-link", None, None) == "via absolute link\n"
    await fs.write("a/b/c/new.txt", "deep\n")
    assert (ws / "a" / "b" / "c" / "new.txt").read_text() == "deep\n"
    assert [p.name for p in (ws / "sub").iterdir()] == ["script.sh"]


# -- bad paths: one clean -32602 each, no host path, no traceback -------------------------------
@pytest.fixture
def nasty(tmp_path: Path) -> tuple[Path, Path]:
    ws, outside = tmp_path / "ws", tmp_path / "outside"
    (ws / "dir").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret").write_text("OUTSIDE\n")
    os.symlink("loop-b", ws / "loop-a")
    os.symlink("loop-a", ws / "loop-b")
    os.symlink("self", ws / "self")
    os.symlink("../outside/secret", ws / "up-link")
    os.symlink(str(outside), ws / "abs-out")
    os.symlink("/dev/null", ws / "devnull-link")
    os.mkfifo(ws / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(ws / "sock"))
    if os.geteuid() == 0:
        os.mknod(ws / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    return ws, outside


BAD_PATHS = {
    "symlink loop": "loop-a/x",
    "symlink loop, last": "loop-a",
    "self link": "self",
    "100 KB path": "a/" * 50_000 + "x",
    "long component": "x" * 300,
    "NUL": "dir/a\x00b",
    "directory": "dir",
    "the root": ROOT,
    "FIFO": "fifo",
    "socket": "sock",
    "device": "null",
    "link to a device": "devnull-link",
    "dot-dot": "dir/../../outside/secret",
    "absolute outside": "/etc/passwd",
    "host path": "<host>",
    "link up and out": "up-link",
    "link out": "abs-out/secret",
    "lone surrogate": "a\ud800b",
}


@pytest.mark.parametrize("op", ["read", "write"])
@pytest.mark.parametrize("case", list(BAD_PATHS))
async def test_bad_paths_are_refused_cleanly(nasty, case, op, caplog):
    ws, outside = nasty
    if case == "device" and not (ws / "null").exists():
        pytest.skip("making a device node needs root")
    caplog.set_level(logging.DEBUG)
    path = BAD_PATHS[case].replace("<host>", str(outside / "secret"))
    fs = WorkspaceFS(ws, ROOT)
    started = time.monotonic()
    try:
        with pytest.raises(RequestError) as info:
            if op == "read":
                await asyncio.wait_for(fs.read(path, None, None), 5)
            else:
                await asyncio.wait_for(fs.write(path, "pwned\n"), 5)
    finally:
        unblock_fifos([ws / "fifo"])  # a reader stuck on it would hang the loop's shutdown
    assert time.monotonic() - started < 2
    err = info.value
    shown = json.dumps([str(err), err.data])
    assert err.code == -32602, shown
    assert str(ws) not in shown and str(ws.parent) not in shown.replace(str(outside / "secret"), "")
    assert len(shown) < 1000
    assert tracebacks(caplog) == []
    assert not any(str(ws) in r.getMessage() for r in caplog.records)
    assert (outside / "secret").read_text() == "OUTSIDE\n"
    assert [p.name for p in outside.iterdir()] == ["secret"]
    assert stat.S_ISFIFO(os.lstat(ws / "fifo").st_mode) and (ws / "loop-a").is_symlink()


async def test_refusals_are_logged_rate_limited(tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    (tmp_path / "ws").mkdir()
    fs = WorkspaceFS(tmp_path / "ws", ROOT)
    for _ in range(200):
        with pytest.raises(RequestError):
            await fs.read("/etc/passwd", None, None)
    lines = [r for r in caplog.records if r.name == "jupyter_acp.workspace_fs"]
    assert 1 <= len(lines) <= 10, len(lines)


# -- end to end: the hostile agent in each sandbox, through the real session manager -------------
@pytest.mark.parametrize("mode", ["read", "write"])
@pytest.mark.parametrize("kind", BACKENDS)
async def test_race_through_a_sandboxed_agent(acp_managers, tmp_path, kind, mode, caplog):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("OUTSIDE\n")
    attacker = await make_attacker(acp_managers, kind)
    started = time.monotonic()
    report = await attacker("race", outside=str(outside), tries=1000, mode=mode)
    print(f"\n{kind} race/{mode}: {report} in {time.monotonic() - started:.1f} s")
    assert "error" not in report, report
    assert report["swaps"] > 0 and report["inside"] > 0
    assert report["outside"] == 0, report
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert (outside / "secret").read_text() == "OUTSIDE\n"
    assert tracebacks(caplog) == []


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fifos_through_a_sandboxed_agent_block_no_one(acp_managers, kind):
    mallory = await make_attacker(acp_managers, kind)
    # another user of the same server (a second manager would remove the first one's containers)
    session = await mallory.manager.create_user_session("victim", "hostile")
    victim = Attacker(mallory.manager, session, "victim")
    (victim.workspace / "notes.txt").write_text("hello\n")
    fifos = [mallory.workspace / f"fifo-{k}" for k in range(8)]
    attack = asyncio.ensure_future(mallory("fifo", count=8))
    try:
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        read = await asyncio.wait_for(
            victim("call", method="read_text_file", params={"path": "notes.txt"}), 10)
        victim_seconds = time.monotonic() - t0
        report = await asyncio.wait_for(attack, 10)
        pool = await asyncio.wait_for(asyncio.to_thread(lambda: "free"), 5)
    finally:
        unblock_fifos(fifos)
    print(f"\n{kind} fifo: {report['seconds']:.3f} s for 8 reads; victim's read {victim_seconds:.3f} s")
    assert read == {"ok": {"content": "hello\n"}}, read
    assert victim_seconds < 5 and report["seconds"] < 2 and pool == "free"
    assert all(r["error"]["code"] == -32602 for r in report["results"]), report
    t0 = time.monotonic()
    await asyncio.wait_for(mallory.manager.shutdown(), 30)
    print(f"{kind} shutdown: {time.monotonic() - t0:.2f} s")
    assert not [t for t in threading.enumerate() if t.name == "acp-fs"]


AGENT_BAD_PATHS = ["loop-a", "loop-a/x", "a/" * 50_000 + "x", "dir/a\x00b", "dir", "fifo", "sock",
                   "../x", "dir/../../etc/passwd", "/etc/passwd", "escape/secret", "x" * 300, "up"]


@pytest.mark.parametrize("kind", BACKENDS)
async def test_bad_paths_through_a_sandboxed_agent(acp_managers, tmp_path, kind, caplog):
    caplog.set_level(logging.DEBUG)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("OUTSIDE\n")
    attacker = await make_attacker(acp_managers, kind)
    host = str(attacker.workspace)
    made = await attacker("sh", cmd=(
        "ln -s loop-b loop-a && ln -s loop-a loop-b && mkdir dir && mkfifo fifo && ln -s .. up && "
        f"ln -s {outside} escape && {sys.executable} -c "
        "'import socket; socket.socket(socket.AF_UNIX).bind(\"sock\")'; ls"))
    assert "sock" in made["output"] and "loop-a" in made["output"], made
    for method, extra in (("read_text_file", {}), ("write_text_file", {"content": "pwned"})):
        for path in AGENT_BAD_PATHS:
            try:
                report = await asyncio.wait_for(
                    attacker("call", method=method, params={"path": path, **extra}), 10)
            finally:
                unblock_fifos([attacker.workspace / "fifo"])
            text = json.dumps(report)
            assert report.get("error", {}).get("code") == -32602, (path[:50], report)
            assert host not in text and len(text) < 1000, text[:300]
    assert tracebacks(caplog) == []
    assert not any(host in r.getMessage() for r in caplog.records if r.name.startswith("jupyter_acp"))
    assert [p.name for p in outside.iterdir()] == ["secret"]
    assert (attacker.workspace / "fifo").exists()  # still a FIFO: written through nothing
    assert stat.S_ISFIFO(os.lstat(attacker.workspace / "fifo").st_mode)
