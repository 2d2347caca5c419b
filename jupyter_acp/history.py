"""A session's event stream: numbered events, a bounded history of their JSON, subscribers.

Everything that happens in a session is an *event* with a sequence number, kept in a bounded
history and fanned out to subscribers (WebSockets, widgets). A subscriber that joins late reads
the history first, so a reconnecting UI loses nothing. The history holds each event as its JSON
text, as the API sends it (``wire_json``): serialized once, sent as is, and invisible to the
garbage collector — 200 sessions of dict-tree histories made its full collections take
0.25-0.6 s, which stalled every session at once (bench/scale.py).

What an agent sends is bounded here (``limits.AgentInputLimits``): an event larger than
``max_event_bytes`` is cut before it is kept or sent (``shrink.fit_event``), and the history
holds at most ``max_events`` events and ``max_bytes`` of JSON; a replay that misses older events
starts with a ``history:truncated`` frame saying how many.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Callable
from typing import Any

from .shrink import fit_event

log = logging.getLogger("jupyter_acp.session")

Subscriber = Callable[[dict[str, Any]], None]

#: Event names on the wire (docs/api.md) for the session's internal event types.
WIRE_TYPES = {
    "session_update": "session/update",
    "user_message": "chat:message",
    "permission_request": "permission:request",
    "permission_resolved": "permission:resolved",
    "turn_end": "chat:response",
    "cancel_requested": "cancel",
}


def public_event(event: dict[str, Any]) -> dict[str, Any]:
    """A session event as the API shows it (same dict, wire type name)."""
    return {**event, "type": WIRE_TYPES.get(event["type"], event["type"])}


def wire_json(event: dict[str, Any]) -> str:
    """The JSON text of an event as the API sends it."""
    return json.dumps(public_event(event), default=str)


class EventHistory:
    """Numbers a session's events, keeps the latest as wire JSON, and fans them out."""

    def __init__(self, *, max_events: int, max_bytes: int, max_event_bytes: int, label: str = "") -> None:
        self.max_events, self.max_bytes, self.max_event_bytes = max_events, max_bytes, max_event_bytes
        self.label = label
        self.seq = 0
        #: the latest events' JSON; their seqs are consecutive, ending at ``seq``
        self._log: collections.deque[str] = collections.deque()
        self._log_bytes = 0
        self._last_payload = ""
        self._subscribers: list[Subscriber] = []

    def payloads(self, since: int = 0) -> list[str]:
        """The JSON text (as sent on the wire) of each kept event with ``seq > since``, in order.

        When events after ``since`` have left the history (``max_events``, ``max_bytes``) the
        list starts with a ``history:truncated`` frame (no ``seq``) saying how many."""
        first = self.seq - len(self._log) + 1
        since = min(since, self.seq)  # (a number past the latest event: nothing is newer)
        kept = list(itertools.islice(self._log, max(0, since + 1 - first), None))
        if since + 1 < first and self.max_events > 0:
            kept.insert(0, json.dumps({"type": "history:truncated",
                                       "data": {"dropped": first - 1 - max(since, 0), "first_seq": first}}))
        return kept

    def payload(self, seq: int) -> str:
        """The JSON text of one kept event, or of the latest even when ``max_events`` is 0
        (``IndexError`` if it left the history)."""
        if seq == self.seq:
            return self._last_payload
        index = len(self._log) - 1 - (self.seq - seq)
        if index < 0:
            raise IndexError(seq)
        return self._log[index]

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept events with ``seq > since``, as the API shows them (wire type names)."""
        return [json.loads(p) for p in self.payloads(since)]

    def restore(self, events: list[tuple[int, str]], last_seq: int = 0) -> None:
        """Start from a stored history (a resumed session, ``session_store.py``): its events,
        numbered as they were, and the next event numbered after the last (after ``last_seq``
        when none is kept). Only the consecutive run of events ending at the last is kept
        (``payloads`` counts on it)."""
        self._log.clear()
        self._log_bytes = 0
        self.seq = events[-1][0] if events else max(last_seq, self.seq)
        tail: list[str] = []
        for seq, payload in reversed(events):
            if seq != self.seq - len(tail):
                break
            tail.append(payload)
        for payload in reversed(tail):
            self._keep(payload)
        self._last_payload = tail[0] if tail else ""

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Receive every event from now on (an event dict, internal type name); the history
        (``payloads``/``events``) holds what came before."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, type_: str, data: dict[str, Any]) -> dict[str, Any]:
        """Number, bound, keep and fan out one event; returns it as subscribers got it."""
        self.seq += 1
        event = {"seq": self.seq, "type": type_, "time": time.time(), "data": data}
        limit = self.max_event_bytes
        try:
            payload = wire_json(event)
        except (RecursionError, ValueError, TypeError):  # (nested deeper than json goes, or worse)
            payload = "x" * (limit + 1)  # stands for "too large": fit_event makes a placeholder
        if len(payload) > limit:  # (ASCII: its length is its size in bytes)
            event, payload = fit_event(event, payload, limit)
        self._last_payload = payload
        self._keep(payload)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("A subscriber of session %s failed; dropping it", self.label)
                with contextlib.suppress(ValueError):
                    self._subscribers.remove(callback)
        return event

    def _keep(self, payload: str) -> None:
        """Add an event's JSON to the history, dropping the oldest past either bound."""
        if self.max_events <= 0:
            return
        log_ = self._log
        log_.append(payload)
        self._log_bytes += len(payload)
        while len(log_) > self.max_events or (self._log_bytes > self.max_bytes and len(log_) > 1):
            self._log_bytes -= len(log_.popleft())
