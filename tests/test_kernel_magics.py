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
from typing import Any, cast

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
    notebook_edit_text,
    notebook_tool_title,
    outputs_text,
    permission_view,
)
from jupyter_acp.kernel.magics import TurnRenderer
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
    panel.send_prompt("And @notes.txt again", wait=True)
    messages = panel.transcript.messages()
    user = next(m for m in reversed(messages) if m["role"] == "user")
    assert user["text"] == "And @notes.txt again" and user["attachments"] == ["📎 notes.txt (20 bytes)"]
    user_item = next(i for i in reversed(panel.transcript.items) if i.kind == "user")
    assert markdown_of(panel, user_item.key) == "> And @notes.txt again\n\n📎 notes.txt (20 bytes)"
    assert "Demo agent got file notes.txt (20 bytes)" in messages[-1]["text"]
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
    # (opened on a session with a history: the panel shows it)
    assert [i.kind for i in panel.transcript.items][:3] == ["user", "agent", "turn"]
    assert len(panel.log_box.children) == len(panel.transcript.items)
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


def test_a_command_s_terminal_output_shows_in_its_card(shell: Any, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``terminal:output`` events (the whole output so far, then the exit status) go into the
    card of the tool call that runs the terminal, even when they come before the call."""
    with server_for_kernels(tmp_path, "--UserSessionManager.allow_unsandboxed_terminals=True") as srv:
        monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(srv["runtime"]))
        shell.magics_manager.registry["AcpMagics"]._api = None
        try:
            acp(shell, "start --agent demo --new")
            out, rich = acp(shell, "--permissions allow", "/shell echo hello-terminal; exit 3")
        finally:
            shell.magics_manager.registry["AcpMagics"]._api = None
    assert "🔧 <code>Run echo hello-terminal; exit 3</code> — ✗ failed</summary>" in rich, out + rich
    assert "```\nhello-terminal\n```\n\n*exit code 3*" in rich


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


def markdown_of(panel: ChatPanel, key: str) -> str:
    """The Markdown the panel's Output widget of item ``key`` holds (what the front end renders)."""
    (output,) = panel._outputs[key].outputs
    data = output["data"]
    assert output["output_type"] == "display_data" and data["text/plain"] == data["text/markdown"]
    return output["data"]["text/markdown"]


def test_chat_panel_streams_and_answers_a_permission(server: dict) -> None:
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    panel = ChatPanel(agent="demo", api=api)
    assert panel.status == "ready" and panel.session_id
    assert [type(c).__name__ for c in panel.children] == ["VBox", "ChatControls"]
    panel._on_front_end(panel.controls, {"type": "send", "text": "hello panel"}, [])
    assert panel._thread is not None
    panel._thread.join(30)
    reply = "Demo agent (no LLM) heard 2 words: hello panel"
    assert panel.transcript.messages()[-1] == {"role": "agent", "text": reply}
    # one Output per item, in the transcript's order, each holding that item's Markdown
    items = panel.transcript.items
    assert [i.kind for i in items][-3:] == ["user", "agent", "turn"]
    assert list(panel.log_box.children) == [panel._outputs[i.key] for i in items]
    agent = next(i for i in reversed(items) if i.kind == "agent")
    assert markdown_of(panel, agent.key) == "Demo agent (no LLM) heard 2 words: hello panel"
    assert markdown_of(panel, items[-1].key).startswith("*end_turn · tokens: ")
    assert panel.tokens == api.session(panel.session_id)["tokens"]["total_tokens"] > 0
    assert panel.status == "ready"
    # the next turn touches none of the earlier items' outputs
    touched: list[str] = []
    for item in items:
        panel._outputs[item.key].observe(lambda change, key=item.key: touched.append(key), "outputs")
    # a permission request shows as pending; the front end's click answers it
    panel._on_front_end(panel.controls, {"type": "send", "text": "/write panel.txt from the panel"}, [])
    deadline = time.time() + 20
    while not panel.pending and time.time() < deadline:
        time.sleep(0.05)
    request = panel.pending[0]
    assert panel.controls.pending == panel.pending  # (synced to the controls' front end)
    allow = next(o["optionId"] for o in request["options"] if o["kind"] == "allow_once")
    click = {"type": "permission", "request_id": request["request_id"], "option_id": allow}
    panel._on_front_end(panel.controls, click, [])
    panel._thread.join(30)
    assert (server["root"] / "panel.txt").read_text() == "from the panel\n"
    assert touched == []
    card = next(m for m in panel.transcript.messages() if m["role"] == "tool")
    assert card["status"] == "completed" and card["diffs"][0]["newText"] == "from the panel\n"
    assert len(card["diffs"]) == 1  # (an update replaces the card's content: no pile of copies)
    tool = next(i for i in panel.transcript.items if i.kind == "tool")
    md = markdown_of(panel, tool.key)
    assert md.startswith("<details><summary>🔧 <code>") and "```diff\n" in md and "+from the panel" in md
    permission = next(i for i in panel.transcript.items if i.kind == "permission")
    assert markdown_of(panel, permission.key).endswith("*→ Allow*")
    assert panel.pending == []
    api.stop(panel.session_id)


def test_chat_panel_streams_a_long_reply_whole(server: dict) -> None:
    """A reply of 1,000 chunks: held back while it streams (at most ten redraws a second), its
    Output holds all of it at the turn's end."""
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    panel = ChatPanel(agent="demo", api=api)
    panel.send_prompt("/stream 1000", wait=True)
    agent = next(i for i in reversed(panel.transcript.items) if i.kind == "agent")
    assert markdown_of(panel, agent.key) == "".join(f"c{i} " for i in range(1000))
    assert panel.status == "ready" and panel._timer is None
    api.delete(panel.session_id)


def test_chat_panel_reports_errors(server: dict) -> None:
    panel = ChatPanel(agent="no-such-agent", api=AcpApi(ServerInfo(server["url"], TOKEN)))
    assert panel.status == "error" and "no-such-agent" in panel.error
    with pytest.raises(AcpApiError) as e:
        AcpApi(ServerInfo(server["url"], "wrong-token")).sessions()
    assert e.value.status == 403


def test_the_esm_is_valid_javascript(tmp_path: Path) -> None:
    """The controls' front end loads, and draws nothing as HTML (the Markdown is the front
    end's to render, in the Output widgets)."""
    node = shutil.which("node")
    assert node, "node is needed to check the widget's JavaScript"
    module = tmp_path / "chat_panel.mjs"
    module.write_text(ESM.read_text())
    script = (f"import('{module.as_uri()}').then(m => {{"
              "if (typeof m.default.render !== 'function') throw new Error('no render');"
              "console.log(JSON.stringify(Object.keys(m))); })")
    result = subprocess.run([node, "-e", script], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["default"]
    assert "innerHTML" not in ESM.read_text() and "renderMarkdown" not in ESM.read_text()


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


# -- the agent's notebook tools, as the magics and the panel show them -------------------------

def _record(**overrides: Any) -> dict[str, Any]:
    return {"edit_id": "e1a2b3c4d5e6", "tool": "insert_cell", "path": "nb.ipynb", "cell_id": "3f2a1b2c-99",
            "cell_type": "code", "live": True, "index": 0, "before": None, "after": "1+1", "outputs": None,
            "execution_count": None, "status": None, "undoes": None, "undoable": True, **overrides}


def test_notebook_edits_read_as_one_line_and_a_block() -> None:
    inserted = "✎ inserted code cell 3f2a1b2c into nb.ipynb at 0 (edit e1a2b3c4)"
    assert notebook_edit_text(_record()) == (inserted, "1+1")
    line, diff = notebook_edit_text(_record(tool="replace_cell", before="x = 1\ny = 2", after="x = 1\ny = 3"))
    assert line.startswith("✎ edited code cell 3f2a1b2c of nb.ipynb") and diff == " x = 1\n-y = 2\n+y = 3"
    assert notebook_edit_text(_record(tool="move_cell", index=2, after=None, undoable=True))[0].startswith(
        "✎ moved code cell 3f2a1b2c of nb.ipynb to 2")
    run = _record(tool="run_cell", before="print(6 * 7)", after="print(6 * 7)", status="ok",
                  execution_count=3, undoable=False,
                  outputs=[{"type": "stream", "name": "stdout", "text": "42\n"},
                           {"type": "display_data", "mime": ["image/png"], "text": ""},
                           {"type": "error", "ename": "ValueError", "evalue": "bad"}])
    assert notebook_edit_text(run) == ("▶ ran code cell 3f2a1b2c of nb.ipynb [3] ok",
                                       "print(6 * 7)\n→ 42\n[image/png]\nValueError: bad")
    undo = _record(edit_id="u9", tool="undo", undoes="e1a2b3c4d5e6", before="1+1", after=None, undoable=False)
    assert notebook_edit_text(undo) == ("↶ undid edit e1a2b3c4 of nb.ipynb", "-1+1")
    assert outputs_text([{"output_type": "execute_result", "data": {"text/plain": ["2"]}}]) == "2"


def test_a_notebook_permission_shows_its_code_and_a_readable_title() -> None:
    run = {"toolCallId": "nb-run-1", "title": "Run a cell of nb.ipynb in your kernel", "kind": "execute",
           "rawInput": {"code": "print(1)", "path": "nb.ipynb"},
           "_meta": {"jupyterAcp": {"notebookRun": True}}}
    assert permission_view(run) == ("Run a cell of nb.ipynb in your kernel", "print(1)")
    args = {"path": "nb.ipynb", "index": 0, "cell_type": "code", "source": "1+1"}
    qwen = {"toolCallId": "c", "title": json.dumps(args), "rawInput": args,
            "_meta": {"toolName": "mcp__jupyter__insert_cell"}}
    assert permission_view(qwen) == ("Insert a code cell into nb.ipynb", "1+1")
    assert permission_view({"title": "Write x", "rawInput": {"code": "no"}}) == ("Write x", None)
    assert notebook_tool_title("delete_cell", None) == "Delete a cell of a notebook"


def test_a_turn_lists_notebook_edits_with_their_change() -> None:
    InteractiveShell.instance()  # (display() needs a shell)
    frames: list[dict[str, Any]] = []

    def frame(kind: str, data: dict[str, Any]) -> None:
        frames.append({"type": kind, "seq": len(frames) + 1, "data": data})

    meta = {"toolName": "mcp__jupyter__insert_cell"}
    frame("chat:message", {"turn": 1, "text": "add a cell"})
    frame("session/update", {"sessionUpdate": "tool_call", "toolCallId": "c1",
                             "title": "insert_cell (jupyter MCP Server)", "rawInput": {}, "_meta": meta})
    frame("session/update", {"sessionUpdate": "tool_call_update", "toolCallId": "c1",
                             "rawInput": {"path": "nb.ipynb"}})
    frame("notebook:edit", _record(after="print('```')"))
    frame("session/update", {"sessionUpdate": "tool_call_update", "toolCallId": "c1",
                             "title": "insert_cell (jupyter MCP Server)", "status": "completed"})
    for n in range(5):
        frame("session/update", {"sessionUpdate": "agent_message_chunk",
                                 "content": {"type": "text", "text": f"{n} "}})
    with capture_output() as cap:
        renderer = TurnRenderer(min_interval=60)
        for f in frames:
            renderer.on_event(f)
        streamed = [o.data["text/markdown"] for o in cap.outputs]
        renderer.refresh(force=True)
    text = renderer.markdown()
    assert "🔧 <code>Insert a cell into nb.ipynb</code> — ✓ completed" in text
    line = "✎ inserted code cell 3f2a1b2c into nb.ipynb at 0 (edit e1a2b3c4)"
    assert f"{line}\n\n````\nprint('```')\n````" in text and text.endswith("0 1 2 3 4 ")
    # one display per item (the first takes the "…" shown at once); the agent's text was held
    # back while it streamed (drawn once, at its start) and drawn whole at the end
    assert streamed[0] == "*…*" and streamed[-1] == "0 " and "0 1 " not in streamed
    assert cap.outputs[-1].data["text/markdown"] == "0 1 2 3 4 " and cap.outputs[-1].update
    assert len(renderer.handles) == 3  # (tool, edit, agent; the user's message has no attachment)


def test_the_chat_panel_shows_notebook_edits_and_a_run_s_code() -> None:
    class Api:  # (only what the panel's constructor asks: no server needed for what it shows)
        def start(self, agent: str | None) -> dict[str, Any]:
            return {"id": "s1", "agent_display_name": "Demo", "tokens": {"total_tokens": 0}, "state": "ready"}

        def history(self, session_id: str) -> dict[str, Any]:
            return {"events": [], "last_seq": 0}

    panel = ChatPanel(agent="demo", api=cast(AcpApi, Api()))
    panel._event({"type": "notebook:edit", "seq": 1, "data": _record()})
    (item,) = panel.transcript.items
    assert markdown_of(panel, item.key) == ("✎ inserted code cell 3f2a1b2c into nb.ipynb at 0 (edit e1a2b3c4)"
                                            "\n\n```\n1+1\n```")
    line = "✎ inserted code cell 3f2a1b2c into nb.ipynb at 0 (edit e1a2b3c4)"
    assert panel.controls.edits == [{"edit_id": "e1a2b3c4d5e6", "line": line}]
    request = {"request_id": "r1", "options": [], "tool_call": {
        "title": "Run a cell of nb.ipynb in your kernel", "rawInput": {"code": "2*21"},
        "_meta": {"jupyterAcp": {"notebookRun": True}}}}
    panel._event({"type": "permission:request", "seq": 2, "data": request})
    assert panel.pending == [{"request_id": "r1", "title": "Run a cell of nb.ipynb in your kernel",
                              "options": [], "code": "2*21"}]
    assert markdown_of(panel, "perm:r1").endswith("```python\n2*21\n```")


def test_acp_cell_shows_the_agent_s_notebook_edit_and_undoes_it(shell: Any, server: dict) -> None:
    path = server["root"] / "magic.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Notes")]), path)
    args = {"path": "magic.ipynb", "index": 1, "cell_type": "code", "source": "x = 6 * 7"}
    out, rich = acp(shell, "--permissions allow", f"/nb insert_cell {json.dumps(args)}")
    assert "🔧 <code>Insert a code cell into magic.ipynb</code> — ✓ completed" in rich, out + rich
    cells = nbformat.read(path, as_version=4).cells
    assert [c.source for c in cells] == ["# Notes", "x = 6 * 7"]
    line = next(x for x in rich.splitlines() if x.startswith("✎ inserted"))
    assert line.startswith(f"✎ inserted code cell {cells[1].id[:8]} into magic.ipynb at 1 (edit ")
    assert "\n\n```\nx = 6 * 7\n```" in rich
    # the id as the output shows it (its start) is enough to take the edit back
    edit = line.rsplit("(edit ", 1)[1].rstrip(")")
    out, rich = acp(shell, f"undo {edit}")
    assert rich.startswith(f"↶ undid edit {edit} of magic.ipynb"), out + rich
    assert [c.source for c in nbformat.read(path, as_version=4).cells] == ["# Notes"]
    out, _ = acp(shell, f"undo {edit}")  # (once is all: the server says why not again)
    assert out.startswith("acp: ") and len(out.strip().splitlines()) == 1, out


