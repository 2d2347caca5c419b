"""The ``%acp`` magics and the ``ChatPanel`` widget, in-process, against a real server.

Outputs are captured with IPython's ``capture_output`` (stdout and rich display data); a kernel
interrupt is tested in a real kernel through nbclient."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import nbformat
import pytest
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.capture import capture_output
from kernel_server import TOKEN, server_for_kernels
from nbclient import NotebookClient

from jupyter_acp.kernel.api import AcpApi, AcpApiError, NoServerFound, ServerInfo, find_server
from jupyter_acp.kernel.widget import ChatPanel

pytestmark = pytest.mark.timeout(180)
ESM = Path(__file__).parents[1] / "jupyter_acp" / "kernel" / "chat_panel.js"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with server_for_kernels(tmp_path_factory.mktemp("magics")) as info:
        yield info


@pytest.fixture
def shell(server: dict, monkeypatch: pytest.MonkeyPatch) -> Any:
    """An IPython shell with the extension loaded, finding the server like a kernel does."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server["runtime"]))
    monkeypatch.setenv("JPY_PARENT_PID", str(os.getpid()))
    for name in ("JUPYTER_ACP_SERVER_URL", "JUPYTER_ACP_TOKEN", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "jupyter_acp")
    yield ip
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    for session in api.sessions():
        api.stop(session["id"])
    magics = ip.magics_manager.registry["AcpMagics"]
    magics.current, magics._api = None, None


def acp(ip: Any, line: str, cell: str | None = None) -> tuple[str, str]:
    """Run ``%acp line`` (or ``%%acp line`` with ``cell``): (stdout, the rich outputs' text)."""
    with capture_output() as cap:
        if cell is None:
            ip.run_line_magic("acp", line)
        else:
            ip.run_cell_magic("acp", line, cell)
    rich = "\n".join(str(v) for out in cap.outputs for k, v in out.data.items() if k != "text/plain")
    return cap.stdout, rich


