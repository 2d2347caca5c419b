"""The admin page (``{prefix}`` and ``{prefix}admin``): every user's usage, as tables and a plot.

Browser login goes through the hub's OAuth (``HubOAuth``: the hub asks the admin to log in, then
redirects to ``{prefix}oauth_callback``, which stores the service's token in a cookie); a hub
token in an ``Authorization`` header works too (scripts, tests). The page needs the scope
``custom:acp-usage:read`` on that token: anyone else gets a 403 page. It shows usage per user
(with today's tokens and each user's limit), per day and per agent over the last
``admin_days`` days (``?since=``/``?until=`` choose), a server-rendered SVG bar chart of tokens
per day stacked by user, and CSV exports (``{prefix}admin/usage.csv?by=…``, cookie-authenticated
like the page, read-only).

Every name on the page (hub user names, agent names) is chosen by users or admins: all text is
HTML-escaped, and the page is served with a Content-Security-Policy that allows no script.
"""

from __future__ import annotations

import datetime as dt
import html
import math
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jupyterhub.services.auth import (  # type: ignore[import-untyped]
    HubOAuthCallbackHandler,
    HubOAuthenticated,
)
from tornado import web

from ..errors import AcpError
from ..usage import utc_day
from .api import READ_SCOPE, can_read_all
from .reports import ausage_rows, parse_by, parse_day, to_csv

if TYPE_CHECKING:
    from .app import AcpHub

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; frame-ancestors 'none'"
PALETTE = ("#4e79a7", "#f28e2b", "#e15759", "#76b7b2", "#59a14f", "#edc948", "#b07aa1", "#ff9da7",
           "#9c755f")
#: Users drawn as their own series in the chart (the rest are summed as "others").
MAX_SERIES = 8
STYLE = """body{font-family:system-ui,sans-serif;margin:2em;color:#222}table{border-collapse:collapse;
margin:1em 0}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:right}th{background:#f4f4f4}
td:first-child,th:first-child{text-align:left}h2{margin-top:1.6em}.legend span{display:inline-block;
margin-right:1em}.swatch{display:inline-block;width:.8em;height:.8em;margin-right:.3em}"""


def esc(value: Any) -> str:
    """Any value as HTML text (quotes too: it may end up in an attribute)."""
    return html.escape(str(value), quote=True)


def short(n: float) -> str:
    """1234567 → ``1.2M``: axis labels."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def nice_ceiling(value: float) -> float:
    """The y axis' top: the smallest 1, 2, 2.5 or 5 times a power of ten at least ``value``."""
    if value <= 0:
        return 1.0
    scale = 10 ** math.floor(math.log10(value))
    return next(m * scale for m in (1, 2, 2.5, 5, 10) if m * scale >= value)


def cell(value: Any) -> str:
    """A table cell: integers with thousands separators, anything else as text."""
    return f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def day_range(since: str, until: str) -> list[str]:
    first, last = dt.date.fromisoformat(since), dt.date.fromisoformat(until)
    count = max(0, min((last - first).days + 1, 366))
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(count)]


def bar_chart(rows: list[dict[str, Any]], days: list[str]) -> str:
    """Tokens per day stacked by user, as an inline SVG (``rows``: by user, day)."""
    per_user: dict[str, int] = {}
    for row in rows:
        per_user[row["user"]] = per_user.get(row["user"], 0) + row["total_tokens"]
    top = sorted(per_user, key=lambda u: (-per_user[u], u))[:MAX_SERIES]
    series = [*top, *(["others"] if len(per_user) > len(top) else [])]
    stacks: dict[str, dict[str, int]] = {day: {} for day in days}
    for row in rows:
        name = row["user"] if row["user"] in top else "others"
        if row["day"] in stacks:
            stacks[row["day"]][name] = stacks[row["day"]].get(name, 0) + row["total_tokens"]
    width, height, left, bottom, top_margin = 860, 280, 64, 36, 12
    plot_w, plot_h = width - left - 10, height - bottom - top_margin
    peak = nice_ceiling(max([sum(s.values()) for s in stacks.values()] + [1]))
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
           f'aria-label="Tokens per day, stacked by user">']
    for i in range(5):  # grid and y labels
        y = top_margin + plot_h - plot_h * i / 4
        out.append(f'<line x1="{left}" x2="{width - 10}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end">'
                   f'{esc(short(peak * i / 4))}</text>')
    slot = plot_w / max(len(days), 1)
    label_every = max(1, round(len(days) / 12))
    for i, day in enumerate(days):
        x = left + i * slot + slot * 0.1
        y = top_margin + plot_h
        for j, name in enumerate(series):
            value = stacks[day].get(name, 0)
            if not value:
                continue
            h = plot_h * value / peak
            y -= h
            out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.8:.1f}" height="{h:.1f}" '
                       f'fill="{PALETTE[j % len(PALETTE)]}"><title>{esc(name)} {esc(day)}: '
                       f'{value} tokens</title></rect>')
        if i % label_every == 0:
            out.append(f'<text x="{x + slot * 0.4:.1f}" y="{height - bottom + 16}" font-size="11" '
                       f'text-anchor="middle">{esc(day[5:])}</text>')
    out.append("</svg>")
    legend = "".join(f'<span><i class="swatch" style="background:{PALETTE[j % len(PALETTE)]}"></i>'
                     f"{esc(name)}</span>" for j, name in enumerate(series))
    return "".join(out) + f'<div class="legend">{legend}</div>'