def test_the_chat_panel_undoes_an_edit_of_the_agent_s(server: dict) -> None:
    """The agent's notebook edit shows on its tool card, with an Undo button in the controls;
    a click takes the edit back, and the card says so."""
    path = server["root"] / "panel.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Notes")]), path)
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    panel = ChatPanel(agent="demo", api=api)
    args = {"path": "panel.ipynb", "index": 1, "cell_type": "code", "source": "y = 1"}
    panel.send_prompt(f"/nb insert_cell {json.dumps(args)}")
    assert panel._thread is not None
    deadline = time.time() + 30
    while panel._thread.is_alive() and time.time() < deadline:  # (a permission asked: allowed)
        for request in panel.pending:
            panel.answer(request["request_id"], next(o["optionId"] for o in request["options"]
                                                     if o["kind"] == "allow_once"))
        time.sleep(0.05)
    panel._thread.join(30)
    assert [c.source for c in nbformat.read(path, as_version=4).cells] == ["# Notes", "y = 1"]
    (edit,) = panel.controls.edits
    assert edit["line"].startswith("✎ inserted code cell ") and "panel.ipynb at 1" in edit["line"]
    card = next(i for i in panel.transcript.items if i.kind == "tool" and i.data["edits"])
    panel._on_front_end(panel.controls, {"type": "undo", "edit_id": edit["edit_id"]}, [])
    assert [c.source for c in nbformat.read(path, as_version=4).cells] == ["# Notes"]
    assert panel.controls.edits == [] and panel.error == ""
    assert f"(edit {edit['edit_id'][:8]}) — undone" in markdown_of(panel, card.key)
    api.delete(panel.session_id)


