"""What one agent may cost the server: bytes, files, terminals and requests, per session.

An agent is untrusted (prompt-injected or simply malicious), and everything it sends is held,
copied or answered by the server, outside any sandbox limit. These bounds keep one hostile
session from taking the server's memory, threads or file descriptors, so that it can never slow
another user's session. The session manager builds one ``AgentInputLimits`` from the admin's
traits (``c.UserSessionManager.max_event_bytes`` and friends) and hands it to every session.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024


@dataclass(frozen=True)
class AgentInputLimits:
    """Per-session bounds on what the agent may make the server hold or do."""

    max_message_bytes: int = 16 * MiB
    """One JSON-RPC message from the agent (one stdio line); a longer one is dropped."""
    max_event_bytes: int = 1 * MiB
    """One event as kept in the history and sent to clients; larger text is cut with a marker."""
    max_history_bytes: int = 4 * MiB
    """A session's event history; the oldest events are dropped first, with a marker event."""
    max_turn_text_bytes: int = 1 * MiB
    """The reply text of one turn as returned by the prompt call and in its ``chat:response``
    (its start and its end are kept; the events keep streaming)."""
    max_file_bytes: int = 8 * MiB
    """A file the agent reads or writes through ``fs/*``."""
    max_concurrent_fs: int = 2
    """``fs/*`` requests of one session in flight at once; more are refused, not queued."""
    fs_timeout: float = 30.0
    """Seconds one ``fs/*`` request may take before it is answered with an error."""
    max_terminals: int = 8
    """Terminals one session may hold at once (``terminal/create``)."""
    max_terminal_output_bytes: int = 1 * MiB
    """Output kept per terminal, whatever ``outputByteLimit`` the agent asks for."""
    max_pending_permissions: int = 8
    """Permission requests of one session waiting for the user at once; more are rejected."""


def return_large_blocks_to_the_os(threshold: int) -> bool:
    """Have glibc's ``malloc`` serve blocks of ``threshold`` bytes or more with ``mmap``, so that
    they go back to the system when freed. By default glibc raises this threshold up to 32 MiB
    as large blocks are freed, after which an agent's multi-megabyte messages are carved out of
    the heap, which fragments and is never given back: one 64 x 4 MiB flood left ~900 MiB
    resident (bench: tests/test_hostile_memory.py). False where it cannot apply (not glibc, or
    an admin's ``MALLOC_MMAP_THRESHOLD_`` in the environment, which wins)."""
    import ctypes
    import os
    import sys

    if threshold <= 0 or not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # <malloc.h>
    return bool(mallopt(m_mmap_threshold, int(threshold)))
