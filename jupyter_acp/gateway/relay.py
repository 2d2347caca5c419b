"""The in-sandbox end of the LLM gateway: a TCP listener on 127.0.0.1 relayed to a unix socket.

Run *inside* the sandbox, in front of the agent (stdlib only, so any ``python3`` runs it)::

    python3 -I relay.py --socket /run/…/llm.sock \
        --env OPENAI_BASE_URL=http://127.0.0.1:{port}/v1 -- qwen --acp

It binds a free port on the sandbox's own loopback (bubblewrap ``--unshare-net`` and Docker
``network=none`` both keep a private ``lo``), forks a child that relays each connection byte for
byte to the gateway's unix socket (the only way out: the sandbox has no network), puts the port
into the environment variables given with ``--env`` and into the agent's arguments (``{port}``
is replaced: Codex takes its endpoint only as an argument), and then *execs*
the agent — so the agent keeps the sandbox's stdin/stdout (its ACP stdio) and its pid. The
listening socket exists before the agent starts, so its first request cannot race the relay.
The child holds no stdio of the agent and exits when the agent (its parent) is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()


async def _serve(listener: socket.socket, unix_path: str, parent: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(unix_path)
        except OSError:
            body = b'{"error": {"message": "the LLM gateway is not reachable"}}'
            writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: application/json\r\n"
                         b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            with contextlib.suppress(Exception):
                await writer.drain()
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        for w in (writer, up_writer):
            w.close()

    server = await asyncio.start_server(handle, sock=listener)
    async with server:
        # the agent exec'd in our parent: stop when it is gone (no event tells us, so poll)
        while os.getppid() == parent:  # noqa: ASYNC110
            await asyncio.sleep(0.5)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="the gateway's unix socket")
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE, {port} replaced")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no agent command given after --")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    parent = os.getpid()
    if os.fork() == 0:  # the relay: no stdio of the agent, so its pipes close when it exits
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        try:
            asyncio.run(_serve(listener, args.socket, parent))
        finally:
            os._exit(0)
    listener.close()
    env = dict(os.environ)
    for item in args.env:
        name, _, value = item.partition("=")
        env[name] = value.replace("{port}", str(port))
    command = [command[0], *(arg.replace("{port}", str(port)) for arg in command[1:])]
    try:
        os.execvpe(command[0], command, env)
    except OSError as e:
        print(f"jupyter-acp relay: cannot start {command[0]!r}: {e.strerror}", file=sys.stderr)
        sys.exit(127)


if __name__ == "__main__":
    main()
