"""A misbehaving ACP agent for fault tests: a real demo agent whose stdout is polluted on purpose.

``python misbehaving.py MODE`` where MODE is one of:

* ``garbage``  — before every real message, write non-JSON lines, partial JSON, JSON that is not
  JSON-RPC, responses to ids nobody asked for, and a notification of an unknown method;
* ``huge``     — answer ``initialize`` normally, then on a prompt write one 60 MiB line (over the
  client's line limit) and keep going;
* ``flood``    — answer ``initialize``, then on a prompt write 50,000 valid notifications as fast
  as possible before answering.
"""

from __future__ import annotations

import asyncio
import sys

import acp
import acp.stdio
from acp import helpers

from jupyter_acp.agents_builtin.demo import DemoAgent

MODE = sys.argv[1] if len(sys.argv) > 1 else "garbage"
FLOOD = 50_000
JUNK = [b"this is not json\n", b'{"jsonrpc": "2.0", "id": \n', b"[1, 2, 3]\n", b'"a string"\n',
        b'{"jsonrpc": "2.0", "id": 987654, "result": {}}\n',
        b'{"jsonrpc": "2.0", "method": "qwen/notify/whatever", "params": {"x": 1}}\n',
        b'{"jsonrpc": "2.0", "id": 42, "method": "craft/unknown", "params": {}}\n', b"\n",
        # shapes the SDK's receive loop does not survive (it indexes and hashes them blindly)
        b'{"jsonrpc": "2.0", "id": [1], "result": null}\n', b'{"jsonrpc": "2.0", "id": 7, "error": 5}\n',
        b'{"jsonrpc": "2.0", "method": 5, "params": {}}\n', b'{"id": {"a": 1}, "result": 1}\n',
        b'{"jsonrpc": "2.0", "method": "session/update", "params": [1]}\n']


def pollute(writer: asyncio.StreamWriter) -> asyncio.StreamWriter:
    """Make the agent's stdout writer send junk lines before each real line."""
    real_write = writer.write

    def write(data: bytes) -> None:
        for junk in JUNK:
            real_write(junk)
        real_write(data)

    writer.write = write  # type: ignore[method-assign]
    return writer


class Misbehaving(DemoAgent):
    async def prompt(self, session_id, prompt, **kwargs):
        if MODE == "huge":
            # through the connection's own writer, so that it is a whole line of its own
            WRITER.write(b'{"jsonrpc":"2.0","method":"session/update","params":{"x":"'
                         + b"x" * (60 * 1024 * 1024) + b'"}}\n')
            await WRITER.drain()
        elif MODE == "flood":
            for i in range(FLOOD):
                await self.conn.session_update(session_id=session_id,
                                               update=helpers.update_agent_message_text(f"{i} "))
        return await super().prompt(session_id, prompt, **kwargs)


WRITER: asyncio.StreamWriter


async def main() -> None:
    global WRITER
    reader, WRITER = await acp.stdio.stdio_streams()
    await acp.run_agent(Misbehaving(), pollute(WRITER) if MODE == "garbage" else WRITER, reader)


if __name__ == "__main__":
    asyncio.run(main())
