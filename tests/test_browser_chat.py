"""The sidebar's chat as people use it (issue 20), in a real Chromium against a real JupyterLab
with the demo agent: Markdown through JupyterLab's renderers (a table, LaTeX, a highlighted code
block, sanitized), a 2,000-chunk reply that leaves the rest of the chat alone (a selection, an
open ``<details>``, the earlier items' nodes), a two-hunk diff, a code block inserted into a
notebook cell, the settings (send key), the sidebar restored after a reload, "New session"
feedback, the mode selector of an agent without modes, and a tool card with terminal output.

One JupyterLab serves the whole module (a fresh page and a new session per test), to keep the
file's time modest. Screenshots are saved under each test's ``tmp_path``; with
``ACP_SCREENSHOTS_OUT`` set, ``sidebar-markdown.png`` and ``sidebar-diff.png`` (the sidebar
alone) are written there too, for the README.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import UI_TIMEOUT, LabServer, Screenshots, chromium, open_panel, require_playwright

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(420)]

#: a second demo agent whose sessions have no modes (its mode selector must not show)
NO_MODES = {"nomodes": {"display_name": "Demo agent without modes", "demo": True,
                        "command": [sys.executable, "-m", "jupyter_acp.agents_builtin.demo", "--no-modes"]}}

MARKDOWN = "\n".join([
    "## Results", "",
    "| name | value |", "| --- | --- |", "| alpha | 1 |", "| beta | 2 |", "",
    "Euler: $e^{i\\pi}+1=0$", "",
    "$$\\int_0^1 x\\,dx = \\frac{1}{2}$$", "",
    "```python", "def double(x):", "    return 2 * x", "```", "",
    "<img src=x onerror=alert(1)> after the image",
])

CODE = "print('from the agent')"

NOTEBOOK = {
    "cells": [{"cell_type": "code", "execution_count": None, "id": "c1", "metadata": {}, "outputs": [],
               "source": "x = 1"}],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4, "nbformat_minor": 5,
}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    server = LabServer(tmp_path_factory.mktemp("chat"), [
        f"--AgentConfigManager.agents={NO_MODES!r}",
        "--UserSessionManager.max_sessions_per_user=0",
        "--UserSessionManager.allow_unsandboxed_terminals=True",  # /shell (a local terminal)
    ])
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser_page(lab: LabServer) -> Iterator[tuple[Any, list[str]]]:
    """A fresh Chromium page (no JupyterLab loaded yet) and the errors and dialogs seen in it."""
    sync_playwright = require_playwright()
    with sync_playwright() as pw, chromium(pw) as (page, errors):
        page.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
        yield page, errors
        assert not errors, errors


def docs_shot(panel: Any, name: str) -> None:
    """The sidebar alone, for the README, when ``ACP_SCREENSHOTS_OUT`` is set."""
    out = os.environ.get("ACP_SCREENSHOTS_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        panel.screenshot(path=str(Path(out) / name))


def new_session(panel: Any, agent: str = "demo") -> str:
    """Start a session of ``agent`` from the sidebar; its id once it is ready."""
    from playwright.sync_api import expect

    select = panel.locator("select.jp-AcpPanel-agent")
    expect(select.locator(f'option[value="{agent}"]')).to_have_count(1, timeout=UI_TIMEOUT)
    select.select_option(agent)
    current = panel.locator(".jp-AcpPanel-session.jp-mod-current")
    old = current.get_attribute("data-session-id") if current.count() else None
    panel.get_by_role("button", name="New session", exact=True).click()
    if old is not None:
        expect(current).not_to_have_attribute("data-session-id", old, timeout=UI_TIMEOUT)
    expect(current).to_have_count(1, timeout=UI_TIMEOUT)
    expect(panel.locator(".jp-AcpPanel-status")).to_contain_text("ready", timeout=UI_TIMEOUT)
    expect(panel.locator("textarea.jp-AcpPanel-input")).to_be_enabled(timeout=UI_TIMEOUT)
    sid = current.get_attribute("data-session-id")
    assert sid
    return sid


def turns(panel: Any) -> Any:
    return panel.locator(".jp-AcpTurn:not(.jp-AcpNotice)")


def say(panel: Any, text: str, allow: bool = False) -> None:
    """Send ``text`` from the composer (allowing the agent's permission request if asked) and
    wait for the turn's footer."""
    from playwright.sync_api import expect

    before = turns(panel).count()
    composer = panel.locator("textarea.jp-AcpPanel-input")
    composer.fill(text)
    composer.press("Enter")
    if allow:
        prompt = panel.locator(".jp-AcpPermission.jp-mod-pending")
        expect(prompt).to_be_visible(timeout=UI_TIMEOUT)
        prompt.get_by_role("button", name="Allow").click()
    expect(turns(panel)).to_have_count(before + 1, timeout=UI_TIMEOUT)


def test_markdown_table_latex_and_highlighted_code(lab: LabServer, browser_page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    panel = open_panel(page, lab.info())
    new_session(panel)
    # the demo has modes: its selector shows (the agent without modes: see below)
    expect(panel.locator(".jp-AcpPanel-modeLabel:not(.jp-AcpPanel-modelLabel)")).to_be_visible()
    say(panel, "/echo\n" + MARKDOWN)
    reply = panel.locator(".jp-AcpMsg-agent").last
    expect(reply.locator("table tr")).to_have_count(3, timeout=UI_TIMEOUT)
    expect(reply.locator("table td").first).to_have_text("alpha")
    expect(reply.locator("mjx-container")).to_have_count(2, timeout=UI_TIMEOUT)  # inline and display
    code = reply.locator("pre code").first
    expect(code).to_contain_text("def double(x):")
    expect(code.locator("span[class]").first).to_be_attached(timeout=UI_TIMEOUT)  # highlighted
    classes = code.locator("span[class]").evaluate_all("els => [...new Set(els.map(e => e.className))]")
    print(f"highlight classes: {classes}")
    expect(reply).to_contain_text("after the image")
    assert panel.locator("[onerror]").count() == 0  # the sanitizer took it out
    Screenshots(tmp_path)(page, "sidebar-markdown")
    docs_shot(panel, "sidebar-markdown.png")


#: Installed after the setup turns: select "heard" in an earlier reply, mark the nodes, and
#: watch every earlier item for mutations.
WATCH = r"""() => {
  const log = document.querySelector('#jupyter-acp-panel .jp-AcpPanel-log');
  const msg = [...log.querySelectorAll('.jp-AcpMsg-agent')].find(m => m.textContent.includes('heard'));
  const walker = document.createTreeWalker(msg, NodeFilter.SHOW_TEXT);
  let node;
  while ((node = walker.nextNode()) && !node.data.includes('heard')) {}
  const at = node.data.indexOf('heard');
  const range = document.createRange();
  range.setStart(node, at);
  range.setEnd(node, at + 'heard'.length);
  getSelection().removeAllRanges();
  getSelection().addRange(range);
  const card = log.querySelector('details.jp-AcpTool');
  for (const n of [msg, card, node]) n.__keep = 1;
  const items = [...log.children].filter(c => !c.matches('.jp-AcpPanel-working, .jp-AcpPanel-starting'));
  const seen = window.__acpSeen = [];
  const obs = window.__acpObs = new MutationObserver(rs => {
    for (const r of rs) seen.push(`${r.type} in ${r.target.nodeName}.${r.target.className || ''}`);
  });
  const all = {childList: true, subtree: true, attributes: true, characterData: true};
  for (const it of items) obs.observe(it, all);
  window.__acpKept = {msg, card, node, items};
  return {selected: getSelection().toString(), open: card.open, items: items.length};
}"""

CHECK = r"""() => {
  const seen = window.__acpSeen;
  for (const r of window.__acpObs.takeRecords()) seen.push(`${r.type} in ${r.target.nodeName}`);
  const {msg, card, node, items} = window.__acpKept;
  const log = document.querySelector('#jupyter-acp-panel .jp-AcpPanel-log');
  const now = [...log.querySelectorAll('.jp-AcpMsg-agent')].find(m => m.textContent.includes('heard'));
  return {selected: getSelection().toString(), open: card.open, sameMsg: now === msg && now.__keep === 1,
          connected: items.every(i => i.isConnected) && node.isConnected && card.isConnected,
          mutations: seen.slice(0, 20), count: seen.length};
}"""


def test_a_long_stream_leaves_the_rest_of_the_chat_alone(lab: LabServer, browser_page) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    panel = open_panel(page, lab.info())
    sid = new_session(panel)
    say(panel, "/write a.txt hello", allow=True)
    say(panel, "hello there")
    card = panel.locator("details.jp-AcpTool").first
    if not card.evaluate("d => d.open"):
        card.locator("summary").click()  # (the person opens it)
    before = page.evaluate(WATCH)
    assert before["selected"] == "heard" and before["open"] is True, before
    # sent through the API, not the composer: typing there would move the selection
    turns_before = turns(panel).count()
    lab.api(f"sessions/{sid}/messages", "POST", {"message": "/stream 2000"})
    expect(turns(panel)).to_have_count(turns_before + 1, timeout=UI_TIMEOUT)
    expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text("c1999", timeout=UI_TIMEOUT)
    after = page.evaluate(CHECK)
    assert after["selected"] == "heard", after
    assert after["open"] is True, after
    assert after["sameMsg"] and after["connected"], after
    assert after["count"] == 0, after  # no earlier item was touched


def test_a_two_hunk_edit_shows_two_hunks(lab: LabServer, browser_page, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    (lab.root / "f.txt").write_text("".join(f"line {i}\n" for i in range(1, 21)))
    panel = open_panel(page, lab.info())
    new_session(panel)
    say(panel, "/edit f.txt 3=THREE 17=SEVENTEEN", allow=True)
    card = panel.locator(".jp-AcpTool").last
    expect(card.locator(".jp-AcpDiff-hunk")).to_have_count(2, timeout=UI_TIMEOUT)
    expect(card.locator(".jp-AcpDiff-hunkHead")).to_have_text(["@@ -1,6 +1,6 @@", "@@ -14,7 +14,7 @@"])
    expect(card.locator(".jp-AcpDiff-del")).to_have_text(["- line 3", "- line 17"])
    expect(card.locator(".jp-AcpDiff-add")).to_have_text(["+ THREE", "+ SEVENTEEN"])
    expect(card.locator(".jp-AcpDiff-skip")).to_have_text(["⋯ 7 unchanged lines"])
    body = card.locator(".jp-AcpDiff").inner_text()
    for n in range(8, 13):
        assert f"line {n}\n" not in body + "\n", body  # the untouched middle is not shown
    assert (lab.root / "f.txt").read_text().splitlines()[16] == "SEVENTEEN"
    Screenshots(tmp_path)(page, "sidebar-diff")
    docs_shot(panel, "sidebar-diff.png")


def cell_sources(page: Any) -> list[str]:
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell .cm-content").evaluate_all(
        "els => els.map(e => e.cmView ? e.cmView.view.state.doc.toString() : e.innerText)")


def test_insert_a_code_block_into_a_notebook(lab: LabServer, browser_page) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    (lab.root / "insert.ipynb").write_text(json.dumps(NOTEBOOK))
    info = lab.info()
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=info["url"].rstrip("/"))
    page.goto(f"{info['url']}lab/tree/insert.ipynb?token={info['token']}")
    cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")
    expect(cells).to_have_count(1, timeout=UI_TIMEOUT)
    panel = open_panel(page)
    new_session(panel)
    say(panel, f"/echo\nHere:\n\n```python\n{CODE}\n```\n")
    bar = panel.locator(".jp-AcpMsg-agent").last.locator(".jp-AcpCode-toolbar").first
    expect(bar).to_be_visible(timeout=UI_TIMEOUT)

    bar.locator(".jp-AcpCode-button", has_text="Insert below").click()
    expect(cells).to_have_count(2, timeout=UI_TIMEOUT)
    assert cell_sources(page) == ["x = 1", CODE]

    cells.first.click()  # the first cell is the active one now
    bar.locator(".jp-AcpCode-button", has_text="Replace active cell").click()
    deadline = time.monotonic() + UI_TIMEOUT / 1000
    while cell_sources(page) != [CODE, CODE]:
        assert time.monotonic() < deadline, cell_sources(page)
        time.sleep(0.2)

    bar.locator(".jp-AcpCode-button", has_text="Copy").click()
    deadline = time.monotonic() + UI_TIMEOUT / 1000
    while page.evaluate("navigator.clipboard.readText()") != CODE:
        assert time.monotonic() < deadline, "Copy did not put the code in the clipboard"
        time.sleep(0.2)


def test_new_session_feedback_and_nothing_reaches_the_old_one(lab: LabServer, browser_page) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    panel = open_panel(page, lab.info())
    old = new_session(panel)
    say(panel, "first words")
    held: list[Any] = []

    def hold_creation(route: Any) -> None:
        if route.request.method == "POST":
            held.append(route)  # answered below, once the panel's "starting" state is checked
        else:
            route.continue_()

    page.route(re.compile(r"/api/acp/sessions(\?.*)?$"), hold_creation)
    panel.get_by_role("button", name="New session", exact=True).click()
    starting = panel.locator(".jp-AcpPanel-starting")
    expect(starting).to_be_visible(timeout=UI_TIMEOUT)
    expect(starting).to_contain_text("starting")
    expect(panel.locator(".jp-AcpMsg")).to_have_count(0)  # the old conversation went at once
    composer = panel.locator("textarea.jp-AcpPanel-input")
    expect(composer).to_be_disabled()  # nothing typed now can go anywhere
    expect(panel.locator(f'.jp-AcpPanel-session.jp-mod-current[data-session-id="{old}"]')).to_have_count(0)
    assert len(held) == 1
    held[0].continue_()
    page.unroute(re.compile(r"/api/acp/sessions(\?.*)?$"))
    current = panel.locator(".jp-AcpPanel-session.jp-mod-current")
    expect(current).to_have_count(1, timeout=UI_TIMEOUT)
    expect(current).not_to_have_attribute("data-session-id", old)
    expect(starting).to_be_hidden(timeout=UI_TIMEOUT)
    expect(composer).to_be_enabled(timeout=UI_TIMEOUT)
    say(panel, "second words")
    new = current.get_attribute("data-session-id")
    assert "second words" in json.dumps(lab.api(f"sessions/{new}/history")["events"])
    assert "second words" not in json.dumps(lab.api(f"sessions/{old}/history")["events"])


def test_the_mode_selector_hides_for_an_agent_without_modes(lab: LabServer, browser_page) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    panel = open_panel(page, lab.info())
    new_session(panel, "nomodes")
    say(panel, "anything")
    expect(panel.locator(".jp-AcpPanel-modeLabel:not(.jp-AcpPanel-modelLabel)")).to_be_hidden()
    expect(panel.locator("select.jp-AcpPanel-mode")).to_be_hidden()


def test_a_tool_card_shows_its_terminal_output(lab: LabServer, browser_page) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    panel = open_panel(page, lab.info())
    new_session(panel)
    say(panel, "/shell echo terminal-says-hi")
    card = panel.locator(".jp-AcpTool").last
    expect(card.locator(".jp-AcpTool-terminalOutput")).to_contain_text("terminal-says-hi", timeout=UI_TIMEOUT)
    expect(card).to_contain_text("exit code 0")


def put_settings(lab: LabServer, settings: dict[str, Any]) -> None:
    req = urllib.request.Request(
        f"{lab.url}lab/api/settings/jupyter-acp:plugin", method="PUT",
        data=json.dumps({"raw": json.dumps(settings)}).encode(),
        headers={"Authorization": f"token {lab.token}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status in (200, 204)


def saved_layout(lab: LabServer) -> str:
    req = urllib.request.Request(f"{lab.url}lab/api/workspaces/default",
                                 headers={"Authorization": f"token {lab.token}"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()
    except OSError:
        return ""


def test_send_key_setting_and_the_sidebar_restored_after_a_reload(lab: LabServer, browser_page) -> None:
    from playwright.sync_api import expect

    page, _ = browser_page
    info = lab.info()
    panel = open_panel(page, info)
    new_session(panel)
    say(panel, "before the reload")
    # the layout restorer saves the sidebar (the workspace is written a moment after a change)
    deadline = time.monotonic() + UI_TIMEOUT / 1000
    while "jupyter-acp-panel" not in saved_layout(lab):
        assert time.monotonic() < deadline, saved_layout(lab)
        time.sleep(0.5)
    put_settings(lab, {"sendKey": "Mod-Enter"})
    try:
        page.goto(f"{info['url']}lab?token={info['token']}")
        panel = page.locator("#jupyter-acp-panel")
        expect(panel).to_be_visible(timeout=UI_TIMEOUT)  # restored open, nobody clicked its tab
        expect(panel.locator(".jp-AcpMsg-user")).to_contain_text(["before the reload"], timeout=UI_TIMEOUT)
        composer = panel.locator("textarea.jp-AcpPanel-input")
        expect(composer).to_be_enabled(timeout=UI_TIMEOUT)
        expect(composer).to_have_attribute("placeholder", re.compile(r"(Ctrl|Cmd)\+Enter sends"))
        users = panel.locator(".jp-AcpMsg-user")
        count = users.count()
        composer.fill("sent with the modifier")
        composer.press("Enter")  # a new line, not a send
        expect(composer).to_have_value("sent with the modifier\n")
        assert users.count() == count
        composer.press("Control+Enter")
        expect(users).to_have_count(count + 1, timeout=UI_TIMEOUT)
        expect(users.last).to_contain_text("sent with the modifier")
        expect(composer).to_have_value("")
    finally:
        put_settings(lab, {})
