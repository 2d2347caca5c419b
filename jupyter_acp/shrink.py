"""Cutting what an agent sends down to the server's bounds (``limits.AgentInputLimits``).

An agent may send any amount of text in one update (a 4 MiB message chunk, a tool call whose
title or raw output is a whole file) and any number of updates in a turn. The session keeps
every event for clients that reconnect and sends it to each of them, so an event is cut to
``max_event_bytes`` before it is kept (``fit_event``): its longest strings are shortened, each
ending with a visible note of how much was dropped, and an event that still does not fit (say,
a million tiny strings) becomes a small placeholder that keeps only its short fields. The reply
text a turn returns is bounded the same way (``TextBudget``).

Normal events are never touched: the only cost on their path is comparing the length of their
JSON, already serialized for the wire, with the limit.
"""

from __future__ import annotations

import collections
import json
import re
from collections.abc import Callable
from typing import Any

#: What replaces the end of a cut string (``{n}``: the bytes dropped, UTF-8).
MARKER = "... [{n:,} bytes dropped by the server]"
#: A placeholder keeps the event's fields whose values are scalars up to this many characters.
SHORT = 200
#: ... and this many of them.
MAX_KEPT_FIELDS = 16
#: Strings up to this many characters are never cut (ids, kinds, paths, short names).
LONG = 64
_ESCAPED = re.compile(r'[\x00-\x1f"\\\x7f]')