#: A prompt of the demo agent's ``/echo``: its reply is this Markdown table, verbatim.
TABLE_PROMPT = "/echo\n| a | b |\n|---|---|\n| 1 | 2 |"


def test_the_chat_panel_s_markdown_is_in_the_saved_widget_state(server: dict,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A notebook with a ChatPanel, executed by nbclient with ``store_widget_state``: the reply's
    table is saved in the notebook as an Output widget's ``text/markdown`` output (what any front
    end renders with its own Markdown renderer, without a kernel)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server["runtime"]))
    source = ("from jupyter_acp.kernel.widget import ChatPanel\n"
              "panel = ChatPanel(agent='demo')\n"
              f"panel.send_prompt({TABLE_PROMPT!r}, wait=True)\n"
              "panel")
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
    client = NotebookClient(nb, kernel_name="python3", timeout=60, store_widget_state=True,
                            resources={"metadata": {"path": str(server["root"])}})
    api = AcpApi(ServerInfo(server["url"], TOKEN))
    try:
        client.execute()
    finally:
        for session in api.sessions():
            api.delete(session["id"])
    outputs = nb.cells[0].outputs
    assert not [o for o in outputs if o.output_type == "error"], outputs
    views = [o for o in outputs if "application/vnd.jupyter.widget-view+json" in o.get("data", {})]
    assert len(views) == 1
    state = nb.metadata.widgets["application/vnd.jupyter.widget-state+json"]["state"]
    panel = state[views[0].data["application/vnd.jupyter.widget-view+json"]["model_id"]]
    assert panel["model_name"] == "VBoxModel"
    markdown = [o["data"]["text/markdown"] for model in state.values() if model["model_name"] == "OutputModel"
                for o in model["state"].get("outputs", [])]
    assert "| a | b |\n|---|---|\n| 1 | 2 |" in markdown, markdown
    assert any(m.startswith("*end_turn · tokens: ") for m in markdown)
