"""The ``%acp`` magics and the ``ChatPanel`` widget, in-process, against a real server.

Outputs are captured with IPython's ``capture_output`` (stdout and rich display data); a kernel
interrupt is tested in a real kernel through nbclient."""

from __future__ import annotations

import base64
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
    for session in api.sessions():  # (live and suspended: each test starts with none)
        api.delete(session["id"])
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
    out, _ = acp(shell, "stop")  # (an alias of close: the session stays, suspended)
    assert out.strip() == f"acp: stopped session {first} — suspended; %acp resume {first[:8]} continues it"
    out, _ = acp(shell, "stats")
    assert out.strip() == "acp: No session in use: %acp start first"


@pytest.mark.parametrize(("line", "words"), [
    ("start --agent nope", "acp: Unknown agent 'nope'; known agents:"),
    ("use 0000", "acp: No session '0000' of yours"),
    ("frobnicate", "acp: argument command: invalid choice: 'frobnicate'"),
    ("", "acp: Say what to do"),
    ("start --cwd ../..", "outside your workspace"),
    ("resume 0000", "acp: No session '0000' of yours"),
    ("close 0000", "acp: No session '0000' of yours"),
    ("delete 0000", "acp: No session '0000' of yours"),
    ("delete", "acp: the following arguments are required: id"),
    ("model demo-large", "acp: No session in use: %acp start first"),
    ("commands", "acp: No session in use: %acp start first"),
])
def test_errors_are_one_line(shell: Any, line: str, words: str) -> None:
    out, rich = acp(shell, line)
    assert words in out and out.count("\n") == 1 and "Traceback" not in out + rich, out


#: A 1x1 PNG (70 bytes), for ``%%acp --image``.
PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA"
                       "60e6kgAAAABJRU5ErkJggg==")


