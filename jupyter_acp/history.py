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

Some events are *snapshots* that replace the previous one of the same ``key`` (a terminal's
whole output so far, ``terminal_output``): the history keeps only the latest of each key, and
at most ``MAX_KEYED`` of them in at most a quarter of ``max_bytes``, dropping the oldest keys
first. So a command that prints for an hour, or an agent that starts and releases terminals in a
loop, holds a bounded part of the history and never pushes the conversation out of it. The
kept seqs then have gaps (a replay skips the superseded snapshots, which lose nothing).
"""

from __future__ import annotations

import bisect
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
    "notebook_edit": "notebook:edit",
    "terminal_output": "terminal:output",
}

#: Snapshots (events with a ``key``) kept at once, whatever their keys.
MAX_KEYED = 32


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
        #: the latest events' JSON, in seq order
        self._log: collections.deque[str] = collections.deque()
        #: the seq of each kept event (increasing; gaps where snapshots were superseded)
        self._seqs: collections.deque[int] = collections.deque()
        self._log_bytes = 0
        #: the highest seq dropped by the bounds (a replay from before it is truncated)
        self._dropped_to = 0
        #: the kept snapshots: key -> (seq, bytes), oldest first; and seq -> key
        self._keyed: dict[str, tuple[int, int]] = {}
        self._key_of: dict[int, str] = {}
        self._keyed_bytes = 0
        self._last_payload = ""
        self._subscribers: list[Subscriber] = []

    def payloads(self, since: int = 0) -> list[str]:
        """The JSON text (as sent on the wire) of each kept event with ``seq > since``, in order.

        When events after ``since`` have left the history (``max_events``, ``max_bytes``) the
        list starts with a ``history:truncated`` frame (no ``seq``) saying how many."""
        since = min(since, self.seq)  # (a number past the latest event: nothing is newer)
        start = bisect.bisect_right(self._seqs, since)
        kept = list(itertools.islice(self._log, start, None))
        if since < self._dropped_to and self.max_events > 0:
            first = self._seqs[0] if self._seqs else self.seq + 1
            dropped = self._dropped_to - max(since, 0)
            kept.insert(0, json.dumps({"type": "history:truncated",
                                       "data": {"dropped": dropped, "first_seq": first}}))
        return kept

    def payload(self, seq: int) -> str:
        """The JSON text of one kept event, or of the latest even when ``max_events`` is 0
        (``IndexError`` if it left the history)."""
        if seq == self.seq:
            return self._last_payload
        index = bisect.bisect_left(self._seqs, seq)
        if index >= len(self._seqs) or self._seqs[index] != seq:
            raise IndexError(seq)
        return self._log[index]

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The kept events with ``seq > since``, as the API shows them (wire type names)."""
        return [json.loads(p) for p in self.payloads(since)]

    def restore(self, events: list[tuple[int, str]], last_seq: int = 0) -> None:
        """Start from a stored history (a resumed session, ``session_store.py``): its events,
        numbered as they were, and the next event numbered after the last of them and
        ``last_seq`` (snapshots are not stored, so the last seq may have no event). The events
        must be in increasing seq order; a replay from before the first is truncated."""
        self._log.clear()
        self._seqs.clear()
        self._keyed.clear()
        self._key_of.clear()
        self._log_bytes = self._keyed_bytes = 0
        self.seq = max(events[-1][0], last_seq) if events else max(last_seq, self.seq)
        tail: list[tuple[int, str]] = []
        for seq, payload in reversed(events):
            if tail and seq >= tail[-1][0]:
                break
            tail.append((seq, payload))
        tail.reverse()
        self._dropped_to = tail[0][0] - 1 if tail else self.seq
        for seq, payload in tail:
            self._keep(seq, payload)
        self._last_payload = tail[-1][1] if tail and tail[-1][0] == self.seq else ""

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Receive every event from now on (an event dict, internal type name); the history
        (``payloads``/``events``) holds what came before."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._subscribers.remove(callback)

        return unsubscribe

    def emit(self, type_: str, data: dict[str, Any], key: str | None = None) -> dict[str, Any]:
        """Number, bound, keep and fan out one event; returns it as subscribers got it. An event
        with a ``key`` is a snapshot: it replaces the kept one of the same key (module doc)."""
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
        self._keep(self.seq, payload, key)
        for callback in list(self._subscribers):
            try:
                callback(event)
            except Exception:
                log.exception("A subscriber of session %s failed; dropping it", self.label)
                with contextlib.suppress(ValueError):
                    self._subscribers.remove(callback)
        return event

    def _keep(self, seq: int, payload: str, key: str | None = None) -> None:
        """Add an event's JSON to the history, dropping the oldest past either bound (and, for
        a snapshot, the one it replaces and the oldest snapshots past theirs)."""
        if self.max_events <= 0:
            return
        self._log.append(payload)
        self._seqs.append(seq)
        self._log_bytes += len(payload)
        if key is not None:
            self._add_snapshot(key, seq, len(payload))
        log_, seqs = self._log, self._seqs
        while len(log_) > self.max_events or (self._log_bytes > self.max_bytes and len(log_) > 1):
            self._log_bytes -= len(log_.popleft())
            self._dropped_to = dropped = seqs.popleft()
            gone = self._key_of.pop(dropped, None)
            if gone is not None:
                self._keyed_bytes -= self._keyed.pop(gone)[1]

    def _add_snapshot(self, key: str, seq: int, size: int) -> None:
        old = self._keyed.pop(key, None)
        if old is not None:
            self._forget(key, old)
        self._keyed[key] = (seq, size)
        self._key_of[seq] = key
        self._keyed_bytes += size
        budget = self.max_bytes // 4
        while len(self._keyed) > 1 and (len(self._keyed) > MAX_KEYED or self._keyed_bytes > budget):
            oldest = next(iter(self._keyed))
            self._forget(oldest, self._keyed.pop(oldest))

    def _forget(self, key: str, kept: tuple[int, int]) -> None:
        """Take a superseded snapshot out of the history (not a loss: a newer one stands for it)."""
        seq, size = kept
        self._key_of.pop(seq, None)
        self._keyed_bytes -= size
        index = bisect.bisect_left(self._seqs, seq)
        if index < len(self._seqs) and self._seqs[index] == seq:
            del self._log[index]
            del self._seqs[index]
            self._log_bytes -= size
