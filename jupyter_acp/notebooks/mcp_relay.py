"""The in-sandbox end of the notebook tools: a stdio MCP server that is a byte pipe.

The agent starts it from ``session/new``'s ``mcpServers``::

    python3 -I mcp_relay.py --socket /run/jacp-nb/nb.sock     (env JACP_NB_TOKEN=...)

It connects to the session's unix socket (the sandbox's only way out), sends the token as the
first line and then copies stdin → socket and socket → stdout until either side ends. Stdlib
only, so any ``python3`` in any sandbox image runs it; the MCP server proper runs in the Jupyter
server (``channel.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import threading


def _stdin_to_socket(sock: socket.socket) -> None:
    try:
        while data := os.read(0, 65536):
            sock.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_WR)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    args = parser.parse_args(argv)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(args.socket)
    except OSError as e:
        print(f"jupyter notebook tools: cannot reach the Jupyter server ({e.strerror})", file=sys.stderr)
        sys.exit(1)
    sock.sendall(os.environ.get("JACP_NB_TOKEN", "").encode() + b"\n")
    threading.Thread(target=_stdin_to_socket, args=(sock,), daemon=True).start()
    try:
        while data := sock.recv(65536):
            os.write(1, data)
    except OSError:
        pass


if __name__ == "__main__":
    main()
