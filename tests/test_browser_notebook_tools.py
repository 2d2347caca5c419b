"""The agent's notebook tools as a person sees them (issue 19), in a real JupyterLab and Chromium.

A notebook is open in JupyterLab (a live collaboration room, its kernel running). In the
sidebar the demo agent is asked ``/nb insert_cell …``: the tool card gets a readable title and
the cell's diff, and the cell appears in the open notebook at once (no reload). Undo on the card
takes it out again and marks the edit undone. Then ``/nb run_cell …``: the server's permission
card shows the code to run, and once approved the output appears in the notebook's cell, on the
card, and in the agent's reply. Last, the agent replaces the cell's source and the person edits
it too: Undo is refused (409) and the card says why.

Screenshots of each step are saved under pytest's ``tmp_path`` (their paths are printed).
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from browser import UI_TIMEOUT, LabServer, Screenshots, chromium, kernel_ready, open_panel, require_playwright

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(420)]

NOTEBOOK = "nb.ipynb"


def edits(server: LabServer, sid: str) -> list[dict[str, Any]]:
    """The session's ``notebook:edit`` records so far (from its history)."""
    events = server.api(f"sessions/{sid}/history")["events"]
    return [e["data"] for e in events if e["type"] == "notebook:edit"]


def wait_for(check: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.2)


def asking(panel: Any, text: str) -> Any:
    """The pending permission card that says ``text`` (once it is there)."""
    from playwright.sync_api import expect

    card = panel.locator(".jp-AcpPermission.jp-mod-pending").filter(has_text=text)
    expect(card).to_have_count(1, timeout=UI_TIMEOUT)
    return card


