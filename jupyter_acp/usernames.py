"""Jupyter usernames as directory names (``{username}`` in ``workspace_template``)."""

from __future__ import annotations

import hashlib
import string

import escapism

#: Characters a username keeps as they are in its directory name; every other one is escaped.
USERNAME_SAFE = frozenset(string.ascii_letters + string.digits + "_@+")


def safe_username(username: str) -> str:
    """A username as a single path component.

    Injective, like JupyterHub's spawners' names: ``escapism`` writes every character outside
    ``USERNAME_SAFE`` as ``-XX`` (its UTF-8 bytes in hex), so ``张三`` and ``李四``, ``bob`` and
    ``.bob`` get different directories, and none is ``.``, ``..`` or hidden. A name whose escaped
    form would pass 200 bytes keeps a readable start and ends in ``--`` and a hash of the whole
    name (``--`` never occurs in escapism's output, so it cannot meet an unhashed name)."""
    escaped = escapism.escape(username, safe=USERNAME_SAFE, escape_char="-")
    if not escaped:
        return "-"  # (the empty name; escapism never yields a lone "-")
    if len(escaped) > 200:
        digest = hashlib.sha256(username.encode(errors="surrogatepass")).hexdigest()[:40]
        escaped = escaped[:120].rstrip("-0123456789ABCDEF") + "--" + digest
    return escaped
