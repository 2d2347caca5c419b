"""The JupyterLab sidebar, driven in a real Chromium against a real JupyterLab with the demo agent.

What a person does: open the agents panel, start a session, chat (the reply streams in),
ask the agent to write a file, approve its permission request in the panel, find the file in
the file browser, and watch the token counters move. Screenshots of each step are saved under
pytest's ``tmp_path`` (their paths are printed) so a person can look at what the test saw.

The server is ``jupyter lab`` in a subprocess (so this is the extension exactly as installed by
``pip install``: the labextension built by hatch-jupyter-builder, the server extension enabled
on the command line). Its config, data and runtime directories are private to the test
(tests/browser.py has what the browser tests share).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from browser import UI_TIMEOUT, LabServer, Screenshots, api, chromium, open_panel, require_playwright, tokens

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(300)]

_tokens = tokens
_api = api


@pytest.fixture
def lab_server(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A JupyterLab with jupyter-acp on a free port; yields its url, token, root dir and log."""
    server = LabServer(tmp_path)
    try:
        server.start()
        yield server.info()
    finally:
        server.stop()


NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
               "source": "answer = 41 + 1"}],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


def send_from(page, name: str, editor_selector: str) -> None:
    """Open ``name`` from the file browser, then "Send selection / cell to agent" from its context menu."""
    from playwright.sync_api import expect

    page.locator('.jp-SideBar [data-id="filebrowser"]').click()
    page.locator('.jp-ToolbarButtonComponent[data-command="filebrowser:refresh"]').click()
    page.locator(".jp-DirListing-itemText", has_text=name).dblclick()
    editor = page.locator(f".jp-MainAreaWidget:not(.lm-mod-hidden) {editor_selector}").first
    expect(editor).to_be_visible(timeout=UI_TIMEOUT)
    editor.click()
    editor.click(button="right")
    item = page.locator(".lm-Menu-item", has_text="Send selection / cell to agent")
    expect(item).to_be_visible()
    item.click()


