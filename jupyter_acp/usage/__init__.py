"""Token accounting: one normalised record per prompt turn, persisted, with daily quotas.

* ``normalize`` — ``UsageNormalizer`` turns each agent's report shape into ``TurnUsage``;
* ``ledger`` — ``UsageLedger`` persists the records (SQLAlchemy: SQLite by default, PostgreSQL
  for a shared deployment) from its own threads, and enforces the daily quota;
* ``spool`` — where records wait, durably, while the database cannot be written;
* ``schema`` — the ``acp_usage`` table.
"""

from __future__ import annotations

from .ledger import LedgerUnavailable, LiveTotals, QuotaUnavailable, RecordOutcome, UsageLedger
from .normalize import (
    MAX_REPORTED_COST,
    MAX_REPORTED_TOKENS,
    TOKEN_FIELDS,
    TurnUsage,
    UsageNormalizer,
    _cost,
    _int,
    utc_day,
)
from .schema import metadata, usage_table
from .spool import UsageSpool

__all__ = [
    "MAX_REPORTED_COST",
    "MAX_REPORTED_TOKENS",
    "TOKEN_FIELDS",
    "LedgerUnavailable",
    "LiveTotals",
    "QuotaUnavailable",
    "RecordOutcome",
    "TurnUsage",
    "UsageLedger",
    "UsageNormalizer",
    "UsageSpool",
    "_cost",
    "_int",
    "metadata",
    "usage_table",
    "utc_day",
]
