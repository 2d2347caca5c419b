"""Token accounting: one normalised record per prompt turn, persisted, with daily quotas.

* ``normalize`` — ``UsageNormalizer`` turns each agent's report shape into ``TurnUsage``;
* ``ledger`` — ``UsageLedger`` persists the records (SQLAlchemy: SQLite by default, PostgreSQL
  for a shared deployment) from its own threads, and enforces the daily quota;
* ``spool`` — where records wait, durably, while the database cannot be written;
* ``admission`` — leases: the daily quota enforced atomically in the database (``admit``,
  ``settle``), however many servers share it;
* ``schema`` — the ``acp_usage`` and ``acp_leases`` tables; ``migrate`` (Alembic, the
  ``migrations`` directory) creates and upgrades them.
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
from .schema import leases_table, metadata, usage_table
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
    "leases_table",
    "metadata",
    "usage_table",
    "utc_day",
]
