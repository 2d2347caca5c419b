"""Gateway tokens: per-session keys to the service's LLM gateway, signed, not stored.

A single-user server asks the service for one token per agent session (``POST
api/gateway-tokens``) and gives it to its in-server gateway route as the route's "real key". The
token names who may spend what: the hub user (taken from the hub token that asked for it, never
from the request body), the session, the agent whose credentials it unlocks, and when it
expires. It is an HMAC-SHA256 over those fields with the service's secret (``token_secret_file``),
so the service keeps no table of tokens (several replicas sharing the secret all accept it, a
restart keeps them valid) and a user can neither forge one nor change a field of theirs: the
MAC covers the whole payload and is compared in constant time.

Revocation (``DELETE api/gateway-tokens/<token>``, when a session ends) is a set in the
service's memory, kept until the token would have expired anyway: it is lost on a restart and
not shared between replicas; the expiry (``gateway_token_lifetime``) bounds what a leaked token
is worth in every case.

Format: ``jacpg1.<payload>.<mac>``, both parts base64url without padding; the payload is JSON
``{"u": user, "s": session_id, "a": agent, "e": expires_at, "n": nonce}``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

PREFIX = "jacpg1"
#: Longest token the service reads (a user name of 255 chars and a session id of 64 fit).
MAX_TOKEN_CHARS = 1024
#: What a session id may look like: the extension's ids are uuids, names stay printable.
SESSION_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,64}")


class InvalidToken(Exception):
    """The presented token is not one this service signed, or is expired or revoked. The
    message is for the log only (the client learns just "invalid")."""


@dataclass(frozen=True)
class GatewayClaims:
    """What a valid token grants."""

    user: str
    session_id: str
    agent: str
    expires_at: float
    nonce: str

    @property
    def token_id(self) -> str:
        """Names the token in the revocation set and in logs (never the token itself)."""
        return self.nonce


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def load_secret(path: Path) -> bytes:
    """The signing secret in ``path``, made (32 random bytes, hex, mode 0600, its directory
    0700) when the file does not exist yet. A file others can read is refused: whoever reads it
    can mint tokens for any user."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        pass
    else:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    mode = path.stat().st_mode
    if mode & 0o077:
        raise PermissionError(f"The token secret {path} is readable by others (mode {mode & 0o777:o}); "
                              "make it 0600 (chmod 600) or remove it to have a new one made")
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"The token secret {path} is too short (at least 32 characters)")
    return secret.encode()


class TokenSigner:
    """Mints and checks gateway tokens with one secret; holds the revocation set."""

    def __init__(self, secret: bytes) -> None:
        # a key of its own for tokens (the same file also seeds the cookie secret)
        self._key = hmac.new(secret, b"jupyter-acp gateway tokens v1", hashlib.sha256).digest()
        self._revoked: dict[str, float] = {}
        self._purge_at = 1024
        self._lock = threading.Lock()

    def _mac(self, signed: str) -> str:
        return _b64(hmac.new(self._key, signed.encode("ascii"), hashlib.sha256).digest())

    def mint(self, user: str, session_id: str, agent: str, lifetime: float) -> tuple[str, GatewayClaims]:
        """A new token for ``user``'s session ``session_id`` with ``agent``, and its claims."""
        claims = GatewayClaims(user=user, session_id=session_id, agent=agent,
                               expires_at=round(time.time() + lifetime, 3), nonce=secrets.token_hex(12))
        payload = json.dumps({"u": claims.user, "s": claims.session_id, "a": claims.agent,
                              "e": claims.expires_at, "n": claims.nonce}, separators=(",", ":"))
        signed = f"{PREFIX}.{_b64(payload.encode())}"
        return f"{signed}.{self._mac(signed)}", claims

    def decode(self, token: str) -> GatewayClaims:
        """The claims of a token this service signed, expired or revoked or not (to revoke it);
        ``InvalidToken`` for a forged, altered or malformed one. The MAC is checked, in
        constant time, before the payload is parsed."""
        if not token or len(token) > MAX_TOKEN_CHARS:
            raise InvalidToken("no token, or too long")
        head, _, rest = token.partition(".")
        payload_b64, _, mac = rest.partition(".")
        if head != PREFIX or not payload_b64 or not mac:
            raise InvalidToken("not a gateway token")
        if not hmac.compare_digest(mac.encode("ascii", "replace"),
                                   self._mac(f"{PREFIX}.{payload_b64}").encode("ascii")):
            raise InvalidToken("bad signature")
        try:
            data = json.loads(_unb64(payload_b64))
            return GatewayClaims(user=str(data["u"]), session_id=str(data["s"]), agent=str(data["a"]),
                                 expires_at=float(data["e"]), nonce=str(data["n"]))
        except (ValueError, KeyError, TypeError) as e:  # (only a holder of the secret gets here)
            raise InvalidToken("unreadable payload") from e

    def verify(self, token: str, *, now: float | None = None) -> GatewayClaims:
        """The claims of a valid token; ``InvalidToken`` for anything else (forged, altered,
        expired, revoked, malformed)."""
        claims = self.decode(token)
        if (time.time() if now is None else now) >= claims.expires_at:
            raise InvalidToken(f"expired (token {claims.token_id})")
        with self._lock:
            if claims.nonce in self._revoked:
                raise InvalidToken(f"revoked (token {claims.token_id})")
        return claims

    def revoke(self, claims: GatewayClaims) -> None:
        """Refuse this token from now on (until it expires: then it is refused anyway)."""
        now = time.time()
        with self._lock:
            self._revoked[claims.nonce] = claims.expires_at
            if len(self._revoked) > self._purge_at:  # drop the entries that expiry covers now
                self._revoked = {n: e for n, e in self._revoked.items() if e > now}
                self._purge_at = max(1024, 2 * len(self._revoked))

    @property
    def revoked_count(self) -> int:
        with self._lock:
            return len(self._revoked)