def utf8_len(text: str) -> int:
    """The length of ``text`` in UTF-8 bytes (cheap for ASCII, the usual case)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def marker(dropped: int) -> str:
    return MARKER.format(n=dropped)


def fit_event(event: dict[str, Any], payload: str, limit: int) -> tuple[dict[str, Any], str]:
    """``event`` (whose wire JSON is ``payload``) cut to at most ``limit`` bytes of JSON.

    Returns the event and its JSON unchanged when they fit. Otherwise the event's ``data`` has
    its longest strings cut (each ending with ``MARKER``), or, when that is not enough, is
    replaced by a placeholder and the event gets ``"truncated": <bytes of JSON dropped>``.
    ``payload`` is ASCII (``json.dumps`` escapes the rest), so its length is its size in bytes."""
    if len(payload) <= limit:
        return event, payload
    from .history import wire_json  # (the one serializer of events)

    size = len(payload)
    fitted = cut_to_fit(event["data"], size, limit, lambda data: wire_json({**event, "data": data}))
    if fitted is None:
        return _placeholder(event, size, limit)
    return {**event, "data": fitted[0]}, fitted[1]


def cut_to_fit(value: Any, size: int, limit: int, serialize: Callable[[Any], str]) -> tuple[Any, str] | None:
    """``value`` (``size`` bytes as ``serialize`` writes it) with its longest strings cut, each
    with ``MARKER``, so that it serializes to at most ``limit`` bytes: ``(cut value, its text)``,
    or None when cutting strings is not enough (e.g. a million short ones, or huge keys)."""
    sizes: dict[int, int] = {}  # id of each long string -> its size in JSON
    try:
        _long_strings(value, sizes)
    except RecursionError:
        return None
    if not sizes:
        return None
    cap = _water_level(list(sizes.values()), size - limit + len(marker(size)) * len(sizes))
    for _ in range(6):
        try:
            cut = _cut(value, cap, sizes)
            text = serialize(cut)
        except (RecursionError, ValueError, TypeError):
            return None
        if len(text) <= limit:
            return cut, text
        if cap < 64:
            return None
        cap = int(cap * min(0.5, limit / len(text)))
    return None


def _placeholder(event: dict[str, Any], size: int, limit: int) -> tuple[dict[str, Any], str]:
    """The event with only its short scalar fields (a message or thought chunk also keeps a
    text block saying how much was dropped, which is what a chat shows)."""
    from .history import wire_json

    data = event.get("data")
    kept: dict[str, Any] = {}
    if isinstance(data, dict):
        for key, value in data.items():
            if len(kept) >= MAX_KEPT_FIELDS:
                break
            short_str = isinstance(value, str) and len(value) <= SHORT
            if isinstance(key, str) and len(key) <= SHORT and (
                    value is None or isinstance(value, bool | int | float) or short_str):
                kept[key] = value
        if str(kept.get("sessionUpdate", "")).endswith("_chunk"):
            kept["content"] = {"type": "text", "text": marker(size)}
    small = {"seq": event.get("seq"), "type": event.get("type"), "time": event.get("time"),
             "data": kept, "truncated": size}
    payload = wire_json(small)
    if len(payload) > limit:  # (an absurdly small limit: keep nothing but the frame)
        small["data"] = {}
        payload = wire_json(small)
    return small, payload


def _long_strings(value: Any, sizes: dict[int, int]) -> None:
    """Note the JSON size of every string longer than ``LONG`` characters in ``value``."""
    if isinstance(value, str):
        if len(value) > LONG:
            sizes[id(value)] = _json_len(value)
    elif isinstance(value, dict):
        for item in value.values():
            _long_strings(item, sizes)
    elif isinstance(value, list | tuple):
        for item in value:
            _long_strings(item, sizes)


def _json_len(text: str) -> int:
    """The size of ``text`` as a JSON string, quotes aside (``json.dumps`` escapes all but
    printable ASCII: 2 to 12 bytes a character)."""
    if text.isascii() and not _ESCAPED.search(text):
        return len(text)
    return len(json.dumps(text)) - 2


def _water_level(lengths: list[int], excess: int) -> int:
    """The largest ``cap`` such that cutting every length to ``cap`` removes ``excess`` or more."""
    ordered = sorted(lengths, reverse=True)
    removed_above = 0  # what cutting to ordered[i] removes from the i longest
    for i, length in enumerate(ordered):
        nxt = ordered[i + 1] if i + 1 < len(ordered) else 0
        # cutting the i+1 longest down to nxt removes this much in all
        total = removed_above + (length - nxt) * (i + 1)
        if total >= excess:
            return max(0, nxt + (total - excess) // (i + 1))
        removed_above = total
    return 0


def _cut(value: Any, cap: int, sizes: dict[int, int]) -> Any:
    """``value`` with each long string over ``cap`` bytes of JSON cut to about ``cap``."""
    if isinstance(value, str):
        size = sizes.get(id(value)) if len(value) > LONG else None
        if size is None or size <= cap:
            return value
        kept = value[:cap * len(value) // size]
        return kept + marker(utf8_len(value) - utf8_len(kept))
    if isinstance(value, dict):
        return {key: _cut(item, cap, sizes) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_cut(item, cap, sizes) for item in value]
    return value


class TextBudget:
    """A turn's reply text, kept up to ``limit`` bytes: the first half and the latest half of
    it, with a note of how much was dropped between them (so the start of the answer and the
    end of the turn are both there)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._head: list[str] = []
        self._head_bytes = 0
        self._tail: collections.deque[str] = collections.deque()
        self._tail_bytes = 0
        self.dropped = 0

    def append(self, text: str) -> None:
        size = utf8_len(text)
        room = self.limit - self.limit // 2 - self._head_bytes
        if room > 0 and not self._tail:
            if size <= room:
                self._head.append(text)
                self._head_bytes += size
                return
            head = _utf8_prefix(text, room)
            self._head.append(head)
            self._head_bytes += utf8_len(head)
            text = text[len(head):]
            size = utf8_len(text)
        self._tail.append(text)
        self._tail_bytes += size
        keep = self.limit // 2
        while self._tail_bytes > keep:
            first = self._tail[0]
            first_size = utf8_len(first)
            over = self._tail_bytes - keep
            if first_size <= over:
                self._tail.popleft()
                self._tail_bytes -= first_size
                self.dropped += first_size
            else:
                rest = _utf8_suffix(first, first_size - over)
                rest_size = utf8_len(rest)
                self._tail[0] = rest
                self._tail_bytes -= first_size - rest_size
                self.dropped += first_size - rest_size

    def __bool__(self) -> bool:
        """Whether any text came (as the plain list of chunks this replaced)."""
        return bool(self._head or self._tail or self.dropped)

    def text(self) -> str:
        head = "".join(self._head)
        tail = "".join(self._tail)
        return f"{head}\n{marker(self.dropped)}\n{tail}" if self.dropped else head + tail


def _utf8_prefix(text: str, nbytes: int) -> str:
    if text.isascii():
        return text[:nbytes]
    return text.encode("utf-8", "surrogatepass")[:nbytes].decode("utf-8", "ignore")


def _utf8_suffix(text: str, nbytes: int) -> str:
    if text.isascii():
        return text[len(text) - nbytes:] if nbytes else ""
    return text.encode("utf-8", "surrogatepass")[-nbytes:].decode("utf-8", "ignore") if nbytes else ""
