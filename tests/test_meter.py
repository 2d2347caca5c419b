"""The gateway's meter on the Anthropic Messages and OpenAI Responses formats, with exact numbers,
and what the gateway does with a response it cannot meter (``gateway/endpoints.py``).

The unit tests feed recorded-shape bodies split at every few bytes (as the network splits
them); the gateway tests run the fake LLM's Anthropic and Responses endpoints through a route
and compare the ledger with what the fake billed, request by request, cached and reasoning
tokens included.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from fake_llm import FakeLLM
from test_gateway import REAL_KEY, http, open_route

from jupyter_acp.gateway import UsageMeter
from jupyter_acp.gateway.endpoints import UNMETERED_SOURCE, endpoint_kind, estimate
from jupyter_acp.usage import TurnUsage, UsageLedger


def metered(api: str, body: bytes, step: int = 7) -> TurnUsage | None:
    meter = UsageMeter(api)
    for i in range(0, len(body), step):
        meter.feed(body[i:i + step])
    return meter.result()


def counts(usage: TurnUsage | None) -> tuple[int, ...]:
    assert usage is not None
    return (usage.input_tokens, usage.output_tokens, usage.thought_tokens, usage.cached_read_tokens,
            usage.cached_write_tokens, usage.total_tokens)


def sse(*events: tuple[str, dict[str, Any]]) -> bytes:
    return b"".join(f"event: {name}\ndata: {json.dumps(obj)}\n\n".encode() for name, obj in events)


# -- Anthropic Messages --------------------------------------------------------------------------
def test_anthropic_stream_counts_cache_creation_and_cache_reads_on_top_of_input():
    body = sse(
        ("message_start", {"type": "message_start", "message": {
            "id": "m", "model": "claude-sonnet-4-5", "usage": {
                "input_tokens": 21, "cache_creation_input_tokens": 1800, "cache_read_input_tokens": 14000,
                "output_tokens": 1}}}),
        ("content_block_delta", {"type": "content_block_delta", "index": 0,
                                 "delta": {"type": "text_delta", "text": "hi"}}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                           "usage": {"output_tokens": 503}}),
        ("message_stop", {"type": "message_stop"}))
    usage = metered("anthropic", body)
    # input = 21 + 1800 + 14000 (Anthropic bills cache writes and reads apart from input_tokens)
    assert counts(usage) == (15821, 503, 0, 14000, 1800, 16324)
    assert usage is not None and usage.model == "claude-sonnet-4-5" and usage.source == "gateway"


def test_anthropic_message_delta_with_cumulative_input_counts_replaces_message_start():
    body = sse(
        ("message_start", {"type": "message_start", "message": {"model": "c", "usage": {
            "input_tokens": 10, "cache_read_input_tokens": 0, "output_tokens": 1}}}),
        ("message_delta", {"type": "message_delta", "usage": {
            "input_tokens": 12, "cache_read_input_tokens": 300, "cache_creation_input_tokens": 40,
            "output_tokens": 77}}))
    assert counts(metered("anthropic", body, step=3)) == (352, 77, 0, 300, 40, 429)


def test_anthropic_json_message():
    body = json.dumps({"type": "message", "model": "c", "content": [], "usage": {
        "input_tokens": 5, "cache_creation_input_tokens": 7, "cache_read_input_tokens": 11,
        "output_tokens": 13}}).encode()
    assert counts(metered("anthropic", body)) == (23, 13, 0, 11, 7, 36)


# -- OpenAI Responses -----------------------------------------------------------------------------
RESPONSES_USAGE = {"input_tokens": 9000, "input_tokens_details": {"cached_tokens": 8192},
                   "output_tokens": 1200, "output_tokens_details": {"reasoning_tokens": 1024},
                   "total_tokens": 10200}


def test_responses_stream_reads_response_completed():
    body = sse(
        ("response.created", {"type": "response.created", "sequence_number": 0,
                              "response": {"id": "r", "model": "gpt-5.1-codex", "usage": None}}),
        ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "hi",
                                        "sequence_number": 1}),
        ("response.completed", {"type": "response.completed", "sequence_number": 2, "response": {
            "id": "r", "model": "gpt-5.1-codex", "status": "completed", "usage": RESPONSES_USAGE}}))
    usage = metered("openai", body)
    # output includes the reasoning (reported apart); input includes the cached part
    assert counts(usage) == (9000, 1200, 1024, 8192, 0, 10200)
    assert usage is not None and usage.model == "gpt-5.1-codex"


def test_responses_incomplete_is_billed_too():
    body = sse(("response.incomplete", {"type": "response.incomplete", "response": {
        "status": "incomplete", "usage": {"input_tokens": 40, "output_tokens": 4096,
                                          "total_tokens": 4136}}}))
    assert counts(metered("openai", body)) == (40, 4096, 0, 0, 0, 4136)


def test_responses_json_body():
    body = json.dumps({"id": "r", "object": "response", "model": "m", "output": [],
                       "usage": RESPONSES_USAGE}).encode()
    assert counts(metered("openai", body)) == (9000, 1200, 1024, 8192, 0, 10200)


def test_responses_stream_without_completed_event_is_not_metered():
    body = sse(("response.created", {"type": "response.created", "response": {"usage": None}}),
               ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "x"}))
    assert metered("openai", body) is None


# -- endpoints and the unmetered rule --------------------------------------------------------------
@pytest.mark.parametrize(("api", "method", "path", "kind"), [
    ("openai", "POST", "/chat/completions", "billed"),
    ("openai", "POST", "/responses", "billed"),
    ("openai", "GET", "/models", "free"),
    ("openai", "POST", "/audio/speech", None),
    ("openai", "POST", "/responses/compact", None),
    ("anthropic", "POST", "/v1/messages", "billed"),
    ("anthropic", "POST", "/v1/messages/count_tokens", "free"),
    ("anthropic", "POST", "/v1/messages/batches", None),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:streamGenerateContent", "billed"),
    ("gemini", "POST", "/v1beta/models/gemini-2.5-flash:countTokens", "free"),
    ("gemini", "POST", "/v1beta/cachedContents", None),
])
def test_endpoint_kinds(api: str, method: str, path: str, kind: str | None):
    assert endpoint_kind(api, method, path) == kind


def test_estimate_is_flagged():
    usage = estimate(4000, 801, "m")
    assert counts(usage) == (1000, 200, 0, 0, 0, 1200) and usage.source == UNMETERED_SOURCE


# -- through the gateway, against the fake LLM -----------------------------------------------------
def ledger_equals_billed(fake: FakeLLM, ledger: UsageLedger) -> None:
    """Request by request: the ledger's records are the fake's bills, cached and reasoning too."""
    records = [(r["input_tokens"], r["output_tokens"], r["thought_tokens"], r["cached_read_tokens"],
                r["cached_write_tokens"], r["total_tokens"]) for r in ledger.turns("s1")]
    billed = [(b["input"], b["output"], b["thought"], b["cached_read"], b["cached_write"], b["total"])
              for b in fake.billed_requests()]
    assert records == billed and billed


@pytest.mark.parametrize("stream", [True, False])
async def test_anthropic_messages_through_the_gateway(fake, gateway, acp_ledger, stream):
    route = open_route(gateway, acp_ledger, fake.url, api="anthropic")
    status, _, body = await http(route.socket_path, "POST", "/v1/messages?beta=true",
                                 {"x-api-key": route.dummy_key},
                                 {"model": "claude-x", "stream": stream, "max_tokens": 100,
                                  "messages": [{"role": "user", "content": "hello there"}]})
    assert status == 200 and b"Hello" in body and (b"message_stop" in body) == stream
    assert fake.requests[0].headers["x-api-key"] == REAL_KEY
    ledger_equals_billed(fake, acp_ledger)
    assert fake.billed()["cached_read"] > 0 and fake.billed()["cached_write"] > 0


@pytest.mark.parametrize("stream", [True, False])
async def test_openai_responses_through_the_gateway(fake, gateway, acp_ledger, stream):
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    status, _, body = await http(route.socket_path, "POST", "/v1/responses",
                                 {"Authorization": f"Bearer {route.dummy_key}"},
                                 {"model": "gpt-x", "stream": stream, "input": [
                                     {"type": "message", "role": "user",
                                      "content": [{"type": "input_text", "text": "hello"}]}]})
    assert status == 200 and b"Hello" in body and (b"response.completed" in body) == stream
    assert "stream_options" not in fake.requests[0].body  # the Responses API refuses it
    ledger_equals_billed(fake, acp_ledger)
    assert fake.billed()["thought"] > 0 and fake.billed()["cached_read"] > 0


async def test_an_endpoint_it_cannot_meter_is_refused_before_it_is_forwarded(fake, gateway, acp_ledger):
    route = open_route(gateway, acp_ledger, fake.url + "/v1")
    status, _, body = await http(route.socket_path, "POST", "/v1/audio/speech",
                                 {"Authorization": f"Bearer {route.dummy_key}"}, {"input": "x"})
    assert status == 404 and b"cannot meter" in body and fake.requests == []


class _NoUsage(BaseHTTPRequestHandler):
    """An endpoint whose answers carry no usage (a format the meter does not know)."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i in range(3):
            data = f'data: {{"type": "response.output_text.delta", "delta": "w{i}"}}\n\n'.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.wfile.write(b"0\r\n\r\n")