def test_close_resume_recall_commands_model_and_files(shell: Any, server: dict, tmp_path: Path) -> None:
    """The session's life in a notebook: two turns, close (suspended, still listed with its
    title), resume (the agent has its context back: /recall), its commands, a model switch, an
    @file mention and an image, and delete (gone from the list)."""
    magics = shell.magics_manager.registry["AcpMagics"]
    acp(shell, "start --agent demo --new")
    sid = magics.current
    for prompt in ("the first prompt", "and a second one"):
        out, rich = acp(shell, "", prompt)
        assert out == "" and "end_turn · tokens:" in rich
    out, _ = acp(shell, "close")
    assert out == f"acp: closed session {sid} — suspended; %acp resume {sid[:8]} continues it\n"
    assert magics.current is None
    out, rich = acp(shell, "sessions")
    row = next(line for line in rich.splitlines() if sid[:12] in line)
    assert "| suspended | the first prompt |" in row, rich
    # what can be said of a suspended session is said; the rest in one line
    magics.current = sid
    out, rich = acp(shell, "model")
    assert out == "" and "| * demo-small | Demo small |" in rich, out
    out, _ = acp(shell, "cancel")
    assert out == "acp: no turn is running (the session is suspended)\n"
    out, _ = acp(shell, "mode")
    assert out.startswith(f"acp: Session {sid[:12]} is suspended") and out.count("\n") == 1, out
    magics.current = None
    out, _ = acp(shell, f"resume {sid[:8]}")
    assert out.startswith(f"acp: using session {sid} (ready") and out.count("\n") == 1, out
    assert magics.current == sid
    out, rich = acp(shell, "", "/recall")
    assert "Demo agent remembers: the first prompt | and a second one" in rich, rich
    out, rich = acp(shell, "sessions")
    assert "| ready | the first prompt |" in next(line for line in rich.splitlines() if sid[:12] in line)
    # the slash commands the agent announced
    out, rich = acp(shell, "commands")
    assert "| /recall | Repeat the earlier prompts of this session |  |" in rich, rich
    assert "| /write | Write a file (asks permission) | NAME TEXT |" in rich
    # the models, the current one marked; a switch shows in the next reply
    out, rich = acp(shell, "model")
    assert "| * demo-small | Demo small |" in rich and "| demo-large | Demo large |" in rich, rich
    out, _ = acp(shell, "model demo-large")
    assert out == "acp: model demo-large\n"
    out, rich = acp(shell, "", "hello large model")
    assert "[demo-large] Demo agent (no LLM) heard 3 words: hello large model" in rich, rich
    out, _ = acp(shell, "model demo-huge")  # the server's message names the allowed values
    assert out.startswith("acp: ") and out.count("\n") == 1 and "demo-large" in out, out
    out, rich = acp(shell, "model")
    assert "| * demo-large |" in rich
    # an @file mention: the cell goes as written, the server sends the file along
    (server["root"] / "notes.txt").write_text("notes for the agent\n")  # 20 bytes
    (server["root"] / "notebooks.d").mkdir()
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    assert api.files(sid, "no") == ["notebooks.d/", "notes.txt"]  # (what @ completes from)
    out, rich = acp(shell, "", "Summarise @notes.txt please")
    assert out == "" and "📎 notes.txt (20 bytes)" in rich, rich
    assert "Demo agent got file notes.txt (20 bytes)" in rich
    # the chat panel shows them under the user's message too
    panel = ChatPanel(session_id=sid, api=api)
    sent: list[dict] = []
    panel.send = sent.append
    panel.send_prompt("And @notes.txt again", wait=True)
    assert panel.transcript[-2]["attachments"] == ["📎 notes.txt (20 bytes)"]
    assert {"type": "attachments", "lines": ["📎 notes.txt (20 bytes)"]} in sent
    assert "Demo agent got file notes.txt (20 bytes)" in panel.transcript[-1]["text"]
    # a mention of a missing file stays text
    out, rich = acp(shell, "", "What about @missing.txt")
    assert out == "" and "📎" not in rich and "heard 3 words: What about @missing.txt" in rich
    # an image from the kernel's files
    image = tmp_path / "dot.png"
    image.write_bytes(PNG)
    out, rich = acp(shell, f"--image {image}", "What is in this picture?")
    assert out == "" and f"image/png, {len(PNG)} bytes)" in rich, rich
    assert f"Demo agent got image image/png ({len(PNG)} bytes)" in rich
    out, _ = acp(shell, f"--image {tmp_path / 'notes.txt'}", "not an image")
    assert out.startswith("acp: ") and "not an image" in out and out.count("\n") == 1, out
    # delete: forgotten, no longer listed, not resumable
    out, _ = acp(shell, f"delete {sid[:8]}")
    assert out == f"acp: deleted session {sid} and its history\n" and magics.current is None
    out, rich = acp(shell, "sessions")
    assert sid[:12] not in rich + out
    out, _ = acp(shell, f"resume {sid}")
    assert out == f"acp: No session {sid!r} of yours\n"


