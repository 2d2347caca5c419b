"""A local fake LLM endpoint on 127.0.0.1 speaking the four wire formats real agents use.

Real agents are run against it instead of a cloud LLM, which the tests must never call:

* OpenAI ``POST /v1/chat/completions`` (Qwen Code) — JSON, or SSE when ``stream`` is true, with
  a final ``usage`` chunk when ``stream_options.include_usage`` is set (and always in the JSON);
* Gemini ``POST /v1beta/models/<model>:streamGenerateContent?alt=sse`` (Gemini CLI; SSE,
  ``usageMetadata`` on every event, cumulative) and ``:generateContent`` (JSON), plus
  ``:countTokens``;
* Anthropic Messages ``POST /v1/messages`` (Claude Code) — SSE with ``event:`` lines when
  ``stream`` is true (``message_start`` with the input, cache-creation and cache-read tokens,
  ``message_delta`` with the output), else one JSON ``message``;
* OpenAI Responses ``POST /v1/responses`` (Codex) — SSE ending in ``response.completed`` whose
  usage has ``input_tokens_details.cached_tokens`` and ``output_tokens_details.reasoning_tokens``,
  else one JSON ``response``.

Replies are chosen by rules, not by position, so that an agent's extra requests (title calls)
do not shift a script. A user message ``write <absolute path> containing <text>`` asks for a
file, ``run `<command>``` for a command; the reply calls the agent's tool for each step in turn
(counting the tool results since that user message), then answers ``TOOL_DONE_REPLY``. Qwen
Code and Gemini CLI write with ``write_file``; Claude Code with ``Write`` and runs with
``Bash``; Codex writes with ``apply_patch`` and runs with ``shell`` (or ``shell_command`` /
``exec_command``, whichever it offers). Anything else gets ``Hello from the fake LLM. <echo>``,
streamed word by word.

Token counts are deterministic functions of the request and reply; the Anthropic and Responses
endpoints also bill cached prompt tokens and reasoning tokens, so that a meter that drops them
shows. Every request is recorded with the usage it was billed, normalised (``input`` is the
whole prompt, cached part included; ``output`` the whole completion, reasoning included), so
tests can compare an accounting with what the "endpoint" billed, request by request. Runs in a
thread (stdlib ``http.server``), independent of the test's event loop;
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
#: In the scripted tool loop (Anthropic, Responses) the text to write ends before ``, then run``.
STEP_WRITE_RE = re.compile(r"write (/\S+) containing (.+?)(?:,? then run `|$)", re.S)
RUN_RE = re.compile(r"run `([^`]+)`")
#: Tool names per role, in order of preference, across the agents' tool sets.
WRITE_TOOLS = ("Write", "mcp__acp__Write", "apply_patch")
RUN_TOOLS = ("Bash", "mcp__acp__Bash", "shell", "shell_command", "exec_command")


@dataclass
class Recorded:
    """One request the fake served."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    kind: str
    """``text``, ``tool_call``, ``tool_done``, ``count_tokens`` or ``error``."""
    usage: dict[str, int] = field(default_factory=dict)
    """What was billed, normalised: ``input``, ``output``, ``total``, ``thought``,
    ``cached_read``, ``cached_write`` (the last three 0 where the format has none)."""


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
        out = {"input": 0, "output": 0, "total": 0, "thought": 0, "cached_read": 0, "cached_write": 0,
               "requests": 0}
        with self._lock:
            for rec in self.requests:
                if rec.usage:
                    out["requests"] += 1
                    for key in USAGE_KEYS:
                        out[key] += rec.usage.get(key, 0)
        return out

    def billed_requests(self) -> list[dict[str, int]]:
        """Each billed request's usage, in the order served."""
        with self._lock:
            return [{key: rec.usage.get(key, 0) for key in USAGE_KEYS} for rec in self.requests if rec.usage]

    @staticmethod
    def script_step(user_text: str, done: int, tools: list[str]) -> tuple[str, Any]:
        """The scripted tool loop (Anthropic, Responses): the step after ``done`` tool results.

        ("tool_call", (role, tool name, path or command, text)) | ("tool_done", text) | ("text", text)."""
        steps: list[tuple[str, str, str]] = []
        m = STEP_WRITE_RE.search(user_text)
        writer = next((n for n in WRITE_TOOLS if n in tools), None)
        if m and writer:
            steps.append(("write", m.group(1), m.group(2).strip()))
        r = RUN_RE.search(user_text)
        runner = next((n for n in RUN_TOOLS if n in tools), None)
        if r and runner:
            steps.append(("run", r.group(1), ""))
        if done < len(steps):
            role, target, text = steps[done]
            return "tool_call", (role, writer if role == "write" else runner, target, text)
        if done:
            return "tool_done", TOOL_DONE_REPLY
        echo = " ".join(user_text.split()[:12])
        return "text", f"Hello from the fake LLM. You said: {echo}"

    @staticmethod
    def cache_split(prompt: int) -> tuple[int, int]:
        """(cache read, cache write) tokens billed for a prompt of ``prompt`` tokens."""
        return prompt // 3, prompt // 7

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