def test_every_subcommand(shell: Any, server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out, rich = acp(shell, "agents")
    assert "| demo (default) | Demo agent (no LLM) | yes |" in rich and "no: 'qwen' is not installed" in rich
    out, _ = acp(shell, "start --agent demo --new")
    assert out.startswith("acp: using Demo agent (no LLM) — session ") and "local sandbox" in out
    first = shell.magics_manager.registry["AcpMagics"].current
    out, rich = acp(shell, "", "hello magic world")
    assert "heard 3 words: hello magic world" in rich and "end_turn · tokens:" in rich
    # a permission asked with an input box, answered "1" (the first option: allow)
    monkeypatch.setattr("builtins.input", lambda prompt: "1")
    acp(shell, "", "/write magic.txt from a magic")
    assert (server["root"] / "magic.txt").read_text() == "from a magic\n"
    acp(shell, "start --new")
    out, rich = acp(shell, "sessions")
    assert rich.count("| demo |") == 2 and "* " in rich
    out, _ = acp(shell, f"use {first[:6]}")
    assert out.strip() == f"acp: using session {first}"
    out, rich = acp(shell, "stats --plot")
    assert "| turns | 2 |" in rich and "<svg" in rich
    out, _ = acp(shell, "mode yolo")
    assert out.strip() == "acp: mode yolo (available: default, yolo)"
    out, _ = acp(shell, "cancel")
    assert out.strip() == "acp: no turn is running"
    out, rich = acp(shell, "usage")
    assert "| day (UTC) |" in rich and "tokens today (no daily quota)" in out
    out, _ = acp(shell, "stop")
    assert out.strip() == f"acp: stopped session {first}"
    out, _ = acp(shell, "stats")
    assert out.strip() == "acp: No session in use: %acp start first"


@pytest.mark.parametrize(("line", "words"), [
    ("start --agent nope", "acp: Unknown agent 'nope'; known agents:"),
    ("use 0000", "acp: No session '0000' of yours"),
    ("frobnicate", "acp: argument command: invalid choice: 'frobnicate'"),
    ("", "acp: Say what to do"),
    ("start --cwd ../..", "outside your workspace"),
])
def test_errors_are_one_line(shell: Any, line: str, words: str) -> None:
    out, rich = acp(shell, line)
    assert words in out and out.count("\n") == 1 and "Traceback" not in out + rich, out


def test_quota_exceeded_is_one_line(shell: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with server_for_kernels(tmp_path, "--UsageLedger.max_tokens_per_user_per_day=60") as small:
        monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(small["runtime"]))
        shell.magics_manager.registry["AcpMagics"]._api = None
        acp(shell, "start --agent demo --new")
        for _ in range(12):  # each turn costs ~10-30 tokens of the 60 allowed today
            out, _ = acp(shell, "", "spend some tokens on this prompt please")
            if out:
                break
        shell.magics_manager.registry["AcpMagics"]._api = None
    assert out.startswith("acp: Daily token quota used up") and out.count("\n") == 1


def test_no_server_found_is_one_line(shell: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("JPY_PARENT_PID")
    shell.magics_manager.registry["AcpMagics"]._api = None
    try:
        out, _ = acp(shell, "agents")
    finally:
        shell.magics_manager.registry["AcpMagics"]._api = None
    assert out.startswith("acp: No Jupyter server found") and out.count("\n") == 1
    monkeypatch.setenv("JPY_PARENT_PID", "1")  # a pid with no jpserver file: no guessing
    with pytest.raises(NoServerFound, match=r"jpserver-1\.json"):
        find_server()


def test_chat_panel_streams_and_answers_a_permission(server: dict) -> None:
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    panel = ChatPanel(agent="demo", api=api)
    sent: list[dict] = []
    panel.send = sent.append  # what would go to the front end
    assert panel.status == "ready" and panel.session_id
    panel._on_front_end(panel, {"type": "send", "text": "hello panel"}, [])
    panel._thread.join(30)
    assert panel.transcript[-1] == {"role": "agent", "text": "Demo agent (no LLM) heard 2 words: hello panel"}
    deltas = [m["text"] for m in sent if m["type"] == "delta"]
    assert len(deltas) > 3 and "".join(deltas) == panel.transcript[-1]["text"]  # only new text is sent
    assert panel.tokens == api.session(panel.session_id)["tokens"]["total_tokens"] > 0
    assert panel.status == "ready"
    # a permission request shows as pending; the front end's click answers it
    panel._on_front_end(panel, {"type": "send", "text": "/write panel.txt from the panel"}, [])
    deadline = time.time() + 20
    while not panel.pending and time.time() < deadline:
        time.sleep(0.05)
    request = panel.pending[0]
    allow = next(o["optionId"] for o in request["options"] if o["kind"] == "allow_once")
    click = {"type": "permission", "request_id": request["request_id"], "option_id": allow}
    panel._on_front_end(panel, click, [])
    panel._thread.join(30)
    assert (server["root"] / "panel.txt").read_text() == "from the panel\n"
    card = next(m for m in panel.transcript if m["role"] == "tool")
    assert card["status"] == "completed" and card["diffs"][0]["newText"] == "from the panel\n"
    assert panel.pending == [] and any(m["type"] == "tool" for m in sent)
    # a re-rendered view gets the transcript once
    panel._on_front_end(panel, {"type": "hello"}, [])
    assert sent[-1] == {"type": "snapshot", "messages": panel.transcript}
    api.stop(panel.session_id)


def test_chat_panel_reports_errors(server: dict) -> None:
    panel = ChatPanel(agent="no-such-agent", api=AcpApi(ServerInfo(server["url"], TOKEN)))
    assert panel.status == "error" and "no-such-agent" in panel.error
    with pytest.raises(AcpApiError) as e:
        AcpApi(ServerInfo(server["url"], "wrong-token")).sessions()
    assert e.value.status == 403


def test_the_esm_is_valid_javascript(tmp_path: Path) -> None:
    node = shutil.which("node")
    assert node, "node is needed to check the widget's JavaScript"
    module = tmp_path / "chat_panel.mjs"
    module.write_text(ESM.read_text())
    script = (f"import('{module.as_uri()}').then(m => {{"
              "if (typeof m.default.render !== 'function') throw new Error('no render');"
              "const html = m.renderMarkdown('**a** <b> `c`\\n\\n```py\\nx<1\\n```');"
              "console.log(JSON.stringify(html)); })")
    result = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    html = json.loads(result.stdout)
    assert "<strong>a</strong>" in html and "&lt;b&gt;" in html and "<code>c</code>" in html
    assert "<pre><code>x&lt;1\n</code></pre>" in html


def test_a_kernel_interrupt_cancels_the_turn(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server["runtime"]))
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("%load_ext jupyter_acp\n%acp start --agent demo --new"),
        nbformat.v4.new_code_cell("%%acp\n/sleep 60"),
    ])
    client = NotebookClient(nb, kernel_name="python3", timeout=60,
                            resources={"metadata": {"path": str(server["root"])}})
    api = AcpApi(ServerInfo(server["url"], TOKEN))

    def interrupt_when_busy() -> None:
        deadline = time.time() + 60
        while time.time() < deadline:
            if any(s["state"] == "busy" for s in api.sessions()):
                time.sleep(0.5)
                # what the notebook's stop button does: SIGINT to the kernel (ipykernel's mode)
                os.kill(client.km.provisioner.process.pid, signal.SIGINT)
                return
            time.sleep(0.1)

    threading.Thread(target=interrupt_when_busy, daemon=True).start()
    started = time.monotonic()
    client.execute()
    outputs = json.dumps(nb.cells[1].outputs)
    assert "cancelling the turn" in outputs and "cancelled \\u00b7 tokens" in outputs
    assert time.monotonic() - started < 45  # the 60 s sleep did not run out
