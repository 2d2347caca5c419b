"""Usage normalisation: one ``TurnUsage`` per prompt turn, whatever shape the agent reports.

Agents report usage in different shapes (DESIGN.md §2, measured on real agents):

* Qwen Code: an empty ``agent_message_chunk`` per LLM request whose ``_meta.usage`` holds that
  request's tokens (not cumulative) — summed over the turn;
* the ACP draft ``PromptResponse.usage`` (claude-agent-acp, the demo agent): cumulative for the
  session — the turn's share is the difference from the previous report;
* Gemini CLI: ``_meta.quota.token_count`` on the prompt response, for the turn;
* ``usage_update``: context used/size and a cumulative cost — the turn's cost is the difference.

``UsageNormalizer`` turns one session's reports into ``TurnUsage`` without counting anything
twice: per-request sums win over the response's figures, which win over Gemini's quota block;
the cumulative baseline always moves, so switching sources never double counts.
"""

from __future__ import annotations

import datetime as dt
import math
import time
from dataclasses import asdict, dataclass
from typing import Any

TOKEN_FIELDS = ("input_tokens", "output_tokens", "thought_tokens", "cached_read_tokens",
                "cached_write_tokens")
_CAMEL = {"input_tokens": "inputTokens", "output_tokens": "outputTokens",
          "thought_tokens": "thoughtTokens", "cached_read_tokens": "cachedReadTokens",
          "cached_write_tokens": "cachedWriteTokens"}


@dataclass
class TurnUsage:
    """Tokens and cost of one prompt turn, whatever shape the agent reported them in."""

    input_tokens: int = 0
    output_tokens: int = 0
    thought_tokens: int = 0
    cached_read_tokens: int = 0
    cached_write_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    currency: str | None = None
    model: str | None = None
    source: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: The most tokens one report may claim. An agent's usage report is its own word (a hostile
#: agent may send 1e400 or 2**200); this keeps such a value from breaking the ledger's INTEGER
#: columns and the day's sums, while real reports (at most millions) pass untouched.
MAX_REPORTED_TOKENS = 10**12
#: The most cost (in the report's currency) one cumulative report may claim.
MAX_REPORTED_COST = 1e9


def _int(value: Any) -> int:
    """A token count from an agent's report: a non-negative int, clamped; junk counts as 0."""
    if isinstance(value, bool):
        return 0
    try:
        return min(max(int(value), 0), MAX_REPORTED_TOKENS)
    except (TypeError, ValueError, OverflowError):
        return 0


def _cost(value: Any) -> float:
    """A cost from an agent's report: finite, non-negative, clamped; junk counts as 0."""
    try:
        amount = float(value)
    except (TypeError, ValueError, OverflowError):
        return 0.0
    return min(amount, MAX_REPORTED_COST) if math.isfinite(amount) and amount > 0 else 0.0


class UsageNormalizer:
    """Follows one agent session's usage reports and yields each turn's share."""

    def __init__(self) -> None:
        self.cumulative: dict[str, int] | None = None
        self.cost_cumulative: float | None = None
        self.currency: str | None = None
        self.context_used: int | None = None
        self.context_size: int | None = None
        self._requests: dict[str, int] = {}
        self._request_total = 0
        self._saw_requests = False
        self._cost_delta = 0.0
        self._model: str | None = None

    def begin_turn(self) -> None:
        self._requests = dict.fromkeys(TOKEN_FIELDS, 0)
        self._request_total = 0
        self._saw_requests = False
        self._cost_delta = 0.0

    def on_update(self, update: Any) -> None:
        """Feed every ``session/update`` of the session (any variant)."""
        meta = getattr(update, "field_meta", None)
        if isinstance(meta, dict):
            usage = meta.get("usage")
            if isinstance(usage, dict):  # Qwen Code: one LLM request's usage
                self._saw_requests = True
                for key in TOKEN_FIELDS:
                    self._requests[key] = self._requests.get(key, 0) + _int(usage.get(_CAMEL[key]))
                self._request_total += _int(usage.get("totalTokens"))
                if isinstance(usage.get("model"), str):
                    self._model = usage["model"][:255]  # the ledger's column
        if getattr(update, "session_update", None) == "usage_update":
            self.context_used = _int(update.used)
            self.context_size = _int(update.size)
            cost = getattr(update, "cost", None)
            if cost is not None:
                amount = _cost(cost.amount)
                previous = self.cost_cumulative or 0.0
                # a restarted agent starts its cumulative cost again from zero
                self._cost_delta += amount - previous if amount >= previous else amount
                self.cost_cumulative = amount
                self.currency = cost.currency[:8] if isinstance(cost.currency, str) else None

    def end_turn(self, response: Any | None) -> TurnUsage:
        """The turn's usage, given the ``PromptResponse`` (None when the turn failed)."""
        turn = TurnUsage(cost=round(self._cost_delta, 9), currency=self.currency, model=self._model)
        from_response = self._response_delta(getattr(response, "usage", None))
        quota = self._gemini_quota(getattr(response, "field_meta", None))
        if self._saw_requests:
            values, total, turn.source = self._requests, self._request_total, "request_meta"
        elif from_response is not None:
            values, total, turn.source = from_response, from_response["total_tokens"], "prompt_response"
        elif quota is not None:
            values, total, turn.source = quota, 0, "gemini_quota"
        else:
            values, total = {}, 0
        for key in TOKEN_FIELDS:
            setattr(turn, key, _int(values.get(key)))
        turn.total_tokens = total or (turn.input_tokens + turn.output_tokens + turn.thought_tokens)
        turn.model = self._model  # the quota block may have named it
        self.begin_turn()
        return turn

    def _response_delta(self, usage: Any) -> dict[str, int] | None:
        if usage is None:
            return None
        now = {key: _int(getattr(usage, key, 0)) for key in (*TOKEN_FIELDS, "total_tokens")}
        before = self.cumulative
        self.cumulative = now
        if before is None or any(now[k] < before[k] for k in now):
            return now  # first report, or the agent restarted its count
        return {k: now[k] - before[k] for k in now}

    def _gemini_quota(self, meta: Any) -> dict[str, int] | None:
        if not isinstance(meta, dict):
            return None
        quota = meta.get("quota")
        if not isinstance(quota, dict) or not isinstance(quota.get("token_count"), dict):
            return None
        counts = quota["token_count"]
        models = quota.get("model_usage")
        if isinstance(models, list) and models and isinstance(models[0], dict):
            model = models[0].get("model")
            self._model = model[:255] if isinstance(model, str) and model else self._model
        return {"input_tokens": _int(counts.get("input_tokens")),
                "output_tokens": _int(counts.get("output_tokens"))}


def utc_day(ts: float | None = None) -> str:
    """The UTC date of ``ts`` (default: now), ``YYYY-MM-DD``: the ledger's day and quota day."""
    moment = dt.datetime.fromtimestamp(ts if ts is not None else time.time(), dt.timezone.utc)
    return moment.date().isoformat()
