"""The kernel's one reducer of the session event stream (``kernel/transcript.py``) and its
Markdown (``kernel/markdown.py``).

The parity fixtures (``tests/fixtures/events``) are asserted here and by the sidebar's vitest
(``labextension/test/parity.test.ts``) against ``reducer.ts``: the same frames give the same
items, keys and texts in both."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from jupyter_acp.kernel.markdown import item_markdown, markdown_bundle, unified_diff
from jupyter_acp.kernel.transcript import Item, Throttle, Transcript

FIXTURES = sorted((Path(__file__).parent / "fixtures" / "events").glob("*.json"))


def load(name: str) -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "fixtures" / "events" / f"{name}.json").read_text())


def expected(transcript: Transcript) -> list[dict[str, str]]:
    out = []
    for item in transcript.items:
        entry = {"key": item.key, "kind": item.kind}
        if item.kind in ("user", "agent", "thought"):
            entry["text"] = item.text
        out.append(entry)
    return out


def test_there_are_fixtures_for_each_rule() -> None:
    names = {p.stem for p in FIXTURES}
    assert {"chunks", "tool_diff", "plan", "permission", "notebook_edit", "terminal"} <= names


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_parity_fixture(path: Path) -> None:
    fixture = json.loads(path.read_text())
    transcript = Transcript()
    for frame in fixture["frames"]:
        transcript.apply(frame)
    assert expected(transcript) == fixture["expect"]
    assert len({i.key for i in transcript.items}) == len(transcript.items)  # (keys are unique)


@pytest.mark.parametrize("path", FIXTURES, ids=lambda p: p.stem)
def test_a_replay_of_the_whole_stream_changes_nothing(path: Path) -> None:
    frames = json.loads(path.read_text())["frames"]
    transcript = Transcript()
    transcript.apply_all(frames)
    versions = [(i.key, i.version) for i in transcript.items]
    assert transcript.apply_all([f for f in frames if "seq" in f]) == []
    assert [(i.key, i.version) for i in transcript.items] == versions


def test_apply_returns_only_what_changed() -> None:
    frames = load("chunks")["frames"]
    transcript = Transcript()
    changed = [[i.key for i in transcript.apply(f)] for f in frames]
    assert changed[0] == [] and changed[1] == []  # (hello without pending, state)
    assert changed[2] == ["u:2"] and changed[3] == ["t:3"] and changed[4] == ["t:3"]
    assert changed[5] == ["a:5"] and changed[6] == ["a:5"] and changed[7] == []  # (an empty chunk)
    agent = transcript.by_key["a:5"]
    assert agent.version == 3 and agent.text.endswith("$e^{i\\pi}+1=0$.")
    assert transcript.tokens["total_tokens"] == 21 and transcript.turns == 2 and not transcript.busy


def test_a_tool_card_updates_in_place_with_its_diff() -> None:
    transcript = Transcript()
    transcript.apply_all(load("tool_diff")["frames"])
    card = transcript.by_key["tool:call-1"]
    assert card.data["status"] == "completed" and card.version == 3
    assert [c["type"] for c in card.data["content"]] == ["diff", "text"]  # (replaced, not appended)
    assert card.data["locations"] == ["/home/u/f.txt"]
    md = item_markdown(card)
    assert md.startswith("<details><summary>🔧 <code>Edit f.txt</code> — ✓ completed</summary>\n\n")
    assert md.endswith("</details>") and md.count("```diff") == 1
    # two hunks (lines 3 and 17), the lines between them not shown
    assert md.count("\n@@ ") == 2 and "-line 3\n+THREE" in md and "-line 17\n+SEVENTEEN" in md
    assert "line 10" not in md and "```\nEdited 2 lines\n```" in md
    diff = card.data["content"][0]
    assert transcript.messages()[2] == {
        "role": "tool", "id": "call-1", "title": "Edit f.txt", "status": "completed",
        "diffs": [{"path": "/home/u/f.txt", "oldText": diff["old_text"], "newText": diff["new_text"]}]}


def test_a_new_file_diffs_against_nothing() -> None:
    assert unified_diff("a.txt", None, "x\ny\n").splitlines() == [
        "--- /dev/null", "+++ b/a.txt", "@@ -0,0 +1,2 @@", "+x", "+y"]


def test_the_plan_is_replaced_in_its_turn() -> None:
    transcript = Transcript()
    transcript.apply_all(load("plan")["frames"])
    plan = transcript.by_key["plan:2"]
    assert [e["status"] for e in plan.data["entries"]] == ["completed", "completed"]
    assert item_markdown(plan) == "**Plan**\n\n- [x] Read the file\n- [x] Edit it"
    assert item_markdown(transcript.by_key["plan:8"]) == "**Plan**\n\n- [ ] Check"


def test_permissions_errors_and_notices() -> None:
    transcript = Transcript()
    transcript.apply_all(load("permission")["frames"])
    r0, r1 = transcript.by_key["perm:r0"], transcript.by_key["perm:r1"]
    assert r0.data["resolved"] == {"outcome": "selected", "option_id": "allow", "by": "user"}
    assert transcript.pending == []
    assert item_markdown(r0) == "🔐 The agent asks permission: Write a.txt\n\n*→ Allow once*"
    assert item_markdown(r1).endswith("*→ cancelled (by timeout)*")
    assert transcript.by_key["tool:call-1"].data["args"] == {"path": "b.txt"}  # (from the request)
    assert item_markdown(transcript.by_key["err:8"]) == "**Error:** The agent was refused"
    assert item_markdown(transcript.by_key["note:9"]) == "*Cancel requested*"
    assert item_markdown(transcript.by_key["turn:10"]) == "*cancelled · tokens: 0 in, 0 out, 0 total*"


def test_a_pending_permission_shows_its_code_until_answered() -> None:
    transcript = Transcript()
    request = {"request_id": "r1", "options": [], "tool_call": {
        "title": "Run a cell of nb.ipynb in your kernel", "rawInput": {"code": "2*21"},
        "_meta": {"jupyterAcp": {"notebookRun": True}}}}
    (item,) = transcript.apply({"type": "permission:request", "seq": 1, "data": request})
    assert transcript.pending == ["r1"]
    assert item_markdown(item) == ("🔐 The agent asks permission: Run a cell of nb.ipynb in your kernel\n\n"
                                   "```python\n2*21\n```")


def test_a_notebook_edit_moves_into_the_card_that_names_it() -> None:
    frames = load("notebook_edit")["frames"]
    transcript = Transcript()
    changed = [[(i.key, i.removed) for i in transcript.apply(f)] for f in frames]
    assert changed[3] == [("edit:e1a2b3c4d5e6", False)]  # (on its own first)
    # the tool's result names the edit: the edit's item is removed, the card has it
    assert changed[4] == [("tool:c1", False), ("edit:e1a2b3c4d5e6", True)]
    c1 = transcript.by_key["tool:c1"]
    assert c1.data["title"] == "Insert a code cell into nb.ipynb"  # (titled from the edit: no args came)
    assert [e["edit_id"] for e in c1.data["edits"]] == ["e1a2b3c4d5e6"]
    md = item_markdown(c1)
    assert "✎ inserted code cell 3f2a1b2c into nb.ipynb at 0 (edit e1a2b3c4)\n\n```\n1+1\n```" in md
    # the undone edit, adopted later by the card that names it, says it was undone
    c2 = transcript.by_key["tool:c2"]
    assert c2.data["edits"][0]["undone_by"] == "u9u9u9u9" and " — undone" in item_markdown(c2)
    assert transcript.undoable_edits() == [c1.data["edits"][0]]
    assert [m["role"] for m in transcript.messages()] == ["user", "tool", "agent", "tool", "tool"]


def test_terminal_output_shows_in_the_card_that_runs_it() -> None:
    frames = load("terminal")["frames"]
    transcript = Transcript()
    changed = [transcript.apply(f) for f in frames[:3]]
    assert changed[2] == [] and transcript.terminals["term-1"]["output"] == "hi\n"  # (kept for later)
    changed += [transcript.apply(f) for f in frames[3:]]
    card = transcript.by_key["tool:sh-1"]
    assert [i.key for i in changed[4]] == ["tool:sh-1"]  # (its output changed: the card is redrawn)
    md = item_markdown(card, transcript.terminals)
    assert "```\nhi\nthere\n```\n\n*exit code 0*" in md
    assert "*terminal term-1*" in item_markdown(card)  # (no output known)


def test_markdown_of_messages_passes_tables_and_math_through() -> None:
    transcript = Transcript()
    transcript.apply_all(load("chunks")["frames"])
    agent = transcript.by_key["a:5"]
    assert item_markdown(agent) == agent.text  # (tables, LaTeX: the front end renders them)
    assert item_markdown(transcript.by_key["t:3"]) == (
        "<details><summary>Thinking</summary>\n\nLet me think about it.\n\n</details>")
    user = transcript.by_key["u:12"]
    assert item_markdown(user) == "> again\n\n📎 notes.txt (20 bytes)"
    assert transcript.messages()[-2] == {"role": "user", "text": "again",
                                         "attachments": ["📎 notes.txt (20 bytes)"]}
    assert markdown_bundle("x")["data"] == {"text/markdown": "x", "text/plain": "x"}


def test_the_throttle_holds_back_only_the_streaming_item() -> None:
    throttle = Throttle(0.1)
    agent, tool = Item("a:1", "agent", "x"), Item("tool:1", "tool")
    assert throttle.take([agent], now=1.0) == [agent]  # (new: at once)
    assert throttle.take([agent], now=1.05) == []  # (held back)
    assert throttle.take([tool], now=1.06) == [tool]  # (other items at once)
    assert throttle.waiting
    assert throttle.take([], now=1.2) == [agent]  # (due now)
    assert throttle.take([agent], now=1.21) == [] and throttle.flush() == [agent] and not throttle.waiting


@pytest.mark.parametrize(("text", "safe"), [
    ("a <img src=x onerror=alert(1)> & b", "a &lt;img src=x onerror=alert(1)> &amp; b"),
    ("x `<b>` y", "x `<b>` y"),  # (code keeps its text)
    ("```py\nif a<b: pass\n```\n<i>", "```py\nif a<b: pass\n```\n&lt;i>"),
    ("``` x`y\n<b>\n```", "``` x`y\n&lt;b>\n```"),  # (not a fence: a backtick in its info)
    ("\\`<img>`", "\\`&lt;img>`"),  # (an escaped backtick opens no code span)
    ("| `a | <img> ` |", "| `a | &lt;img> ` |"),  # (a table row's cells split first)
    ("`a\n\n<img>\n\n`", "`a\n\n&lt;img>\n\n`"),  # (no code span across lines)
    ("$a<b$ and $$x<y$$", "$a\\lt b$ and $$x\\lt y$$"),
    ("[x](javascript:alert(1)) [y]( JavaScript:1)\n[r]: data:text/html,1",
     "[x](unsafe-javascript:alert(1)) [y]( unsafe-JavaScript:1)\n[r]: unsafe-data:text/html,1"),
    ("~~~\n<b>\n~~~~\n<b>", "~~~\n<b>\n~~~~\n&lt;b>"),
    ("| a | b |\n|---|---|\n| 1 | 2 |", "| a | b |\n|---|---|\n| 1 | 2 |"),
])
def test_the_agent_s_markdown_carries_no_html(text: str, safe: str) -> None:
    """Output widgets' outputs (and a cell's) are trusted in JupyterLab: no sanitizer runs, so
    the agent's raw HTML and script links are neutralized before they get there."""
    from jupyter_acp.kernel.markdown import safe_markdown

    assert safe_markdown(text) == safe
    assert item_markdown(Item("a:1", "agent", text)) == safe
