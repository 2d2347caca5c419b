"""A local fake LLM endpoint: OpenAI-compatible chat completions and the Gemini API, on 127.0.0.1.

Real agents (Qwen Code, Gemini CLI) are run against it instead of a cloud LLM, which the tests
must never call. It speaks the two wire formats those agents use:

* OpenAI ``POST /v1/chat/completions`` — JSON, or SSE when ``stream`` is true, with a final
  ``usage`` chunk when ``stream_options.include_usage`` is set (and always in the JSON body);
* Gemini ``POST /v1beta/models/<model>:streamGenerateContent?alt=sse`` (SSE, ``usageMetadata``
  on every event, cumulative) and ``:generateContent`` (JSON), plus ``:countTokens``.

Replies are chosen by rules, not by position, so that an agent's extra requests do not shift a
script: a request whose last message is a tool result gets ``TOOL_DONE_REPLY``; a user message
``write <absolute path> containing <text>`` gets a call of the agent's ``write_file`` tool
(Qwen Code's and Gemini CLI's name it so, with ``file_path`` and ``content``); anything else
gets ``Hello from the fake LLM. <echo>``, streamed word by word.

Token counts are deterministic functions of the request and reply; every request is recorded
with the usage block it was billed, so tests can compare an accounting with what the "endpoint"
billed. Runs in a thread (stdlib ``http.server``), independent of the test's event loop;
``python tests/fake_llm.py [PORT]`` serves it standalone.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOOL_DONE_REPLY = "Done: the file is written."
WRITE_RE = re.compile(r"write (/\S+) containing (.+)", re.S)


@dataclass
class Recorded:
    """One request the fake served."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    kind: str
    """``text``, ``tool_call``, ``tool_done``, ``count_tokens`` or ``error``."""
    usage: dict[str, int] = field(default_factory=dict)
    """What was billed, normalised: ``input``, ``output``, ``total`` (``thought``, ``cached``)."""


def _words(text: str) -> list[str]:
    return text.split(" ")