USAGE_KEYS = ("input", "output", "total", "thought", "cached_read", "cached_write")
#: Reasoning tokens billed per Responses request (part of ``output_tokens``, like OpenAI's).
REASONING_TOKENS = 5
TOOL_OUTPUTS = ("function_call_output", "custom_tool_call_output", "local_shell_call_output")


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

    def _named_event(self, name: str, obj: Any) -> None:
        """An SSE event with an ``event:`` line (Anthropic's and the Responses API's style)."""
        self._chunk(f"event: {name}\n".encode() + b"data: " + json.dumps(obj).encode() + b"\n\n")

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
        elif path.endswith("/v1/messages"):
            self._anthropic(path, headers, body)
        elif path.endswith("/v1/responses"):
            self._responses(path, headers, body)
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


    # -- Anthropic Messages --------------------------------------------------------------------
    def _anthropic(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        fake = self.server_fake
        messages = body.get("messages") or []
        user_text, done = "", 0
        for message in reversed(messages):
            content = message.get("content")
            blocks = content if isinstance(content, list) else [{"type": "text", "text": content}]
            if message.get("role") != "user":
                continue
            results = [b for b in blocks if isinstance(b, dict) and b.get("type") == "tool_result"]
            texts = [b.get("text") for b in blocks if isinstance(b, dict) and b.get("type") == "text"
                     and isinstance(b.get("text"), str) and not b["text"].lstrip().startswith("<")]
            done += len(results)
            if texts and not results:
                user_text = texts[-1]
                break
        tools = [t.get("name", "") for t in body.get("tools") or [] if isinstance(t, dict)]
        kind, reply = fake.script_step(user_text, done, tools)
        model = body.get("model") or "fake-model"
        prompt = fake.tokens_in(body)
        cached_read, cached_write = fake.cache_split(prompt)
        fresh = prompt - cached_read - cached_write
        if kind == "tool_call":
            _role, name, target, text = reply
            args = {"file_path": target, "content": text} if _role == "write" else \
                {"command": target, "description": "Run the command"}
            call_id = f"toolu_{len(fake.requests) + 1}"
            blocks = [{"type": "tool_use", "id": call_id, "name": name, "input": args}]
            completion = 3 + len(json.dumps(args)) // 4
            stop = "tool_use"
        else:
            blocks = [{"type": "text", "text": reply}]
            completion = len(_words(reply))
            stop = "end_turn"
        fake.record(Recorded(path, headers, body, kind if kind != "tool_call" else "tool_call",
                             {"input": prompt, "output": completion, "total": prompt + completion,
                              "thought": 0, "cached_read": cached_read, "cached_write": cached_write}))
        usage = {"input_tokens": fresh, "cache_creation_input_tokens": cached_write,
                 "cache_read_input_tokens": cached_read, "output_tokens": completion}
        message = {"id": "msg_fake", "type": "message", "role": "assistant", "model": model,
                   "content": blocks, "stop_reason": stop, "stop_sequence": None, "usage": usage}
        if not body.get("stream"):
            self._json(200, message)
            return
        self._sse_start()
        self._named_event("message_start", {"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}})
        for index, block in enumerate(blocks):
            if block["type"] == "text":
                self._named_event("content_block_start", {"type": "content_block_start", "index": index,
                                                          "content_block": {"type": "text", "text": ""}})
                words = _words(block["text"])
                for i, word in enumerate(words):
                    piece = word + (" " if i < len(words) - 1 else "")
                    self._named_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                              "delta": {"type": "text_delta", "text": piece}})
            else:
                self._named_event("content_block_start", {"type": "content_block_start", "index": index,
                                                          "content_block": {**block, "input": {}}})
                delta = {"type": "input_json_delta", "partial_json": json.dumps(block["input"])}
                self._named_event("content_block_delta", {"type": "content_block_delta", "index": index,
                                                          "delta": delta})
            self._named_event("content_block_stop", {"type": "content_block_stop", "index": index})
        self._named_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": stop, "stop_sequence": None},
                                            "usage": {"output_tokens": completion}})
        self._named_event("message_stop", {"type": "message_stop"})
        self._sse_end()

    # -- OpenAI Responses ----------------------------------------------------------------------
    def _responses(self, path: str, headers: dict[str, str], body: dict[str, Any]) -> None:
        fake = self.server_fake
        items = body.get("input") or []
        if isinstance(items, str):
            items = [{"type": "message", "role": "user", "content": items}]
        user_text, done = "", 0
        for item in reversed(items):
            if not isinstance(item, dict):
                continue
            if item.get("type") in TOOL_OUTPUTS:
                done += 1
            elif item.get("role") == "user":
                content = item.get("content")
                parts = content if isinstance(content, list) else [{"text": content}]
                texts = [p["text"] for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
                         and not p["text"].lstrip().startswith(("<", "#"))]
                if texts:
                    user_text = texts[-1]
                    break
        tools = {t.get("name", ""): t for t in body.get("tools") or [] if isinstance(t, dict)}
        kind, reply = fake.script_step(user_text, done, list(tools))
        model = body.get("model") or "fake-model"
        prompt = fake.tokens_in(body)
        cached, _ = fake.cache_split(prompt)
        n = len(fake.requests) + 1
        if kind == "tool_call":
            role, name, target, text = reply
            tool = tools[name]
            if role == "write":
                patch = f"*** Begin Patch\n*** Add File: {target}\n+{text}\n*** End Patch\n"
                payload: Any = patch if tool.get("type") == "custom" else json.dumps({"input": patch})
            elif name == "shell":
                payload = json.dumps({"command": ["bash", "-lc", target]})
            elif name == "exec_command":
                args: dict[str, Any] = {"cmd": target}
                if "sandbox_permissions" in json.dumps(tool.get("parameters") or {}):
                    # Codex runs commands in its own read-only sandbox unless the model asks to
                    # run one outside it, which it asks the user for (an ACP permission request)
                    args.update(sandbox_permissions="require_escalated",
                                justification="Run the command the user asked for")
                payload = json.dumps(args)
            else:
                payload = json.dumps({"command": target})
            if tool.get("type") == "custom":
                item = {"id": f"ctc_{n}", "type": "custom_tool_call", "status": "completed",
                        "call_id": f"call_{n}", "name": name, "input": payload}
            else:
                item = {"id": f"fc_{n}", "type": "function_call", "status": "completed",
                        "call_id": f"call_{n}", "name": name, "arguments": payload}
            completion = 3 + len(payload) // 4
        else:
            item = {"id": f"msg_{n}", "type": "message", "status": "completed", "role": "assistant",
                    "content": [{"type": "output_text", "text": reply, "annotations": []}]}
            completion = len(_words(reply))
        output_tokens = completion + REASONING_TOKENS
        fake.record(Recorded(path, headers, body, kind,
                             {"input": prompt, "output": output_tokens, "total": prompt + output_tokens,
                              "thought": REASONING_TOKENS, "cached_read": cached, "cached_write": 0}))
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": output_tokens,
                 "output_tokens_details": {"reasoning_tokens": REASONING_TOKENS},
                 "total_tokens": prompt + output_tokens}
        response = {"id": f"resp_{n}", "object": "response", "created_at": 1, "status": "completed",
                    "model": model, "output": [item], "usage": usage}
        if not body.get("stream"):
            self._json(200, response)
            return
        self._sse_start()
        seq = iter(range(1000))
        self._named_event("response.created", {"type": "response.created", "sequence_number": next(seq),
                                               "response": {**response, "status": "in_progress",
                                                            "output": [], "usage": None}})
        if item["type"] == "message":
            start = {**item, "status": "in_progress", "content": []}
            self._named_event("response.output_item.added", {"type": "response.output_item.added",
                                                             "sequence_number": next(seq), "output_index": 0,
                                                             "item": start})
            self._named_event("response.content_part.added", {
                "type": "response.content_part.added", "sequence_number": next(seq), "item_id": item["id"],
                "output_index": 0, "content_index": 0,
                "part": {"type": "output_text", "text": "", "annotations": []}})
            words = _words(reply)
            for i, word in enumerate(words):
                self._named_event("response.output_text.delta", {
                    "type": "response.output_text.delta", "sequence_number": next(seq), "item_id": item["id"],
                    "output_index": 0, "content_index": 0,
                    "delta": word + (" " if i < len(words) - 1 else "")})
            self._named_event("response.output_text.done", {
                "type": "response.output_text.done", "sequence_number": next(seq), "item_id": item["id"],
                "output_index": 0, "content_index": 0, "text": reply})
        else:
            self._named_event("response.output_item.added", {"type": "response.output_item.added",
                                                             "sequence_number": next(seq), "output_index": 0,
                                                             "item": {**item, "status": "in_progress"}})
        self._named_event("response.output_item.done", {"type": "response.output_item.done",
                                                        "sequence_number": next(seq), "output_index": 0,
                                                        "item": item})
        self._named_event("response.completed", {"type": "response.completed", "sequence_number": next(seq),
                                                 "response": response})
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