async def test_a_response_without_usage_is_cut_and_recorded_as_a_flagged_estimate(gateway, acp_ledger):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _NoUsage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        route = open_route(gateway, acp_ledger, f"http://127.0.0.1:{server.server_address[1]}/v1")
        request = {"model": "m", "stream": True, "input": "x" * 400}
        status, _, body = await http(route.socket_path, "POST", "/v1/responses",
                                     {"Authorization": f"Bearer {route.dummy_key}"}, request)
        # a 502 when nothing had been sent yet, else a cut stream: the agent gets no whole answer
        assert status in (200, 502)
        assert b"w2" not in body  # the last chunk, held until the usage is known, never came
        (record,) = acp_ledger.turns("s1")
        assert record["source"] == UNMETERED_SOURCE and record["total_tokens"] > 100
    finally:
        server.shutdown()
        server.server_close()


def test_details_that_are_not_objects_count_as_absent():
    body = json.dumps({"usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                                 "prompt_tokens_details": [1], "completion_tokens_details": "x"}}).encode()
    assert counts(metered("openai", body)) == (3, 4, 0, 0, 0, 7)
    body = json.dumps({"type": "response.completed", "response": {"usage": {
        "input_tokens": 3, "output_tokens": 4, "input_tokens_details": 5}}}).encode()
    assert counts(metered("openai", b"data: " + body + b"\n\n")) == (3, 4, 0, 0, 0, 7)
