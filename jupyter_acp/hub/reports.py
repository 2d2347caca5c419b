"""Usage reports out of the ledger: sums grouped by day, agent, user and/or session, as JSON or CSV.

The service's REST API (``GET api/usage``) and its admin page both read through ``usage_rows``.
The queries run in a worker thread (``ausage_rows``): the database is never used on the event
loop, which carries every user's LLM streams. Rows count LLM *requests* (the gateway writes one
record per request), and the token columns are the ledger's.

CSV cells that a spreadsheet would run as a formula (``=``, ``+``, ``-``, ``@``, tab, CR at the
start: hub user names and agent names are chosen by users and admins) get a leading ``'``.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import io
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError

from ..usage import LedgerUnavailable, UsageLedger, usage_table
from ..usage.schema import COUNTS, SUMS

#: ``by=`` keys and the column each groups on (``session`` is reported as ``session_id``).
GROUPS = {"user": usage_table.c.user, "day": usage_table.c.day, "agent": usage_table.c.agent,
          "session": usage_table.c.session_id}
LABELS = {"user": "user", "day": "day", "agent": "agent", "session": "session_id"}
VALUE_COLUMNS = (*COUNTS, "cost", "requests")


def parse_by(value: str) -> list[str]:
    """``day`` or ``user,day``…: the group keys, in order, each once (``ValueError`` otherwise)."""
    keys = [k.strip() for k in value.split(",") if k.strip()] or ["day"]
    if any(k not in GROUPS for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"by must be a comma-separated list of {', '.join(GROUPS)}")
    return keys


def parse_day(value: str | None) -> str | None:
    """A ``YYYY-MM-DD`` day, checked (``ValueError`` otherwise); None stays None."""
    if not value:
        return None
    return dt.date.fromisoformat(value).isoformat()


def usage_rows(engine: Engine, by: list[str], *, user: str | None = None, since: str | None = None,
               until: str | None = None) -> list[dict[str, Any]]:
    """Sums per group of the records in ``[since, until]`` (days, inclusive) of ``user`` (None:
    everyone), ordered by the group keys."""
    columns = [GROUPS[k] for k in by]
    where = []
    if user is not None:
        where.append(usage_table.c.user == user)
    if since:
        where.append(usage_table.c.day >= since)
    if until:
        where.append(usage_table.c.day <= until)
    query = (select(*(c.label(LABELS[k]) for k, c in zip(by, columns, strict=True)), *SUMS,
                    func.count().label("requests"))
             .where(*where).group_by(*columns).order_by(*columns))
    try:
        with engine.connect() as conn:
            rows = [dict(r) for r in conn.execute(query).mappings()]
    except (SQLAlchemyError, OSError) as e:
        raise LedgerUnavailable("The usage database cannot be read right now; try again in a minute") from e
    for row in rows:
        for key in VALUE_COLUMNS:
            row[key] = float(row[key]) if key == "cost" else int(row[key])
    return rows


async def ausage_rows(ledger: UsageLedger, by: list[str], **filters: Any) -> list[dict[str, Any]]:
    """``usage_rows`` in a worker thread (connecting may take a while: not on the event loop)."""
    def run() -> list[dict[str, Any]]:
        try:
            engine = ledger.engine
        except (SQLAlchemyError, OSError) as e:
            raise LedgerUnavailable("The usage database cannot be read right now; try again in a "
                                    "minute") from e
        return usage_rows(engine, by, **filters)
    return await asyncio.to_thread(run)


def _cell(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(by: list[str], rows: list[dict[str, Any]]) -> str:
    """The rows as CSV with a header line (group columns first, then the sums)."""
    header = [LABELS[k] for k in by] + list(VALUE_COLUMNS)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([_cell(row.get(name)) for name in header])
    return out.getvalue()
