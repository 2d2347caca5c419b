"""Agent fs requests are confined to the session workspace (unit and through a real agent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from acp.exceptions import RequestError

from jupyter_acp.client import WorkspaceFS


@pytest.fixture
def layout(tmp_path: Path) -> tuple[WorkspaceFS, Path, Path]:
    ws = tmp_path / "ws"
    (ws / "sub").mkdir(parents=True)
    (ws / "sub" / "inside.txt").write_text("one\ntwo\nthree\n")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    os.symlink(outside, ws / "escape")             # a directory link out
    os.symlink(outside / "secret.txt", ws / "link.txt")  # a file link out
    os.symlink(ws / "sub" / "inside.txt", ws / "ok-link.txt")  # a link that stays inside
    return WorkspaceFS(ws, "/workspace"), ws, outside


ESCAPES = [
    "../outside/secret.txt",
    "/workspace/../outside/secret.txt",
    "sub/../../outside/secret.txt",
    "/etc/passwd",
    "/workspace-other/x",
    "escape/secret.txt",
    "link.txt",
    "",
    "a\x00b",
]


@pytest.mark.parametrize("path", ESCAPES)
async def test_reads_outside_are_refused(layout, path):
    fs, _, _ = layout
    with pytest.raises(RequestError) as info:
        await fs.read(path, None, None)
    assert info.value.code == -32602 and "Access denied" in str(info.value)


@pytest.mark.parametrize("path", ESCAPES)
async def test_writes_outside_are_refused(layout, path):
    fs, _, outside = layout
    with pytest.raises(RequestError):
        await fs.write(path, "pwned")
    assert (outside / "secret.txt").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]


async def test_inside_paths_work(layout):
    fs, ws, _ = layout
    assert await fs.read("/workspace/sub/inside.txt", None, None) == "one\ntwo\nthree\n"
    assert await fs.read("sub/inside.txt", 2, 1) == "two\n"
    assert await fs.read("ok-link.txt", None, None) == "one\ntwo\nthree\n"
    await fs.write("/workspace/new/dir/file.txt", "hello")
    assert (ws / "new" / "dir" / "file.txt").read_text() == "hello"
    with pytest.raises(RequestError) as info:
        await fs.read("missing.txt", None, None)
    assert info.value.code == -32002  # resource not found


async def test_confinement_through_a_real_agent(acp_managers, tmp_path, acp_workspace_root):
    (tmp_path / "secret.txt").write_text("top secret")
    os.symlink(tmp_path / "secret.txt", acp_workspace_root / "link.txt")
    manager = acp_managers()
    session = await manager.create_user_session("alice", "demo")
    for path in ("../secret.txt", str(tmp_path / "secret.txt"), "link.txt"):
        result = await manager.send_message("alice", session.id, f"/read {path}")
        assert "Access denied" in result.text and "top secret" not in result.text
