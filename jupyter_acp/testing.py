"""Test and benchmark helpers that must be importable by a server subprocess.

``TokenPerUser`` lets one Jupyter server act for many users, the way a JupyterHub deployment
does, without a hub: the token ``user:NAME`` authenticates as the user ``NAME``. It is for tests
and benchmarks only (anyone can claim any name); a real deployment uses JupyterHub's identity
provider or its own.
"""

from __future__ import annotations

import subprocess
from typing import Any

from jupyter_server.auth.identity import IdentityProvider, User

PREFIX = "user:"


class TokenPerUser(IdentityProvider):
    """``Authorization: token user:NAME`` (or ``?token=user:NAME``) → the user ``NAME``."""

    def get_user(self, handler: Any) -> User | None:
        header = handler.request.headers.get("Authorization", "")
        token = header[len("token "):] if header.startswith("token ") else handler.get_argument("token", "")
        name = token[len(PREFIX):] if token.startswith(PREFIX) else ""
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            return None
        handler._token_authenticated = True  # a token, not a cookie: no XSRF check (like Jupyter's own)
        return User(username=name, name=name)


def auth(user: str) -> dict[str, str]:
    """The request header that authenticates as ``user`` with ``TokenPerUser``."""
    return {"Authorization": f"token {PREFIX}{user}"}


def stop_process(proc: subprocess.Popen[Any], timeout: float = 20) -> None:
    """End a server the tests or benchmarks started: SIGTERM, then SIGKILL after ``timeout``
    seconds, and reap it either way (no zombie left behind)."""
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def dechunk(payload: bytes) -> bytes:
    """The body of an HTTP/1.1 response sent with ``Transfer-Encoding: chunked`` (tests and
    benchmarks that speak raw HTTP over the gateway's unix socket)."""
    out = b""
    while payload:
        size_line, _, payload = payload.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out, payload = out + payload[:size], payload[size + 2:]
    return out
