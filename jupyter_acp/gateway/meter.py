"""Read the token usage an LLM endpoint bills out of its responses, streamed or not.

The gateway passes every response body through a ``UsageMeter`` while relaying it. The meter
understands the four wire formats the built-in agents speak:

* OpenAI chat completions (Qwen Code): a JSON body with ``usage {prompt_tokens,
  completion_tokens, total_tokens, prompt_tokens_details.cached_tokens,
  completion_tokens_details.reasoning_tokens}``, or SSE ``data:`` events where the last one
  carrying ``usage`` (sent when ``stream_options.include_usage`` is set — the gateway sets it)
  holds the request's totals;
* OpenAI Responses (Codex): a JSON ``response`` object, or SSE events of which
  ``response.completed`` (or ``response.incomplete`` / ``response.failed``, also billed) carries
  the response with ``usage {input_tokens, input_tokens_details.cached_tokens, output_tokens,
  output_tokens_details.reasoning_tokens, total_tokens}``;
* Gemini ``generateContent`` / ``streamGenerateContent`` (Gemini CLI): ``usageMetadata
  {promptTokenCount, candidatesTokenCount, thoughtsTokenCount, cachedContentTokenCount,
  totalTokenCount}``, cumulative over a stream (the last one counts), as SSE, one JSON object or
  a JSON array;
* Anthropic Messages (Claude Code): ``usage`` on the JSON body, or ``message_start`` (input,
  cache creation and cache read tokens, and the output so far) and ``message_delta`` events
  (output, cumulative; recent API versions repeat the input counts there, cumulative too).

The mapping is what the endpoint bills: ``input_tokens`` is the whole prompt (cached part
included, also reported as ``cached_read_tokens``; for Anthropic, which bills cache reads and
writes apart from ``input_tokens``, their sum), ``output_tokens`` the whole completion
(reasoning included for OpenAI, reported apart as ``thought_tokens``), ``total_tokens`` the
endpoint's own total when it gives one. A response in none of these shapes yields ``None``:
what the gateway does then is in ``endpoints.py``.
"""

from __future__ import annotations

import json
from typing import Any

from ..usage import (
    TurnUsage,
    _int,  # a count from an untrusted report: non-negative, 0 if unreadable
)


def _dict(value: Any) -> dict[str, Any]:
    """A details block, or {} when it is missing or not an object."""
    return value if isinstance(value, dict) else {}


#: Wire formats the gateway and the meter understand.
APIS = ("openai", "gemini", "anthropic")


