"""Usernames become directory names without two users ever sharing one (issue: 张三 and 李四
both became ``__``, and 李四's agent read 张三's files)."""

from __future__ import annotations

import os

from jupyter_acp.usernames import safe_username

TRICKY = ["张三", "李四", "bob", ".bob", "Bob", "BOB", "a b", "a-b", "a_b", "a.b", "a-2Eb", "-", "--",
          ".", "..", "", "x" * 300, "x" * 300 + "y", "é" * 200, "é" * 200 + "e", "../etc", "a/b",
          "user@example.org", "tab\there", "nul\x00byte"]


def test_the_mapping_is_injective_and_safe():
    names = [safe_username(n) for n in TRICKY]
    assert len(set(names)) == len(TRICKY), [n for n in names if names.count(n) > 1]
    for original, name in zip(TRICKY, names, strict=True):
        assert name and "/" not in name and "\x00" not in name, (original, name)
        assert not name.startswith("."), (original, name)  # never hidden, never . or ..
        assert len(name.encode()) <= 255, (original, len(name))
    # readable where it can be, like JupyterHub's spawners
    assert safe_username("bob") == "bob" and safe_username("user@example.org") == "user@example-2Eorg"
    assert safe_username("x" * 300).startswith("x" * 100)


async def test_two_unicode_users_get_two_workspaces(acp_managers, acp_workspace_root):
    manager = acp_managers(workspace_template="{root_dir}/{username}")
    zhang = await manager.create_user_session("张三", "demo")
    li = await manager.create_user_session("李四", "demo")
    assert zhang.sandbox_spec.workspace != li.sandbox_spec.workspace
    (zhang.sandbox_spec.workspace / "secret.txt").write_text("张三's secret\n")
    result = await manager.send_message("李四", li.id, "/read secret.txt")
    assert "secret" not in result.text.replace("secret.txt", ""), result.text
    assert sorted(os.listdir(acp_workspace_root)) == sorted([safe_username("张三"), safe_username("李四")])