def table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{esc(cell(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f"<style>{STYLE}</style></head><body>{body}</body></html>")


class _HubPage(HubOAuthenticated, web.RequestHandler):
    """A page for browsers (OAuth cookie) or scripts (token header); the user model is looked
    up asynchronously in ``prepare`` (HubAuthenticated's own lookup would block the loop)."""

    hub_scopes = None  # (any identified user or service gets in; the scope is checked below)

    def initialize(self, hub: AcpHub) -> None:
        self.hub = hub
        self.hub_auth = hub.hub_auth

    def set_default_headers(self) -> None:
        self.set_header("Content-Security-Policy", CSP)
        self.set_header("X-Frame-Options", "DENY")
        self.set_header("X-Content-Type-Options", "nosniff")
        self.set_header("Cache-Control", "no-store")
        self.set_header("Referrer-Policy", "no-referrer")

    async def prepare(self) -> None:
        model = await self.hub_auth.get_user(self, sync=False)
        self._hub_auth_user_cache = self.check_hub_user(model) if model else None

    def check_reader(self) -> None:
        """403 page unless the token has ``custom:acp-usage:read``."""
        if not can_read_all(self.current_user):
            self.set_status(403)
            name = self.current_user.get("name", "")
            self.finish(page("Forbidden", f"<h1>403: Forbidden</h1><p>{esc(name)}, this page needs the "
                                          f"scope <code>{esc(READ_SCOPE)}</code> (a role that grants it, "
                                          f"e.g. the <code>acp-admin</code> role).</p>"))
            raise web.Finish()

    def period(self) -> tuple[str, str]:
        try:
            until = parse_day(self.get_query_argument("until", None)) or utc_day()
            default_since = (dt.date.fromisoformat(until) - dt.timedelta(days=self.hub.admin_days - 1))
            since = parse_day(self.get_query_argument("since", None)) or default_since.isoformat()
        except ValueError:
            raise web.HTTPError(400, "dates are YYYY-MM-DD") from None
        return since, until

    async def rows(self, by: list[str], since: str, until: str) -> list[dict[str, Any]]:
        try:
            return await ausage_rows(self.hub.ledger, by, since=since, until=until)
        except AcpError as e:
            raise web.HTTPError(e.status, e.message) from e


class AdminHandler(_HubPage):
    """``GET {prefix}`` / ``{prefix}admin``: the usage page."""

    @web.authenticated
    async def get(self) -> None:
        self.check_reader()
        since, until = self.period()
        by_user_day = await self.rows(["user", "day"], since, until)
        by_user = await self.rows(["user"], since, until)
        by_day = await self.rows(["day"], since, until)
        by_agent = await self.rows(["agent"], since, until)
        today = {r["user"]: r["total_tokens"] for r in await self.rows(["user"], utc_day(), utc_day())}
        limits: dict[str, int | str | None] = {}
        for row in by_user:
            try:
                limits[row["user"]] = await self.hub.policy.limit_for(row["user"])
            except AcpError:
                limits[row["user"]] = "?"
        cols = ["requests", "input_tokens", "output_tokens", "total_tokens"]
        user_rows = [[r["user"], *(r[c] for c in cols), today.get(r["user"], 0),
                      "unlimited" if limits[r["user"]] is None else limits[r["user"]]] for r in by_user]
        base = self.hub.base_url
        query = urlencode({"since": since, "until": until})
        csv_links = " · ".join(
            f'<a href="{esc(base)}admin/usage.csv?{esc(urlencode({"by": by}))}&amp;{esc(query)}">'
            f"{esc(by)}</a>" for by in ("user", "day", "agent", "user,day", "session"))
        body = [f"<h1>jupyter-acp usage</h1><p>{esc(since)} to {esc(until)} (UTC days) · signed in as "
                f"{esc(self.current_user.get('name', ''))} · CSV: {csv_links}</p>",
                f'<p><a href="{esc(base)}admin?{esc(query)}">reload</a></p>',
                "<h2>Tokens per day</h2>", bar_chart(by_user_day, day_range(since, until)),
                "<h2>Per user</h2>", table(["user", *cols, "today", "daily limit"], user_rows),
                "<h2>Per day</h2>",
                table(["day", *cols], [[r["day"], *(r[c] for c in cols)] for r in by_day]),
                "<h2>Per agent</h2>",
                table(["agent", *cols], [[r["agent"], *(r[c] for c in cols)] for r in by_agent])]
        self.set_header("Content-Type", "text/html; charset=utf-8")
        self.finish(page("jupyter-acp usage", "".join(body)))


class AdminCsvHandler(_HubPage):
    """``GET {prefix}admin/usage.csv?by=…&since=…&until=…``: the page's CSV export."""

    @web.authenticated
    async def get(self) -> None:
        self.check_reader()
        since, until = self.period()
        try:
            by = parse_by(self.get_query_argument("by", "day"))
        except ValueError as e:
            raise web.HTTPError(400, str(e)) from None
        rows = await self.rows(by, since, until)
        self.set_header("Content-Type", "text/csv; charset=utf-8")
        self.set_header("Content-Disposition", f'attachment; filename="acp-usage-by-{"-".join(by)}.csv"')
        self.finish(to_csv(by, rows))


class OAuthCallbackHandler(HubOAuthCallbackHandler):
    """``{prefix}oauth_callback``: completes the hub's OAuth login of the admin page."""

    def initialize(self, hub: AcpHub) -> None:
        self.hub_auth = hub.hub_auth
