"""Sessions that outlive the server, in the sidebar (issue 18), driven in a real Chromium.

What a person does: chat with the demo agent (two turns), the Jupyter server is stopped and
started again (same config, data and runtime directories, same port), they reload the page and
find the old session in the sidebar's list as suspended; they reopen it (its transcript is
there), pick ``/recall`` from the slash-command completion (the agent has its context back: the
reply names the earlier prompts), mention a file picked from the ``@`` completion (the agent
gets it as a resource), paste an image (a thumbnail first, then the agent gets it), switch the
model (the next reply says so), close the session from the list and type on in it (it is
resumed again), then delete it.

Screenshots of each step are saved under pytest's ``tmp_path`` (their paths are printed).
"""

from __future__ import annotations

import base64
import re
import time
from pathlib import Path

import pytest
from browser import UI_TIMEOUT, LabServer, Screenshots, chromium, open_panel, require_playwright

pytestmark = [pytest.mark.browser, pytest.mark.slow, pytest.mark.timeout(420)]

# a 1x1 PNG (what a paste of a screenshot would bring, only smaller)
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")

# Records every (disabled, placeholder) the chat input goes through, to show that it was off
# ("starting…" / "resuming…") while a session was being created or resumed.
WATCH_INPUT = """() => {
  const input = document.querySelector('#jupyter-acp-panel textarea.jp-AcpPanel-input');
  window.__acpInput = [];
  new MutationObserver(() => window.__acpInput.push([input.disabled, input.placeholder]))
    .observe(input, { attributes: true, attributeFilter: ['disabled', 'placeholder'] });
}"""

PASTE_IMAGE = """async (b64) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], 'dot.png', { type: 'image/png' }));
  const input = document.querySelector('#jupyter-acp-panel textarea.jp-AcpPanel-input');
  input.dispatchEvent(new ClipboardEvent('paste', { clipboardData: data, bubbles: true, cancelable: true }));
}"""


