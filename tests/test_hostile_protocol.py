"""A hostile agent's malformed or abusive protocol traffic is refused cleanly.

Every value an agent sends is attacker input (docs/security.md). These tests drive the hostile
agent (tests/agents/hostile.py) through the real session manager and check that what it sends
is answered with a JSON-RPC error or ignored — never a traceback in the server log, never a host
path, never a broken ledger — and that the session keeps working afterwards.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from attack import make_attacker

from jupyter_acp.session import SessionState
from jupyter_acp.usage import MAX_REPORTED_COST, MAX_REPORTED_TOKENS


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.exc_info or r.exc_text]


async def still_works(attacker) -> None:
    assert attacker.session.state is SessionState.READY
    assert (await attacker("sh", cmd="echo alive"))["output"] == "alive\n"


async def test_malformed_notifications_leave_no_traceback(acp_managers, caplog):
    caplog.set_level(logging.DEBUG)
    attacker = await make_attacker(acp_managers, "local")
    # a session/update of a shape no schema allows, an unknown method, params of the wrong type
    await attacker("notify", method="session/update",
                   params={"update": {"sessionUpdate": "agent_message_chunk", "content": 5}}, count=200)
    await attacker("notify", method="no/such/notification", params={"x": 1}, count=200)
    await attacker("notify", method="session/update", params={"update": {"sessionUpdate": "bogus"}},
                   count=200)
    await asyncio.sleep(0.5)  # notifications are handled in tasks of their own
    assert tracebacks(caplog) == []
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) <= 25, [r.getMessage() for r in warnings[:30]]  # rate-limited
    await still_works(attacker)


async def test_meta_cannot_smuggle_parameters(acp_managers, caplog):
    """The SDK merges ``_meta`` into the handler's keyword arguments: it must not win."""
    caplog.set_level(logging.DEBUG)
    attacker = await make_attacker(acp_managers, "local")
    (attacker.workspace / "ok.txt").write_text("fine\n")
    for meta in ({"path": "/etc/shadow"}, {"path": {"a": 1}}, {"path": None}, {"line": "x"}):
        report = await attacker("raw", method="fs/read_text_file", params={"path": "ok.txt", "_meta": meta})
        content = report.get("ok", {}).get("content", "")
        assert "root:" not in content
        assert ("error" in report) or content == "fine\n", report
    (attacker.workspace / "shadow").write_text("root:x\n")  # what the smuggled path names
    report = await attacker("raw", method="fs/read_text_file",
                            params={"path": "ok.txt", "_meta": {"path": "shadow", "tag": 1}})
    assert report["ok"]["content"] == "fine\n", report  # the validated path won
    assert tracebacks(caplog) == []
    await still_works(attacker)


async def test_absurd_usage_reports_cannot_break_the_ledger(acp_managers, acp_ledger):
    """Without the gateway an agent's usage report is its word; a huge or non-finite one is
    clamped instead of overflowing the ledger's integer columns (which wedged the session)."""
    attacker = await make_attacker(acp_managers, "local")
    huge = 2**200
    await attacker("notify", method="session/update", params={
        "update": {"sessionUpdate": "agent_message_chunk", "content": {"type": "text", "text": ""},
                   "_meta": {"usage": {"inputTokens": huge, "outputTokens": -5, "totalTokens": "9" * 5000,
                                       "model": "m" * 10_000}}}})
    await attacker("notify", method="session/update", params={
        "update": {"sessionUpdate": "usage_update", "used": huge, "size": -1,
                   "cost": {"amount": 1e300, "currency": "X" * 1000}}})
    totals = acp_ledger.session_totals(attacker.session.id)
    assert totals["input_tokens"] == MAX_REPORTED_TOKENS
    assert totals["output_tokens"] == 0
    assert totals["cost"] <= MAX_REPORTED_COST
    await still_works(attacker)


async def test_a_storm_of_bad_requests_is_refused_quietly(acp_managers, caplog):
    caplog.set_level(logging.DEBUG)
    attacker = await make_attacker(acp_managers, "local")
    host_root = str(attacker.workspace)
    report = await attacker("many", method="fs/read_text_file", params={"path": "../../etc/passwd"},
                            count=300)
    assert report["results"] == {"-32602": 300}, report
    report = await attacker("raw", method="fs/read_text_file", params={"path": "/etc/passwd"})
    assert report["error"]["code"] == -32602 and host_root not in str(report), report
    assert tracebacks(caplog) == []
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) <= 25, lines[:30]
    assert not any(host_root in line for line in lines), lines[:5]
    await still_works(attacker)


async def test_agent_text_cannot_forge_log_lines(acp_managers, caplog):
    """What the agent names (a method, a path) is logged quoted: a newline in it cannot start a
    line of its own that an admin would take for the server's."""
    caplog.set_level(logging.DEBUG)
    attacker = await make_attacker(acp_managers, "local")
    await attacker("notify", method="no/such\nFORGED: admin logged in", params={})
    await attacker("raw", method="fs/read_text_file", params={"path": "/etc\nFORGED: key=sk-1"})
    await asyncio.sleep(0.2)
    assert not any("\nFORGED" in r.getMessage() for r in caplog.records), \
        [r.getMessage() for r in caplog.records if "FORGED" in r.getMessage()]
    assert any("FORGED" in r.getMessage() for r in caplog.records)  # logged, but quoted
    await still_works(attacker)


async def test_unsupported_elicitation_is_refused_quietly(acp_managers, caplog):
    """We offer no elicitation (an unstable part of ACP): a request for it is answered "method
    not found" and its notification dropped, with no traceback. ``AcpClient`` leaves the SDK's
    elicitation handlers out on purpose (``AcpClient.as_sdk_client``): with one defined, the
    SDK warns about the unstable protocol, which the warnings-as-errors here turn into -32603."""
    caplog.set_level(logging.DEBUG)
    attacker = await make_attacker(acp_managers, "local")
    report = await attacker("raw", method="elicitation/create", params={
        "sessionId": "s", "toolCallId": "t", "mode": "form", "message": "Your password?",
        "requestedSchema": {"type": "object", "properties": {}}})
    assert report["error"]["code"] == -32601, report
    await attacker("notify", method="elicitation/complete", params={"elicitationId": "e"}, count=3)
    await asyncio.sleep(0.2)
    assert tracebacks(caplog) == []
    await still_works(attacker)