def test_sidebar_chat_permission_file_and_tokens(lab_server: dict[str, str], tmp_path: Path) -> None:
    sync_playwright = require_playwright()
    from playwright.sync_api import expect

    shot = Screenshots(tmp_path)

    with sync_playwright() as pw, chromium(pw) as (page, errors):
        # the session sockets pass through Playwright, so the test can drop one like a network would
        sockets: list = []

        def through(ws) -> None:
            ws.connect_to_server()
            sockets.append(ws)

        page.route_web_socket(re.compile(r"/api/acp/sessions/[^/]+/ws"), through)
        try:
            # the panel's tab in the left sidebar: our plugin was loaded
            panel = open_panel(page, lab_server)

            def show_panel() -> None:
                open_panel(page)

            # agents are listed; the demo agent (the default) is selectable
            agent = panel.locator("select.jp-AcpPanel-agent")
            expect(agent.locator('option[value="demo"]')).to_have_count(1, timeout=UI_TIMEOUT)
            agent.select_option("demo")  # the default agent may be a real one where one is installed
            for info in _api(lab_server, "agents")["agents"]:  # unavailable ones: greyed, with the reason
                option = agent.locator(f'option[value="{info["name"]}"]')
                if info["available"]:
                    expect(option).to_be_enabled()
                else:
                    expect(option).to_be_disabled()
                    expect(option).to_contain_text(info["reason"])
            usage = panel.get_by_test_id("acp-usage-today")
            expect(usage).to_contain_text("Today:")
            today_before = _tokens(usage.inner_text())

            panel.get_by_role("button", name="New session").click()
            status = panel.locator(".jp-AcpPanel-status")
            expect(status).to_contain_text("ready", timeout=UI_TIMEOUT)
            expect(panel.locator(".jp-AcpPanel-session.jp-mod-current")).to_have_count(1)
            session_tokens = panel.get_by_test_id("acp-session-tokens")
            assert _tokens(session_tokens.inner_text()) == 0
            shot(page, "1-session-ready")

            # chat: the reply streams in as Markdown
            composer = panel.locator("textarea.jp-AcpPanel-input")
            composer.fill("hello from the browser test")
            composer.press("Enter")
            expect(panel.locator(".jp-AcpMsg-user")).to_have_text("hello from the browser test")
            reply = panel.locator(".jp-AcpMsg-agent").last
            expect(reply).to_contain_text("heard 5 words: hello from the browser test", timeout=UI_TIMEOUT)
            expect(panel.locator(".jp-AcpTurn")).to_have_count(1, timeout=UI_TIMEOUT)
            expect(status).to_contain_text("ready")
            after_chat = _tokens(session_tokens.inner_text())
            assert after_chat > 0, "the session token counter did not move after a turn"
            shot(page, "2-streamed-reply")

            # a file write: the agent asks, the panel shows its options, we allow
            composer.fill("/write hello.txt hi")
            composer.press("Enter")
            prompt = panel.locator(".jp-AcpPermission.jp-mod-pending")
            expect(prompt).to_be_visible(timeout=UI_TIMEOUT)
            expect(prompt).to_contain_text("hello.txt")
            expect(prompt.locator("button")).to_have_text(["Allow", "Reject"])
            shot(page, "3-permission-request")
            prompt.get_by_role("button", name="Allow").click()
            done = panel.locator(".jp-AcpPermission-done")
            expect(done).to_have_text("Answered: Allow", timeout=UI_TIMEOUT)
            expect(panel.locator(".jp-AcpTurn")).to_have_count(2, timeout=UI_TIMEOUT)
            assert (Path(lab_server["root"]) / "hello.txt").read_text().strip() == "hi"
            card = panel.locator(".jp-AcpTool").last
            expect(card.locator(".jp-AcpTool-status")).to_have_text("done")
            expect(card.locator(".jp-AcpDiff-path")).to_have_text("hello.txt")  # relative to the workspace
            expect(card.locator(".jp-AcpDiff-add")).to_have_text("+ hi")

            # the file browser shows the new file (the panel refreshes it when a turn ends)
            page.locator('.jp-SideBar [data-id="filebrowser"]').click()
            listing = page.locator(".jp-DirListing-content")
            expect(listing.locator(".jp-DirListing-itemText", has_text="hello.txt")).to_be_visible(
                timeout=UI_TIMEOUT)
            shot(page, "4-file-in-browser")

            # the counters moved: this session's and today's (from GET usage)
            show_panel()
            expect(session_tokens).not_to_have_text(f"{after_chat:,} tokens", timeout=UI_TIMEOUT)
            session_total = _tokens(session_tokens.inner_text())
            assert session_total > after_chat
            server_total = _api(lab_server, "sessions")["sessions"][0]["tokens"]["total_tokens"]
            assert session_total == server_total, "the panel's session counter disagrees with the server"
            unchanged = re.compile(rf"Today: {today_before:,} tokens?$")
            expect(usage).not_to_have_text(unchanged, timeout=UI_TIMEOUT)
            assert _tokens(usage.inner_text()) == _api(lab_server, "usage")["today"]["total_tokens"]
            assert _tokens(usage.inner_text()) > today_before
            shot(page, "5-token-counters")

            # "Send selection / cell to agent" from the context menu of an editor and of a notebook
            root = Path(lab_server["root"])
            (root / "snippet.py").write_text("print('from the editor')\n")
            (root / "nb.ipynb").write_text(json.dumps(NOTEBOOK))
            send_from(page, "snippet.py", ".jp-FileEditor .cm-content")
            expect(panel.locator(".jp-AcpMsg-user").last).to_contain_text(
                "Here is the content of `snippet.py`:", timeout=UI_TIMEOUT)
            expect(panel.locator(".jp-AcpMsg-user").last).to_contain_text("print('from the editor')")
            expect(panel.locator(".jp-AcpTurn")).to_have_count(3, timeout=UI_TIMEOUT)
            send_from(page, "nb.ipynb", ".jp-Notebook .jp-Cell .cm-content")
            expect(panel.locator(".jp-AcpMsg-user").last).to_contain_text(
                "Here is cell 1 of `nb.ipynb`:", timeout=UI_TIMEOUT)
            expect(panel.locator(".jp-AcpMsg-user").last).to_contain_text("answer = 41 + 1")
            expect(panel.locator(".jp-AcpTurn")).to_have_count(4, timeout=UI_TIMEOUT)
            shot(page, "6-sent-from-notebook")

            # cancel a long turn from the panel, then switch the mode
            show_panel()
            composer.fill("/sleep 60")
            composer.press("Enter")
            cancel = panel.get_by_role("button", name="Cancel")
            expect(cancel).to_be_enabled(timeout=UI_TIMEOUT)
            cancel.click()
            ended = panel.locator(".jp-AcpTurn").last
            expect(ended).to_contain_text("Turn ended: cancelled", timeout=UI_TIMEOUT)
            session_id = _api(lab_server, "sessions")["sessions"][0]["id"]
            panel.locator("select.jp-AcpPanel-mode").select_option("yolo")
            deadline = time.monotonic() + 30
            while _api(lab_server, f"sessions/{session_id}/mode")["current"] != "yolo":
                assert time.monotonic() < deadline, "the mode switch did not reach the agent"
                time.sleep(0.2)

            # a dropped socket reconnects with ?since= and replays only what it missed
            before = panel.locator(".jp-AcpMsg").count()
            connected = len(sockets)
            sockets[-1].close(code=1011, reason="test drops the connection")
            deadline = time.monotonic() + 30
            while len(sockets) == connected:
                assert time.monotonic() < deadline, "the panel did not reconnect"
                page.wait_for_timeout(100)
            assert re.search(r"[?&]since=[1-9]\d*", sockets[-1].url), sockets[-1].url
            expect(status).to_contain_text("ready", timeout=UI_TIMEOUT)
            assert panel.locator(".jp-AcpMsg").count() == before  # nothing shown twice
            composer.fill("still there")
            composer.press("Enter")
            expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text("heard 2 words: still there",
                                                                           timeout=UI_TIMEOUT)

            # a reload comes back to the live session and replays its history into the same view
            page.reload()
            show_panel()  # (JupyterLab restores the open sidebar tab itself, usually)
            expect(panel.locator(".jp-AcpMsg-user")).to_have_count(6, timeout=UI_TIMEOUT)
            expect(panel.locator("select.jp-AcpPanel-mode")).to_have_value("yolo")
            expect(panel.locator(".jp-AcpPermission-done")).to_have_text("Answered: Allow")
            server_total = _api(lab_server, "sessions")["sessions"][0]["tokens"]["total_tokens"]
            expect(session_tokens).to_have_text(f"{server_total:,} tokens")
            shot(page, "7-replayed-after-reload")

            # the session is ended elsewhere (e.g. %acp stop): the chat says so once, and the
            # panel does not reconnect (the server's close code 4404, not an HTTP 404)
            connected = len(sockets)
            _api(lab_server, f"sessions/{session_id}", method="DELETE")
            gone = panel.locator(".jp-AcpMsg-error", has_text="The session has ended")
            expect(gone).to_have_count(1, timeout=UI_TIMEOUT)
            expect(status).to_contain_text("ended")
            page.wait_for_timeout(3000)  # a reconnect would come after 0.5 s
            assert len(sockets) == connected, [ws.url for ws in sockets[connected:]]
            expect(gone).to_have_count(1)
            shot(page, "8-session-ended")
            # typing again starts a new session
            composer.fill("a new start")
            composer.press("Enter")
            expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text("heard 3 words: a new start",
                                                                           timeout=UI_TIMEOUT)
            assert len(_api(lab_server, "sessions")["sessions"]) == 1
            assert not errors, f"errors in the page: {errors}"
        except BaseException:
            shot(page, "failure")
            print(Path(lab_server["log"]).read_text()[-4000:])
            raise
