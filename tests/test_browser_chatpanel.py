"""``ChatPanel`` in a notebook in a real JupyterLab and Chromium (issue 20).

A notebook cell makes a ``ChatPanel(agent="demo")`` and sends ``/echo`` + a Markdown table: the
reply is an ipywidgets Output whose ``text/markdown`` JupyterLab renders with its own renderer,
so a real ``<table>`` shows inside the widget. Then a second table is asked for from the panel's
own input (the controls' Send: front end → kernel → Output). The screenshot ``chatpanel.png``
is copied to ``$ACP_SCREENSHOTS_OUT`` when that is set (the README's picture).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import nbformat
import pytest
from browser import UI_TIMEOUT, LabServer, Screenshots, chromium, kernel_ready, require_playwright

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(420)]

NOTEBOOK = "chat.ipynb"
SOURCE = """from jupyter_acp.kernel.widget import ChatPanel
panel = ChatPanel(agent="demo")
panel.send_prompt("/echo\\n| a | b |\\n|---|---|\\n| 1 | 2 |", wait=True)
panel"""


def test_chat_panel_renders_markdown_in_jupyterlab(tmp_path: Path) -> None:
    sync_playwright = require_playwright()
    from playwright.sync_api import expect

    shot = Screenshots(tmp_path)
    # (the collaboration's stores in the test's directory, not the user's)
    server = LabServer(tmp_path, [f"--SQLiteYStore.db_path={tmp_path / 'ystore.db'}",
                                  f"--BaseFileIdManager.db_path={tmp_path / 'fileid.db'}"])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(SOURCE)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, server.root / NOTEBOOK)
    server.start()
    try:
        with sync_playwright() as pw, chromium(pw) as (page, _errors):
            page.goto(f"{server.url}lab/tree/{NOTEBOOK}?token={server.token}")
            cell = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell").first
            expect(cell).to_be_visible(timeout=UI_TIMEOUT)
            expect(page.locator("#jupyterlab-splash")).to_have_count(0, timeout=UI_TIMEOUT)
            kernel_ready(server, NOTEBOOK)  # (before the cell runs)
            cell.locator(".cm-content").click()
            page.keyboard.press("Shift+Enter")

            widget = page.locator(".jp-NotebookPanel .acp-chat-panel")
            expect(widget).to_have_count(1, timeout=UI_TIMEOUT)
            expect(widget.locator(".acp-chat-controls .acp-status")).to_have_text("ready", timeout=UI_TIMEOUT)
            # the reply, rendered by JupyterLab's Markdown renderer inside the Output widget
            table = widget.locator(".acp-chat-log .jp-OutputArea-output table")
            expect(table).to_have_count(1, timeout=UI_TIMEOUT)
            expect(table.locator("tr")).to_have_count(2)
            expect(table.locator("th")).to_have_text(["a", "b"])
            expect(table.locator("td")).to_have_text(["1", "2"])
            expect(widget.locator(".acp-chat-log .jp-OutputArea-output em", has_text="end_turn · tokens")
                   ).to_have_count(1, timeout=UI_TIMEOUT)

            # a second table, asked from the panel's own input
            box = widget.locator(".acp-chat-controls textarea")
            # (with raw HTML: output in an Output widget is trusted, no sanitizer runs; the
            # kernel's Markdown carries none of the agent's)
            box.fill('/echo\n| x | y |\n|---|---|\n| 3 | 4 |\n\n<img src=x onerror="window.acpPwned=1">')
            widget.locator(".acp-chat-controls .acp-send").click()
            expect(table).to_have_count(2, timeout=UI_TIMEOUT)
            expect(table.nth(1).locator("td")).to_have_text(["3", "4"])
            expect(widget.locator(".acp-chat-controls .acp-status")).to_have_text("ready", timeout=UI_TIMEOUT)
            expect(widget.locator(".acp-chat-log").get_by_text('<img src=x onerror="window.acpPwned=1">')
                   ).to_have_count(2)  # (as text: in the prompt, and in the reply)
            assert widget.locator("img").count() == 0 and page.evaluate("window.acpPwned") is None
            # (JupyterLab's question about its news, over the notebook: answered)
            news = page.locator(".jp-toast-button", has_text="No")
            if news.count():
                news.first.click()
            widget.scroll_into_view_if_needed()
            shot(page, "chatpanel-page")
            cell.screenshot(path=str(shot.dir / "chatpanel.png"))  # (the README's: the cell alone)

            # a conversation taller than the log: it scrolls, and follows the reply to its end
            box.fill("/fill 8")
            widget.locator(".acp-chat-controls .acp-send").click()
            expect(widget.locator(".acp-chat-log .jp-OutputArea-output em", has_text="end_turn · tokens")
                   ).to_have_count(3, timeout=UI_TIMEOUT)
            geometry = """() => {
                const log = document.querySelector('.acp-chat-panel .acp-chat-log');
                return [log.scrollHeight, log.clientHeight, log.scrollTop, getComputedStyle(log).overflowY];
            }"""
            try:
                page.wait_for_function(f"""() => {{
                    const [height, client, top] = ({geometry})();
                    return height > client + 100 && height - top - client < 40;
                }}""", timeout=UI_TIMEOUT)
            except Exception:
                raise AssertionError(f"the log did not follow: {page.evaluate(geometry)}") from None
    finally:
        server.stop()
    out = os.environ.get("ACP_SCREENSHOTS_OUT")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot.dir / "chatpanel.png", Path(out) / "chatpanel.png")