class UsageMeter:
    """Fed the response body chunk by chunk; ``result()`` is the request's usage (or None)."""

    def __init__(self, api: str) -> None:
        if api not in APIS:
            raise ValueError(f"Unknown LLM API {api!r}; known: {', '.join(APIS)}")
        self.api = api
        self._buffer = bytearray()
        self._sse: bool | None = None
        self._usage: dict[str, int] | None = None
        self.model: str | None = None
        # anthropic streams split input (message_start) and output (message_delta)
        self._anthropic: dict[str, int] = {}

    def feed(self, chunk: bytes) -> None:
        self._buffer += chunk
        if self._sse is None:
            head = bytes(self._buffer).lstrip()
            if head:
                self._sse = not head.startswith((b"{", b"["))
        if self._sse:
            self._drain_events()

    def _drain_events(self, final: bool = False) -> None:
        data = bytes(self._buffer).replace(b"\r\n", b"\n")
        *events, rest = data.split(b"\n\n")
        if final:
            events.append(rest)
            rest = b""
        self._buffer = bytearray(rest)
        for event in events:
            lines = event.split(b"\n")
            payload = b"\n".join(line[5:].lstrip() for line in lines if line.startswith(b"data:"))
            if not payload or payload.strip() == b"[DONE]":
                continue
            try:
                obj = json.loads(payload)
            except ValueError:
                continue
            self._observe(obj)

    def result(self) -> TurnUsage | None:
        """The usage of the whole response; call once, after the last chunk."""
        if self._sse:
            self._drain_events(final=True)
        elif self._buffer:
            try:
                obj = json.loads(bytes(self._buffer))
            except ValueError:
                obj = None
            for item in obj if isinstance(obj, list) else [obj]:
                if isinstance(item, dict):
                    self._observe(item)
        if self._anthropic and self._usage is None:
            self._usage = self._anthropic_totals()
        if self._usage is None:
            return None
        u = self._usage
        return TurnUsage(input_tokens=u["input"], output_tokens=u["output"], thought_tokens=u["thought"],
                         cached_read_tokens=u["cached_read"], cached_write_tokens=u["cached_write"],
                         total_tokens=u["total"] or u["input"] + u["output"], model=self.model,
                         source="gateway")

    # -- per format ----------------------------------------------------------------------------
    def _observe(self, obj: dict[str, Any]) -> None:
        if isinstance(obj.get("model"), str):
            self.model = obj["model"]
        elif isinstance(obj.get("modelVersion"), str):
            self.model = obj["modelVersion"]
        if self.api == "openai":
            if isinstance(obj.get("response"), dict) and str(obj.get("type", "")).startswith("response."):
                obj = obj["response"]  # a Responses stream event: the response it carries
                if isinstance(obj.get("model"), str):
                    self.model = obj["model"]
            usage = obj.get("usage")
            if isinstance(usage, dict) and ("input_tokens" in usage or "output_tokens" in usage):
                self._observe_responses(usage)
            elif isinstance(usage, dict):
                details = _dict(usage.get("prompt_tokens_details"))
                out_details = _dict(usage.get("completion_tokens_details"))
                self._usage = {"input": _int(usage.get("prompt_tokens")),
                               "output": _int(usage.get("completion_tokens")),
                               "thought": _int(out_details.get("reasoning_tokens")),
                               "cached_read": _int(details.get("cached_tokens")), "cached_write": 0,
                               "total": _int(usage.get("total_tokens"))}
        elif self.api == "gemini":
            meta = obj.get("usageMetadata")
            if isinstance(meta, dict):  # cumulative over a stream: the last one wins
                self._usage = {"input": _int(meta.get("promptTokenCount")),
                               "output": _int(meta.get("candidatesTokenCount")),
                               "thought": _int(meta.get("thoughtsTokenCount")),
                               "cached_read": _int(meta.get("cachedContentTokenCount")), "cached_write": 0,
                               "total": _int(meta.get("totalTokenCount"))}
        else:
            self._observe_anthropic(obj)

    def _observe_responses(self, usage: dict[str, Any]) -> None:
        """OpenAI Responses ``usage``: input includes the cached part, output the reasoning."""
        details = _dict(usage.get("input_tokens_details"))
        out_details = _dict(usage.get("output_tokens_details"))
        self._usage = {"input": _int(usage.get("input_tokens")), "output": _int(usage.get("output_tokens")),
                       "thought": _int(out_details.get("reasoning_tokens")),
                       "cached_read": _int(details.get("cached_tokens")), "cached_write": 0,
                       "total": _int(usage.get("total_tokens"))}

    def _observe_anthropic(self, obj: dict[str, Any]) -> None:
        kind = obj.get("type")
        if kind == "message_start" and isinstance(obj.get("message"), dict):
            usage = _dict(obj["message"].get("usage"))
            if isinstance(obj["message"].get("model"), str):
                self.model = obj["message"]["model"]
            self._anthropic.update(input=_int(usage.get("input_tokens")),
                                   output=_int(usage.get("output_tokens")),
                                   cached_read=_int(usage.get("cache_read_input_tokens")),
                                   cached_write=_int(usage.get("cache_creation_input_tokens")))
        elif kind == "message_delta" and isinstance(obj.get("usage"), dict):
            usage = obj["usage"]  # cumulative: a count given here replaces message_start's
            self._anthropic["output"] = _int(usage.get("output_tokens"))
            for key, name in (("input", "input_tokens"), ("cached_read", "cache_read_input_tokens"),
                              ("cached_write", "cache_creation_input_tokens")):
                if usage.get(name) is not None:
                    self._anthropic[key] = _int(usage.get(name))
        elif kind == "message" and isinstance(obj.get("usage"), dict):
            usage = obj["usage"]
            self._anthropic = {"input": _int(usage.get("input_tokens")),
                               "output": _int(usage.get("output_tokens")),
                               "cached_read": _int(usage.get("cache_read_input_tokens")),
                               "cached_write": _int(usage.get("cache_creation_input_tokens"))}

    def _anthropic_totals(self) -> dict[str, int]:
        a = self._anthropic
        # Anthropic bills cache reads/writes on top of input_tokens (they are not part of it)
        inp = a.get("input", 0) + a.get("cached_read", 0) + a.get("cached_write", 0)
        return {"input": inp, "output": a.get("output", 0), "thought": 0,
                "cached_read": a.get("cached_read", 0), "cached_write": a.get("cached_write", 0),
                "total": inp + a.get("output", 0)}
