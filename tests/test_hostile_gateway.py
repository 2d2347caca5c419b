"""A hostile agent against its LLM gateway route: bounded connections and bodies.

The gateway's unix socket is the one door out of a sandbox, so the agent can knock on it as
hard as it likes. Requests go over the real route socket, as the in-sandbox relay carries them.
"""

from __future__ import annotations

import asyncio
import contextlib

from fake_llm import FakeLLM
from test_gateway import REAL_KEY, http

from jupyter_acp.gateway import LlmGateway


def route(gateway: LlmGateway, session: str, upstream: str):
    return gateway.open_route(session_id=session, user=session, api="openai", upstream=upstream,
                              api_key=REAL_KEY, on_usage=lambda usage: None, check_quota=lambda: None)


def ask(r) -> dict:
    return {"Authorization": f"Bearer {r.dummy_key}"}


async def test_connections_per_session_are_bounded_and_others_are_served():
    gateway = LlmGateway(max_connections_per_session=4)
    held: list[asyncio.StreamWriter] = []
    try:
        with FakeLLM() as fake:
            mallory = route(gateway, "mallory", fake.url + "/v1")
            bob = route(gateway, "bob", fake.url + "/v1")
            closed = 0
            for _ in range(12):  # a request line that never ends holds the connection open
                reader, writer = await asyncio.open_unix_connection(mallory.socket_path)
                held.append(writer)
                try:
                    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
                    await writer.drain()
                    if await asyncio.wait_for(reader.read(), 0.3) == b"":
                        closed += 1
                except ConnectionError:
                    closed += 1
                except asyncio.TimeoutError:
                    pass  # held open, as the attacker wanted
            assert closed == 8  # 4 held, the rest closed at once
            # another user's agent is served as usual meanwhile
            body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
            status, _, _ = await asyncio.wait_for(
                http(bob.socket_path, "POST", "/v1/chat/completions", ask(bob), body), 10)
            assert status == 200
            for writer in held:
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
            await asyncio.sleep(0.2)
            # once mallory's connections are gone, mallory is served again
            status, _, _ = await asyncio.wait_for(
                http(mallory.socket_path, "POST", "/v1/chat/completions", ask(mallory), body), 10)
            assert status == 200
    finally:
        gateway.close()


async def test_an_oversized_request_body_is_refused():
    gateway = LlmGateway(max_request_bytes=1024 * 1024)
    try:
        with FakeLLM() as fake:
            r = route(gateway, "mallory", fake.url + "/v1")
            body = b"x" * (2 * 1024 * 1024)
            reader, writer = await asyncio.open_unix_connection(r.socket_path)
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                         + r.dummy_key.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
            answer = b""
            with contextlib.suppress(ConnectionError):
                writer.write(body)
                await writer.drain()
                answer = await asyncio.wait_for(reader.read(), 10)
            writer.close()
            # tornado answers 413 or just closes the connection: either way nothing went upstream
            assert answer == b"" or answer.startswith(b"HTTP/1.1 413"), answer[:100]
            assert fake.requests == []
    finally:
        gateway.close()
