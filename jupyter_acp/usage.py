"""Token accounting: one normalised record per prompt turn, persisted, with daily quotas.

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
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from jupyter_core.paths import jupyter_data_dir
from sqlalchemy import (
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    bindparam,
    cast,
    create_engine,
    event,
    func,
    insert,
    select,
)
from sqlalchemy.engine import Engine
from traitlets import Integer as IntTrait
from traitlets import Unicode, default
from traitlets.config import LoggingConfigurable

from .errors import QuotaExceeded

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


def _private_file(path: Path) -> None:
    """Create the SQLite file (and its directory) readable by the server's account only, before
    SQLite does with the umask's mode (0644): in a home directory others may enter, they would
    read every user's usage. SQLite gives its ``-wal`` and ``-shm`` files the same mode."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_CREAT | os.O_RDONLY | os.O_CLOEXEC, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)  # a ledger created by an earlier version
    finally:
        os.close(fd)


metadata = MetaData()
usage_table = Table(
    "acp_usage",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("user", String(255), nullable=False),
    Column("session_id", String(64), nullable=False),
    Column("agent", String(255), nullable=False),
    Column("model", String(255)),
    Column("turn", Integer, nullable=False),
    *(Column(name, Integer, nullable=False, default=0) for name in (*TOKEN_FIELDS, "total_tokens")),
    Column("cost", Float, nullable=False, default=0.0),
    Column("currency", String(8)),
    Column("source", String(32), nullable=False),
    Column("started_at", Float, nullable=False),
    Column("ended_at", Float, nullable=False),
    Column("day", String(10), nullable=False),
    Index("ix_acp_usage_user_day", "user", "day"),
    Index("ix_acp_usage_session", "session_id"),
)

_SUMS = [func.coalesce(func.sum(usage_table.c[name]), 0).label(name)
         for name in (*TOKEN_FIELDS, "total_tokens", "cost")]
#: Turns, not records: the LLM gateway writes one record per LLM request of a turn.
_TURNS = func.count(func.distinct(usage_table.c.session_id + ":" + cast(usage_table.c.turn, String)))

# Built once: SQLAlchemy caches the compiled form of a statement object, so a turn's insert and
# the quota check before every prompt cost ~0.1 ms each instead of ~0.6 and ~1.2 ms of
# building and compiling them anew (measured, SQLite; they run on the server's event loop).
_INSERT = insert(usage_table)
_TOKENS_TODAY = select(func.coalesce(func.sum(usage_table.c.total_tokens), 0)).where(
    usage_table.c.user == bindparam("user"), usage_table.c.day == bindparam("day"))


def utc_day(ts: float | None = None) -> str:
    moment = dt.datetime.fromtimestamp(ts if ts is not None else time.time(), dt.timezone.utc)
    return moment.date().isoformat()


class UsageLedger(LoggingConfigurable):
    """Persists ``TurnUsage`` records and answers per session / user / day, enforcing quotas.

    SQLite (the default) is opened in WAL mode: a record is on disk when ``record`` returns, so a
    server killed with -9 right after loses nothing. Any SQLAlchemy URL works for a shared
    deployment (e.g. ``postgresql+psycopg://...``).
    """

    db_url = Unicode(
        help="""SQLAlchemy URL of the usage database. Default: a SQLite file
        ``jupyter_acp/usage.sqlite`` in the Jupyter data directory.""",
    ).tag(config=True)

    @default("db_url")
    def _default_db_url(self) -> str:
        path = Path(jupyter_data_dir()) / "jupyter_acp" / "usage.sqlite"
        return f"sqlite:///{path}"

    max_tokens_per_user_per_day = IntTrait(
        0,
        help="""Tokens (input + output, all agents) one user may use per UTC day; a new prompt
        turn beyond it is refused with a clear error. 0 means unlimited.""",
    ).tag(config=True)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._engine: Engine | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = self._connect()
        return self._engine

    def _connect(self) -> Engine:
        url = self.db_url
        if url.startswith("sqlite:///") and url != "sqlite:///:memory:":
            _private_file(Path(url[len("sqlite:///"):]))
        engine = create_engine(url, future=True)
        if engine.dialect.name == "sqlite":
            @event.listens_for(engine, "connect")
            def _pragmas(dbapi_conn: Any, _record: Any) -> None:
                cur = dbapi_conn.cursor()
                cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.execute("PRAGMA busy_timeout=5000")
                cur.close()
        metadata.create_all(engine)
        return engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None

    def record(self, *, user: str, session_id: str, agent: str, turn: int, usage: TurnUsage,
               started_at: float, ended_at: float | None = None) -> int:
        """Store one turn's usage; returns the record id."""
        ended = ended_at if ended_at is not None else time.time()
        row = {key: getattr(usage, key) for key in (*TOKEN_FIELDS, "total_tokens", "cost", "currency",
                                                    "model", "source")}
        row.update(user=user, session_id=session_id, agent=agent, turn=turn, started_at=started_at,
                   ended_at=ended, day=utc_day(ended))
        with self.engine.begin() as conn:
            result = conn.execute(_INSERT, row)
            return int(result.inserted_primary_key[0])

    def _totals(self, *where: Any) -> dict[str, Any]:
        query = select(*_SUMS, _TURNS.label("turns")).where(*where)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().one()
        return {k: (float(v) if k == "cost" else int(v)) for k, v in row.items()}

    def session_totals(self, session_id: str) -> dict[str, Any]:
        return self._totals(usage_table.c.session_id == session_id)

    def user_totals(self, user: str) -> dict[str, Any]:
        return self._totals(usage_table.c.user == user)

    def tokens_today(self, user: str) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(_TOKENS_TODAY, {"user": user, "day": utc_day()}).scalar_one())

    def check_quota(self, user: str) -> None:
        """Raise ``QuotaExceeded`` when ``user`` has no tokens left today."""
        cap = self.max_tokens_per_user_per_day
        if cap and (used := self.tokens_today(user)) >= cap:
            raise QuotaExceeded(
                f"Daily token quota used up: {used} of {cap} tokens today (UTC); it renews at midnight UTC"
            )

    def _grouped(self, keys: list[Any], *where: Any) -> list[dict[str, Any]]:
        query = select(*keys, *_SUMS, _TURNS.label("turns")).where(*where).group_by(*keys)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(*keys)).mappings().all()
        return [dict(r) for r in rows]

    def per_session(self, user: str | None = None) -> list[dict[str, Any]]:
        where = [] if user is None else [usage_table.c.user == user]
        return self._grouped([usage_table.c.user, usage_table.c.session_id, usage_table.c.agent], *where)

    def per_day(self, user: str | None = None) -> list[dict[str, Any]]:
        where = [] if user is None else [usage_table.c.user == user]
        return self._grouped([usage_table.c.user, usage_table.c.day], *where)

    def turns(self, session_id: str) -> list[dict[str, Any]]:
        """Every turn record of a session, in order (for per-turn charts)."""
        query = select(usage_table).where(usage_table.c.session_id == session_id).order_by(usage_table.c.id)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(query).mappings().all()]