class FakeLLM:
    """The server. ``url`` is its base (``http://127.0.0.1:PORT``); ``requests`` what it served."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[Recorded] = []
        self._lock = threading.Lock()
        fake = self

        class Handler(_Handler):
            server_fake = fake

        self.httpd = ThreadingHTTPServer((host, port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread: threading.Thread | None = None

    def start(self) -> FakeLLM:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="fake-llm", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> FakeLLM:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def record(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)

    def billed(self) -> dict[str, int]:
        """The sum of every usage block served (what a real endpoint would have billed)."""
        out = {"input": 0, "output": 0, "total": 0, "requests": 0}
        with self._lock:
            for rec in self.requests:
                if rec.usage:
                    out["requests"] += 1
                    for key in ("input", "output", "total"):
                        out[key] += rec.usage.get(key, 0)
        return out

    # -- reply rules ---------------------------------------------------------------------------
    @staticmethod
    def decide(last_is_tool_result: bool, user_text: str, tool_names: list[str]) -> tuple[str, Any]:
        """("tool_done", text) | ("tool_call", (name, args)) | ("text", text)."""
        if last_is_tool_result:
            return "tool_done", TOOL_DONE_REPLY
        m = WRITE_RE.search(user_text)
        writer = next((n for n in tool_names if n == "write_file"), None)
        if m and writer:
            return "tool_call", (writer, {"file_path": m.group(1), "content": m.group(2).strip()})
        echo = " ".join(user_text.split()[:12])
        return "text", f"Hello from the fake LLM. You said: {echo}"

    @staticmethod
    def tokens_in(body: dict[str, Any]) -> int:
        """A deterministic prompt size: one token per 4 bytes of the request (at least 1)."""
        return max(1, len(json.dumps(body, sort_keys=True)) // 4)


class _Handler(BaseHTTPRequestHandler):
    server_fake: FakeLLM
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # -- plumbing ------------------------------------------------------------------------------
    def _body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            data = json.loads(raw or b"{}")
        except ValueError:
            data = {}
        return data if isinstance(data, dict) else {}

    def _json(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _sse_start(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _event(self, obj: Any) -> None:
        self._chunk(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")

    def _sse_end(self) -> None:
        self._chunk(b"")

    def do_GET(self) -> None:
        if urlsplit(self.path).path.rstrip("/").endswith("/models"):
            self._json(200, {"object": "list", "data": [{"id": "fake-model", "object": "model"}]})
            return
        self._json(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        if path.endswith("/chat/completions"):
            self._openai(path, headers, body)
        elif ":" in path and "/models/" in path:
            self._gemini(path, headers, body)
        else:
            self.server_fake.record(Recorded(path, headers, body, "error"))
            self._json(404, {"error": {"message": f"no route {path}"}})

    # -- OpenAI --------------------------------------------------------------------------------
    def _openai(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        fake = self.server_fake
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        user_text = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
                         "")
        tools = [t.get("function", {}).get("name", "") for t in body.get("tools") or []]
        kind, reply = fake.decide(last.get("role") == "tool", user_text, tools)
        model = body.get("model") or "fake-model"
        prompt = fake.tokens_in(body)
        if kind == "tool_call":
            name, args = reply
            completion = 3 + len(json.dumps(args)) // 4
        else:
            completion = len(_words(reply))
        usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                 "total_tokens": prompt + completion}
        fake.record(Recorded(path, headers, body, kind,
                             {"input": prompt, "output": completion, "total": prompt + completion}))
        base = {"id": "chatcmpl-fake", "created": 1, "model": model}
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": None if kind == "tool_call" else reply}
            if kind == "tool_call":
                message["tool_calls"] = [{"id": "call_1", "type": "function",
                                          "function": {"name": reply[0], "arguments": json.dumps(reply[1])}}]
            self._json(200, {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": message,
                 "finish_reason": "tool_calls" if kind == "tool_call" else "stop"}]})
            return
        self._sse_start()
        chunk = {**base, "object": "chat.completion.chunk"}
        if kind == "tool_call":
            name, args = reply
            self._event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "tool_calls": [
                {"index": 0, "id": "call_1", "type": "function",
                 "function": {"name": name, "arguments": ""}}]}, "finish_reason": None}]})
            self._event({**chunk, "choices": [{"index": 0, "delta": {"tool_calls": [
                {"index": 0, "function": {"arguments": json.dumps(args)}}]}, "finish_reason": None}]})
            finish = "tool_calls"
        else:
            words = _words(reply)
            for i, word in enumerate(words):
                delta = {"content": word + (" " if i < len(words) - 1 else "")}
                if i == 0:
                    delta["role"] = "assistant"
                self._event({**chunk, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
            finish = "stop"
        self._event({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            self._event({**chunk, "choices": [], "usage": usage})
        self._event(b"[DONE]")
        self._sse_end()

    # -- Gemini --------------------------------------------------------------------------------
    def _gemini(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        fake = self.server_fake
        model, _, method = path.rpartition("/models/")[2].partition(":")
        if method == "countTokens":
            fake.record(Recorded(path, headers, body, "count_tokens"))
            self._json(200, {"totalTokens": fake.tokens_in(body)})
            return
        contents = body.get("contents") or []
        last_parts = (contents[-1].get("parts") or []) if contents else []
        last_is_tool = any("functionResponse" in p for p in last_parts)
        user_text = ""
        for content in reversed(contents):
            texts = [p["text"] for p in content.get("parts") or [] if isinstance(p.get("text"), str)]
            if content.get("role") == "user" and texts:
                user_text = texts[-1]
                break
        tools = [d.get("name", "") for t in body.get("tools") or []
                 for d in t.get("functionDeclarations") or []]
        kind, reply = fake.decide(last_is_tool, user_text, tools)
        if (body.get("generationConfig") or {}).get("responseMimeType") == "application/json":
            kind, reply = "text", json.dumps({"reasoning": "fake", "next_speaker": "user"})
        prompt = fake.tokens_in(body)
        if kind == "tool_call":
            parts_seq = [[{"functionCall": {"name": reply[0], "args": reply[1]}}]]
            completion = 3 + len(json.dumps(reply[1])) // 4
        else:
            words = _words(reply)
            parts_seq = [[{"text": w + (" " if i < len(words) - 1 else "")}] for i, w in enumerate(words)]
            completion = len(words)
        fake.record(Recorded(path, headers, body, kind,
                             {"input": prompt, "output": completion, "total": prompt + completion}))

        def event(parts: list[dict[str, Any]], out: int, last: bool) -> dict[str, Any]:
            cand: dict[str, Any] = {"content": {"role": "model", "parts": parts}, "index": 0}
            if last:
                cand["finishReason"] = "STOP"
            return {"candidates": [cand], "modelVersion": model,
                    "usageMetadata": {"promptTokenCount": prompt, "candidatesTokenCount": out,
                                      "totalTokenCount": prompt + out}}

        if method == "generateContent":
            parts = [p for seq in parts_seq for p in seq]
            if kind == "text":
                parts = [{"text": reply}]
            self._json(200, event(parts, completion, True))
            return
        if method != "streamGenerateContent":
            self._json(404, {"error": {"code": 404, "message": f"no method {method}"}})
            return
        sse = parse_qs(urlsplit(self.path).query).get("alt") == ["sse"]
        events = []
        for i, parts in enumerate(parts_seq):
            last = i == len(parts_seq) - 1
            # cumulative like the real API: the count grows, the last event has the whole reply
            out = completion if last else min(completion, i + 1)
            events.append(event(parts, out, last))
        if not sse:
            self._json(200, events)
            return
        self._sse_start()
        for ev in events:
            self._event(ev)
        self._sse_end()


def _text_of(content: Any) -> str:
    """A message's text; of several parts (Qwen adds system reminders first), the last one."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("text")]
        return texts[-1] if texts else ""
    return ""


if __name__ == "__main__":
    server = FakeLLM(port=int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    print(server.url, flush=True)
    server.httpd.serve_forever()
