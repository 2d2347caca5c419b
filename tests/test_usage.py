"""Usage normalisation of each agent's report shape, and the ledger's queries and quota."""

from __future__ import annotations

import time

import pytest
from acp import schema

from jupyter_acp.errors import QuotaExceeded
from jupyter_acp.usage import TurnUsage, UsageLedger, UsageNormalizer, utc_day


def chunk(meta: dict | None = None) -> schema.AgentMessageChunk:
    return schema.AgentMessageChunk(session_update="agent_message_chunk",
                                    content=schema.TextContentBlock(type="text", text=""),
                                    field_meta=meta)


def response(meta: dict | None = None, **usage: int) -> schema.PromptResponse:
    return schema.PromptResponse(stop_reason="end_turn", usage=schema.Usage(**usage) if usage else None,
                                 field_meta=meta)


def test_qwen_per_request_meta_is_summed_and_wins():
    n = UsageNormalizer()
    n.begin_turn()
    n.on_update(chunk({"usage": {"inputTokens": 100, "outputTokens": 20, "totalTokens": 120,
                                 "cachedReadTokens": 50, "model": "qwen3-coder"}}))
    n.on_update(chunk({"usage": {"inputTokens": 130, "outputTokens": 5, "totalTokens": 135}}))
    turn = n.end_turn(response(input_tokens=999, output_tokens=999, total_tokens=1998))
    assert (turn.input_tokens, turn.output_tokens, turn.total_tokens) == (230, 25, 255)
    assert turn.cached_read_tokens == 50 and turn.model == "qwen3-coder" and turn.source == "request_meta"


def test_cumulative_prompt_response_is_not_double_counted():
    n = UsageNormalizer()
    n.begin_turn()
    first = n.end_turn(response(input_tokens=10, output_tokens=5, total_tokens=15))
    n.begin_turn()
    second = n.end_turn(response(input_tokens=14, output_tokens=9, total_tokens=23))
    assert (first.input_tokens, first.output_tokens, first.total_tokens) == (10, 5, 15)
    assert (second.input_tokens, second.output_tokens, second.total_tokens) == (4, 4, 8)
    n.begin_turn()  # an agent that restarted its count reports less than before
    third = n.end_turn(response(input_tokens=3, output_tokens=2, total_tokens=5))
    assert third.total_tokens == 5


def test_switching_source_keeps_the_baseline():
    n = UsageNormalizer()
    n.begin_turn()
    n.end_turn(response(input_tokens=10, output_tokens=5, total_tokens=15))
    n.begin_turn()
    n.on_update(chunk({"usage": {"inputTokens": 7, "outputTokens": 3, "totalTokens": 10}}))
    mid = n.end_turn(response(input_tokens=17, output_tokens=8, total_tokens=25))
    n.begin_turn()
    last = n.end_turn(response(input_tokens=20, output_tokens=9, total_tokens=29))
    assert mid.total_tokens == 10 and last.total_tokens == 4


def test_gemini_quota_block():
    n = UsageNormalizer()
    n.begin_turn()
    turn = n.end_turn(response({"quota": {"token_count": {"input_tokens": 11, "output_tokens": 4},
                                          "model_usage": [{"model": "gemini-2.5-flash"}]}}))
    assert (turn.input_tokens, turn.output_tokens, turn.total_tokens) == (11, 4, 15)
    assert turn.model == "gemini-2.5-flash" and turn.source == "gemini_quota"


def test_usage_update_cost_and_context():
    n = UsageNormalizer()
    n.begin_turn()
    n.on_update(schema.UsageUpdate(session_update="usage_update", used=100, size=1000,
                                   cost=schema.Cost(amount=0.5, currency="USD")))
    first = n.end_turn(None)
    n.begin_turn()
    n.on_update(schema.UsageUpdate(session_update="usage_update", used=150, size=1000,
                                   cost=schema.Cost(amount=0.75, currency="USD")))
    second = n.end_turn(None)
    assert (first.cost, second.cost, second.currency) == (0.5, 0.25, "USD")
    assert (n.context_used, n.context_size) == (150, 1000)
    assert second.source == "none" and second.total_tokens == 0


def test_ledger_queries_and_quota(tmp_path):
    ledger = UsageLedger(db_url=f"sqlite:///{tmp_path / 'u.sqlite'}", max_tokens_per_user_per_day=100)
    now = time.time()
    for i, (user, session, tokens) in enumerate([("alice", "s1", 30), ("alice", "s1", 40),
                                                  ("alice", "s2", 10), ("bob", "s3", 500)]):
        ledger.record(user=user, session_id=session, agent="demo", turn=i + 1, started_at=now,
                      usage=TurnUsage(input_tokens=tokens, total_tokens=tokens, cost=tokens / 1000))
    ledger.record(user="alice", session_id="s1", agent="demo", turn=9, started_at=now - 86400 * 3,
                  ended_at=now - 86400 * 3, usage=TurnUsage(input_tokens=1000, total_tokens=1000))
    assert ledger.session_totals("s1")["total_tokens"] == 1070
    assert ledger.user_totals("alice")["turns"] == 4
    assert ledger.tokens_today("alice") == 80
    days = {(r["user"], r["day"]): r["total_tokens"] for r in ledger.per_day()}
    assert days[("alice", utc_day(now))] == 80 and days[("bob", utc_day(now))] == 500
    assert days[("alice", utc_day(now - 86400 * 3))] == 1000
    sessions = {r["session_id"]: r["total_tokens"] for r in ledger.per_session("alice")}
    assert sessions == {"s1": 1070, "s2": 10}
    assert [t["turn"] for t in ledger.turns("s1")] == [1, 2, 9]
    ledger.check_quota("alice")  # 80 of 100
    with pytest.raises(QuotaExceeded, match="500 of 100"):
        ledger.check_quota("bob")
    ledger.max_tokens_per_user_per_day = 0
    ledger.check_quota("bob")  # 0 = unlimited
    ledger.close()


def test_the_ledger_file_is_private(tmp_path):
    """Nobody but the server's account may read the usage of every user."""
    db = tmp_path / "data" / "usage.sqlite"
    ledger = UsageLedger(db_url=f"sqlite:///{db}")
    try:
        ledger.record(user="alice", session_id="s", agent="demo", turn=1,
                      usage=TurnUsage(input_tokens=1, total_tokens=1), started_at=0.0)
        for path in (db, *db.parent.glob("usage.sqlite-*")):
            assert path.stat().st_mode & 0o777 == 0o600, path
        assert db.parent.stat().st_mode & 0o077 == 0
    finally:
        ledger.close()
    db.chmod(0o644)  # one made by an earlier version is made private when opened
    UsageLedger(db_url=f"sqlite:///{db}").engine.dispose()
    assert db.stat().st_mode & 0o777 == 0o600