def test_notebook_tools_edit_the_open_notebook_live(tmp_path: Path) -> None:
    sync_playwright = require_playwright()
    from playwright.sync_api import expect

    shot = Screenshots(tmp_path)
    # (the collaboration's stores in the test's directory, not the user's)
    server = LabServer(tmp_path, [f"--SQLiteYStore.db_path={tmp_path / 'ystore.db'}",
                                  f"--BaseFileIdManager.db_path={tmp_path / 'fileid.db'}",
                                  "--YDocExtension.document_save_delay=0.2"])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Notes")])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, server.root / NOTEBOOK)
    server.start()
    try:
        with sync_playwright() as pw, chromium(pw) as (page, errors):
            try:
                started = time.monotonic()
                page.goto(f"{server.url}lab/tree/{NOTEBOOK}?token={server.token}")
                cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
                # (twice the usual patience for the first load: JupyterLab, the notebook's room and
                # its kernel, which in full CI runs took up to about a minute, alone 5 s)
                expect(cells).to_have_count(1, timeout=2 * UI_TIMEOUT)
                print(f"the notebook shown {time.monotonic() - started:.1f} s after the page load began")
                kernel_ready(server, NOTEBOOK)
                print(f"its kernel ready at {time.monotonic() - started:.1f} s")

                panel = open_panel(page, timeout=2 * UI_TIMEOUT)
                agent = panel.locator("select.jp-AcpPanel-agent")
                expect(agent.locator('option[value="demo"]')).to_have_count(1, timeout=UI_TIMEOUT)
                agent.select_option("demo")
                panel.get_by_role("button", name="New session").click()
                expect(panel.locator(".jp-AcpPanel-status")).to_contain_text("ready", timeout=UI_TIMEOUT)
                sid = server.api("sessions")["sessions"][0]["id"]
                composer = panel.locator("textarea.jp-AcpPanel-input")

                # insert a cell (the agent's own ask for an edit is the server's to answer: no card)
                args = {"path": NOTEBOOK, "index": 0, "cell_type": "code", "source": "1+1"}
                print(f"a session ready at {time.monotonic() - started:.1f} s")
                composer.fill(f"/nb insert_cell {json.dumps(args)}")
                composer.press("Enter")
                title = "Insert a code cell into nb.ipynb"
                card = panel.locator(".jp-AcpTool").filter(
                    has=page.locator(".jp-AcpTool-title", has_text=title))
                expect(card).to_have_count(1, timeout=UI_TIMEOUT)
                expect(card).to_have_class(re.compile("jp-AcpTool-completed"), timeout=UI_TIMEOUT)
                edit = card.locator('.jp-AcpNbEdit[data-tool="insert_cell"]')
                expect(edit).to_have_count(1, timeout=UI_TIMEOUT)  # (on the card: its output names it)
                expect(edit.locator(".jp-AcpNbEdit-title")).to_contain_text("Inserted code cell")
                expect(edit.locator(".jp-AcpDiff-add")).to_have_text(["+ 1+1"])
                # … and in the open notebook, live
                expect(cells).to_have_count(2, timeout=UI_TIMEOUT)
                expect(cells.first.locator(".cm-content")).to_have_text("1+1")
                expect(panel.locator(".jp-AcpTurn")).to_have_count(1, timeout=UI_TIMEOUT)
                print(f"the first edit shown at {time.monotonic() - started:.1f} s")
                shot(page, "2-inserted")

                # undo it from the card: the cell goes, the edit says "Undone"
                edit.get_by_role("button", name="Undo").click()
                expect(edit.locator(".jp-AcpNbEdit-undone")).to_have_text("Undone", timeout=UI_TIMEOUT)
                expect(edit).to_have_class(re.compile("jp-mod-undone"))
                expect(edit.get_by_role("button", name="Undo")).to_have_count(0)
                expect(cells).to_have_count(1, timeout=UI_TIMEOUT)
                expect(panel.locator('.jp-AcpNbEdit[data-tool="undo"]')).to_have_count(1)
                shot(page, "3-undone")

                # run a cell in the user's kernel: the server asks, showing the code
                args = {"path": NOTEBOOK, "index": 1, "cell_type": "code", "source": "print(6 * 7)"}
                composer.fill(f"/nb insert_cell {json.dumps(args)}")
                composer.press("Enter")
                expect(cells).to_have_count(2, timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpTurn")).to_have_count(2, timeout=UI_TIMEOUT)
                cell_id = [e for e in edits(server, sid) if e["tool"] == "insert_cell"][-1]["cell_id"]
                run = {"path": NOTEBOOK, "cell_id": cell_id}
                composer.fill(f"/nb run_cell {json.dumps(run)}")
                composer.press("Enter")
                ask = asking(panel, "Run a cell of nb.ipynb in your kernel")
                expect(ask.locator("pre.jp-AcpPermission-code")).to_have_text("print(6 * 7)")
                shot(page, "4-run-asks")
                ask.get_by_role("button", name="Run in my kernel").click()
                output = cells.nth(1).locator(".jp-OutputArea-output")
                expect(output).to_contain_text("42", timeout=UI_TIMEOUT)
                ran = panel.locator('.jp-AcpNbEdit[data-tool="run_cell"]')
                expect(ran).to_have_count(1, timeout=UI_TIMEOUT)
                expect(ran.locator(".jp-AcpNbEdit-outputs")).to_contain_text("42")
                expect(panel.locator(".jp-AcpTurn")).to_have_count(3, timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text("42")
                shot(page, "5-ran")

                # the agent edits that cell, then the person too: its undo is refused (409), said why
                change = {"path": NOTEBOOK, "cell_id": cell_id, "source": "print(6 * 8)"}
                composer.fill(f"/nb replace_cell {json.dumps(change)}")
                composer.press("Enter")
                replaced = panel.locator('.jp-AcpNbEdit[data-tool="replace_cell"]')
                expect(replaced.locator(".jp-AcpDiff-del")).to_have_text(["- print(6 * 7)"],
                                                                         timeout=UI_TIMEOUT)
                expect(replaced.locator(".jp-AcpDiff-add")).to_have_text(["+ print(6 * 8)"])
                editor = cells.nth(1).locator(".cm-content")
                expect(editor).to_have_text("print(6 * 8)", timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpTurn")).to_have_count(4, timeout=UI_TIMEOUT)
                editor.click()
                page.keyboard.press("End")
                page.keyboard.type("  # mine")
                # the room saves it (no Ctrl+S: JupyterLab would see the room's own saves as a
                # change on disk and ask): once the file has it, the server's room has it
                wait_for(lambda: "# mine" in (server.root / NOTEBOOK).read_text(), "the save")
                replaced.get_by_role("button", name="Undo").click()
                refused = replaced.locator(".jp-AcpNbEdit-error")
                expect(refused).to_be_visible(timeout=UI_TIMEOUT)
                assert refused.inner_text().strip(), "the 409's message is shown"
                expect(replaced.locator(".jp-AcpNbEdit-undone")).to_have_count(0)
                expect(replaced.get_by_role("button", name="Undo")).to_be_enabled()
                expect(editor).to_have_text("print(6 * 8)  # mine")
                shot(page, "6-undo-refused")
                expect(panel.locator(".jp-AcpPermission")).to_have_count(1)  # (only the run asked)
                assert errors == []
            except Exception:
                shot(page, "failure")
                for session in server.api("sessions")["sessions"]:  # (what the sidebar was given)
                    for event in server.api(f"sessions/{session['id']}/history")["events"]:
                        print(json.dumps(event)[:400])
                raise
    finally:
        server.stop()
