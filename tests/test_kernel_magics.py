"""The ``%acp`` magics and the ``ChatPanel`` widget, in-process, against a real server.

Outputs are captured with IPython's ``capture_output`` (stdout and rich display data); a kernel
interrupt is tested in a real kernel through nbclient."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket as stdsocket
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

from jupyter_acp.kernel.api import (
    RESUME_DELAYS,
    AcpApi,
    AcpApiError,
    NoServerFound,
    ServerInfo,
    SessionGone,
    find_server,
)
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


def test_a_failed_turn_returns_at_its_end_with_its_error(shell: Any, server: dict) -> None:
    """The server sends a turn's error before its chat:response: the client attaches it and
    returns at the chat:response (it used to wait up to 2 s for a late error)."""
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    sid = api.start("demo", new=True)["id"]
    seen: list[tuple[str, float]] = []
    result = api.stream(sid, "/fail", lambda frame: seen.append((frame["type"], time.monotonic())))
    returned = time.monotonic()
    kinds = [kind for kind, _ in seen]
    assert kinds.index("error") < kinds.index("chat:response") == len(kinds) - 1
    assert result["stop_reason"] == "error" and "failed on purpose" in result["error"]
    lag = returned - seen[-1][1]
    print(f"stream() returned {lag * 1000:.2f} ms after the chat:response of a failed turn")
    assert lag < 0.2
    # the magics show it under the turn, once
    shell.magics_manager.registry["AcpMagics"].current = sid
    started = time.monotonic()
    out, rich = acp(shell, "", "/fail")
    print(f"the %%acp cell of a failed turn took {(time.monotonic() - started) * 1000:.0f} ms")
    assert rich.count("**Error:**") == 1 and "failed on purpose" in rich and "Traceback" not in out


def test_a_turn_whose_socket_drops_resumes_without_loss(server: dict, monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    """Any close but 4404 (a network drop, a slow reader's 1013) resumes with ?since=."""
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    sockets: list[Any] = []
    real_connect = AcpApi._connect
    monkeypatch.setattr(AcpApi, "_connect", lambda self, sid, since: sockets.append(
        real_connect(self, sid, since)) or sockets[-1])
    sid = api.start("demo", new=True)["id"]
    seqs: list[int] = []

    def cut_once(frame: dict[str, Any]) -> None:
        seqs.append(frame["seq"])
        if len(seqs) == 5 and len(sockets) == 1:
            sockets[-1].socket.shutdown(stdsocket.SHUT_RDWR)

    result = api.stream(sid, "/stream 300", cut_once)
    assert len(sockets) == 2 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # no gap, no twice
    assert result["stop_reason"] == "end_turn" and result["text"] == "".join(f"c{i} " for i in range(300))
    api.stop(sid)


def test_a_session_that_ends_is_said_once_and_not_retried(shell: Any, server: dict,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    sockets: list[Any] = []
    real_connect = AcpApi._connect

    def counting_connect(self: AcpApi, session_id: str, since: int) -> Any:
        sockets.append(real_connect(self, session_id, since))
        return sockets[-1]

    monkeypatch.setattr(AcpApi, "_connect", counting_connect)
    # an unknown id: the socket is closed with 4404 at once -> SessionGone (status 404)
    with pytest.raises(SessionGone) as gone, api.socket("0123456789abcdef", since=0):
        pass
    assert gone.value.status == 404 and gone.value.message.startswith("No such session")
    assert len(sockets) == 1
    # a turn's socket drops (no close frame) and the session is deleted meanwhile: the resume
    # is told 4404, and that is final
    sid = api.start("demo", new=True)["id"]
    sockets.clear()

    def cut_and_delete(frame: dict[str, Any]) -> None:
        if frame["type"] == "chat:message":
            sockets[-1].socket.shutdown(stdsocket.SHUT_RDWR)
            api.stop(sid)

    started = time.monotonic()
    with pytest.raises(SessionGone) as gone:
        api.stream(sid, "/sleep 30", cut_and_delete)
    print(f"SessionGone {time.monotonic() - started:.2f} s after the prompt, after "
          f"{len(sockets)} connections: {gone.value}")
    assert gone.value.status == 404 and len(sockets) == 2  # the turn's, and one resume
    time.sleep(RESUME_DELAYS[0] + RESUME_DELAYS[1])
    assert len(sockets) == 2  # nothing retried after the 4404
    # %%acp on the session in use, now gone: one line, and it is no longer in use
    magics = shell.magics_manager.registry["AcpMagics"]
    magics.current = sid
    out, rich = acp(shell, "", "hello?")
    assert out == f"acp: No agent session with id {sid!r} — the next %%acp starts a new session\n"
    assert "Traceback" not in rich and magics.current is None and len(sockets) == 2
    # deleted while a cell's turn runs: the turn ends there, saying why
    acp(shell, "start --agent demo --new")
    sid = magics.current

    def delete_when_busy() -> None:
        deadline = time.time() + 30
        while time.time() < deadline and api.session(sid)["state"] != "busy":
            time.sleep(0.05)
        api.stop(sid)

    threading.Thread(target=delete_when_busy, daemon=True).start()
    started = time.monotonic()
    out, rich = acp(shell, "", "/sleep 30")
    assert time.monotonic() - started < 15 and out == ""
    assert rich.count("**Error:** The session was stopped during the turn") == 1, rich


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