def test_an_agent_that_comes_back_without_its_context_is_said(shell: Any, server: dict,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """``restore: fresh`` (an agent that can neither resume nor load): the notebook is told."""
    acp(shell, "start --agent demo --new")
    sid = shell.magics_manager.registry["AcpMagics"].current
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    api.close(sid)
    real_resume = AcpApi.resume
    monkeypatch.setattr(AcpApi, "resume", lambda self, session_id: {**real_resume(self, session_id),
                                                                     "restore": "fresh"})
    out, _ = acp(shell, f"resume {sid[:8]}")
    assert out == (f"acp: using session {sid} (ready)\n"
                   "acp: the agent could not restore its context and starts afresh "
                   "(the transcript is kept)\n")


@pytest.mark.timeout(60)
def test_a_mention_outside_the_workspace_is_one_line(shell: Any) -> None:
    acp(shell, "start --agent demo --new")
    out, rich = acp(shell, "", "Read @../../etc/passwd")
    assert out == "acp: @../../etc/passwd is outside the session's workspace\n", out
    assert "Traceback" not in rich


def test_a_suspended_session_in_use_is_resumed_by_the_next_cell(shell: Any, server: dict) -> None:
    """Suspended behind the notebook's back (as an idle cull or a server restart does): the next
    %%acp resumes it, says so in one line, and the agent has its context."""
    magics = shell.magics_manager.registry["AcpMagics"]
    acp(shell, "start --agent demo --new")
    sid = magics.current
    out, rich = acp(shell, "commands")  # (right after the start: announced a moment later)
    assert "| /recall |" in rich, out
    acp(shell, "", "remember this")
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    assert api.close(sid)["state"] == "suspended"
    magics.current = None
    out, _ = acp(shell, f"use {sid[:8]}")
    assert out == f"acp: using session {sid} (suspended: the next %%acp resumes it)\n"
    out, rich = acp(shell, "", "/recall")
    assert out == f"acp: resumed session {sid[:12]} (it was suspended)\n", out
    assert "Demo agent remembers: remember this" in rich and magics.current == sid
    assert api.session(sid)["state"] == "ready"
    # a chat panel on a suspended session resumes it too, when opened and when sent a prompt
    api.close(sid)
    panel = ChatPanel(session_id=sid, api=api)
    assert panel.status == "ready" and api.session(sid)["state"] == "ready"
    panel.send = lambda message: None
    api.close(sid)
    panel.send_prompt("/recall", wait=True)
    assert panel.transcript[-1]["text"].startswith("Demo agent remembers: remember this"), panel.transcript
    assert panel.status == "ready" and panel.error == ""


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
    try:
        client.execute()
    finally:
        for session in api.sessions():
            api.delete(session["id"])
    outputs = json.dumps(nb.cells[1].outputs)
    assert "cancelling the turn" in outputs and "cancelled \\u00b7 tokens" in outputs
    assert time.monotonic() - started < 45  # the 60 s sleep did not run out


def test_close_resume_and_a_mention_in_a_real_kernel(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same life of a session in a real kernel (nbclient), as a notebook runs it: the
    ``{sid[:8]}`` in a line magic is IPython's expansion of a variable of the notebook."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server["runtime"]))
    (server["root"] / "kernel-notes.txt").write_text("from the kernel test\n")  # 21 bytes
    sources = [
        "%load_ext jupyter_acp\n%acp start --agent demo --new\n"
        "sid = get_ipython().magics_manager.registry['AcpMagics'].current",
        "%%acp\nthe first prompt of the kernel",
        "%acp close",
        "%acp sessions",
        "%acp resume {sid[:8]}",
        "%%acp\n/recall",
        "%%acp\nRead @kernel-notes.txt",
        "%acp model nope",
        "%acp delete {sid}\n%acp sessions",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources])
    client = NotebookClient(nb, kernel_name="python3", timeout=60,
                            resources={"metadata": {"path": str(server["root"])}})
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    for session in api.sessions():  # (left by another test: "no sessions" is checked below)
        api.delete(session["id"])
    try:
        client.execute()
    finally:
        for session in api.sessions():
            api.delete(session["id"])
    outputs = [json.dumps(cell.outputs, ensure_ascii=False) for cell in nb.cells]
    assert "acp: closed session" in outputs[2]
    assert "| suspended | the first prompt of the kernel |" in outputs[3], outputs[3]
    assert "acp: using session" in outputs[4] and "(ready" in outputs[4]
    assert "Demo agent remembers: the first prompt of the kernel" in outputs[5], outputs[5]
    assert "📎 kernel-notes.txt (21 bytes)" in outputs[6], outputs[6]
    assert "Demo agent got file kernel-notes.txt (21 bytes)" in outputs[6]
    assert "acp: Unknown model 'nope'" in outputs[7] and "Traceback" not in "".join(outputs)
    assert "acp: deleted session" in outputs[8] and "acp: no sessions" in outputs[8]