def test_sessions_survive_a_restart_and_the_composer_completes(tmp_path: Path) -> None:
    sync_playwright = require_playwright()
    from playwright.sync_api import expect

    shot = Screenshots(tmp_path)
    server = LabServer(tmp_path)
    server.start()
    try:
        with sync_playwright() as pw, chromium(pw) as (page, errors):
            try:
                panel = open_panel(page, server.info())
                agent = panel.locator("select.jp-AcpPanel-agent")
                expect(agent.locator('option[value="demo"]')).to_have_count(1, timeout=UI_TIMEOUT)
                agent.select_option("demo")
                # no session yet: no model choice (the hidden attribute really hides it)
                expect(panel.locator(".jp-AcpPanel-modelLabel")).to_be_hidden()

                # a new session: the input is off ("starting…") until it exists
                page.evaluate(WATCH_INPUT)
                panel.get_by_role("button", name="New session").click()
                status = panel.locator(".jp-AcpPanel-status")
                expect(status).to_contain_text("ready", timeout=UI_TIMEOUT)
                seen = page.evaluate("window.__acpInput")
                assert [True, "starting…"] in seen, seen
                composer = panel.locator("textarea.jp-AcpPanel-input")
                expect(composer).to_be_enabled()

                # two turns
                for n, text in enumerate(["first prompt alpha", "second prompt beta"], start=1):
                    composer.fill(text)
                    composer.press("Enter")
                    expect(panel.locator(".jp-AcpTurn")).to_have_count(n, timeout=UI_TIMEOUT)
                    expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text(
                        f"heard 3 words: {text}")
                sessions = server.api("sessions")["sessions"]
                assert len(sessions) == 1
                sid = sessions[0]["id"]
                item = panel.locator(f'.jp-AcpPanel-session[data-session-id="{sid}"]')
                expect(item.locator(".jp-AcpPanel-sessionTitle")).to_have_text("first prompt alpha",
                                                                               timeout=UI_TIMEOUT)
                expect(item).to_have_attribute("data-state", "ready")
                shot(page, "1-two-turns")

                # the Jupyter server stops and starts again (same directories, same port)
                history_before = server.api(f"sessions/{sid}/history")["events"]
                server.stop()
                server.start()
                listed = {s["id"]: s for s in server.api("sessions")["sessions"]}
                assert listed[sid]["state"] == "suspended", listed
                assert listed[sid]["resumable"] is True

                page.reload()
                panel = open_panel(page)
                item = panel.locator(f'.jp-AcpPanel-session[data-session-id="{sid}"]')
                expect(item).to_have_attribute("data-state", "suspended", timeout=UI_TIMEOUT)
                expect(item.locator(".jp-AcpPanel-sessionTitle")).to_have_text("first prompt alpha")
                expect(item.locator(".jp-AcpPanel-sessionAgent")).to_contain_text("Demo")
                expect(item.locator(".jp-AcpPanel-sessionTime")).to_have_text(
                    re.compile(r"just now|min ago"))
                expect(panel.locator(".jp-AcpMsg")).to_have_count(0)  # a suspended one is not auto-opened
                expect(panel.locator(".jp-AcpPanel-modelLabel")).to_be_hidden()
                shot(page, "2-listed-after-restart")

                # reopen it: resumed ("resuming…" meanwhile), its transcript is shown
                page.evaluate(WATCH_INPUT)
                item.locator(".jp-AcpPanel-sessionOpen").click()
                users = panel.locator(".jp-AcpMsg-user")
                expect(users).to_have_text(["first prompt alpha", "second prompt beta"], timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpMsg-agent")).to_have_count(2)
                status = panel.locator(".jp-AcpPanel-status")
                expect(status).to_contain_text("ready", timeout=UI_TIMEOUT)
                expect(item).to_have_attribute("data-state", re.compile("ready|busy"), timeout=UI_TIMEOUT)
                assert [True, "resuming…"] in page.evaluate("window.__acpInput")
                composer = panel.locator("textarea.jp-AcpPanel-input")
                expect(composer).to_be_enabled()
                shot(page, "3-reopened")

                # a slash command chosen from the completion: the agent has its context back
                composer.click()
                composer.press_sequentially("/rec")
                completer = panel.locator(".jp-AcpCompleter")
                recall = completer.locator('.jp-AcpCompleter-item[data-value="recall"]')
                expect(recall).to_be_visible(timeout=UI_TIMEOUT)
                expect(recall).to_contain_text("/recall")
                shot(page, "4-slash-completion")
                composer.press("Tab")
                expect(composer).to_have_value("/recall ")
                expect(completer).to_be_hidden()
                composer.press("Enter")
                expect(panel.locator(".jp-AcpTurn")).to_have_count(3, timeout=UI_TIMEOUT)
                reply = panel.locator(".jp-AcpMsg-agent").last
                expect(reply).to_contain_text("Demo agent remembers:")
                expect(reply).to_contain_text("first prompt alpha")
                expect(reply).to_contain_text("second prompt beta")
                # one history across the restart and the resume: the old events as they were,
                # the new ones after them (seq numbers go on)
                seqs = [e["seq"] for e in server.api(f"sessions/{sid}/history")["events"]]
                assert seqs == sorted(set(seqs)), seqs
                assert seqs[:len(history_before)] == [e["seq"] for e in history_before]
                assert seqs[-1] > history_before[-1]["seq"]
                expect(users).to_have_count(3)  # (the transcript is not shown twice)
                shot(page, "5-recall")

                # an @file mention chosen from the completion: the agent gets the file
                (server.root / "notes.txt").write_text("twelve bytes")
                composer.press_sequentially("what is in @no")
                notes = completer.locator('.jp-AcpCompleter-item[data-value="notes.txt"]')
                expect(notes).to_be_visible(timeout=UI_TIMEOUT)
                shot(page, "6-file-completion")
                composer.press("Enter")  # (Enter picks too)
                expect(composer).to_have_value("what is in @notes.txt ")
                composer.press("Enter")
                expect(panel.locator(".jp-AcpTurn")).to_have_count(4, timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text(
                    "Demo agent got file notes.txt (12 bytes)")
                chip = users.last.locator(".jp-AcpChip")
                expect(chip).to_have_count(1)
                expect(chip).to_contain_text("notes.txt")
                shot(page, "7-file-mention")

                # an image pasted in: a thumbnail first, then it goes with the message
                page.evaluate(PASTE_IMAGE, base64.b64encode(PNG).decode())
                thumb = panel.locator(".jp-AcpThumb img")
                expect(thumb).to_have_count(1, timeout=UI_TIMEOUT)
                shot(page, "8-image-thumbnail")
                composer.fill("what is this")
                composer.press("Enter")
                expect(panel.locator(".jp-AcpTurn")).to_have_count(5, timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text(
                    f"Demo agent got image image/png ({len(PNG)} bytes)")
                expect(thumb).to_have_count(0)

                # the model: a selector from the session's models; the next reply uses it
                model = panel.locator("select.jp-AcpPanel-model")
                expect(model).to_be_visible()
                expect(model).to_have_value("demo-small")
                model.select_option("demo-large")
                deadline = time.monotonic() + 30
                while server.api(f"sessions/{sid}/model")["current"] != "demo-large":
                    assert time.monotonic() < deadline, "the model switch did not reach the agent"
                    time.sleep(0.2)
                composer.fill("and now")
                composer.press("Enter")
                expect(panel.locator(".jp-AcpTurn")).to_have_count(6, timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpMsg-agent").last).to_have_text(
                    re.compile(r"^\[demo-large\] Demo agent \(no LLM\) heard 2 words: and now"))
                expect(model).to_have_value("demo-large")
                shot(page, "9-model-switched")

                # Close (suspend) from the list, then Delete (after a confirmation): forgotten
                item.locator(".jp-AcpPanel-sessionClose").click()
                expect(item).to_have_attribute("data-state", "suspended", timeout=UI_TIMEOUT)
                assert server.api(f"sessions/{sid}")["state"] == "suspended"
                expect(status).to_contain_text("suspended")  # (not "ended": it goes on when one types)
                expect(panel.locator(".jp-AcpMsg-error")).to_have_count(0)
                shot(page, "10-closed")
                # typing in a closed session goes on in it (resumed), not in a new one
                turns = panel.locator(".jp-AcpTurn").count()
                composer.fill("back again")
                composer.press("Enter")
                expect(panel.locator(".jp-AcpMsg-agent").last).to_contain_text("heard 2 words: back again",
                                                                               timeout=UI_TIMEOUT)
                expect(panel.locator(".jp-AcpTurn")).to_have_count(turns + 1)
                expect(item).to_have_attribute("data-state", re.compile("ready|busy"), timeout=UI_TIMEOUT)
                assert [s["id"] for s in server.api("sessions")["sessions"]] == [sid]
                item.locator(".jp-AcpPanel-sessionDelete").click()
                dialog = page.locator(".jp-Dialog")
                expect(dialog).to_contain_text("Delete this session?")
                dialog.get_by_role("button", name="Delete").click()
                expect(item).to_have_count(0, timeout=UI_TIMEOUT)
                assert server.api("sessions")["sessions"] == []
                shot(page, "11-deleted")
                assert not errors, f"errors in the page: {errors}"
            except BaseException:
                shot(page, "failure")
                print(server.tail())
                raise
    finally:
        server.stop()
