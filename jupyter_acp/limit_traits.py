"""The admin's per-session limits, as traits of the session manager (a mixin of it).

Two kinds, both set as ``c.UserSessionManager.*``: what a sandbox may use (memory, CPU,
processes, disk, network: ``ResourceLimits``, enforced by the sandbox backend) and what one
agent may make the server hold (events, history, files, terminals: ``AgentInputLimits``,
enforced by the server, see ``limits.py``). Kept apart from ``manager.py``, which owns the
sessions' lifecycle, so that each reads as one concept.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from traitlets import Bool, Float, Integer, TraitError, default, validate
from traitlets.config import LoggingConfigurable

from .limits import AgentInputLimits
from .sandbox.base import ResourceLimits
from .sizes import ByteSpecification, parse_bytes

if TYPE_CHECKING:
    from .agents import AgentSpec


class SessionLimits(LoggingConfigurable):
    """The limit traits of ``UserSessionManager`` and the per-session bounds made from them."""

    # -- what a sandbox may use ----------------------------------------------------------------
    mem_limit = ByteSpecification(
        help="""Memory cap of one agent sandbox (bytes, or 512M / 1G). An agent's own default
        (node-based agents need about 1G) applies below this cap. Default: JupyterHub's
        ``MEM_LIMIT`` when set, else 1G. Empty or 0: no limit.""",
    ).tag(config=True)

    @default("mem_limit")
    def _default_mem_limit(self) -> str:
        return os.environ.get("MEM_LIMIT") or "1G"

    cpu_limit = Float(
        help="""CPU cores one agent sandbox may use (1.5 = one and a half). Default: JupyterHub's
        ``CPU_LIMIT`` when set, else 1. 0 means no limit.""",
    ).tag(config=True)

    @default("cpu_limit")
    def _default_cpu_limit(self) -> float:
        try:
            return float(os.environ.get("CPU_LIMIT") or 1.0)
        except ValueError:
            return 1.0

    pids_limit = Integer(
        256, help="Processes and threads one agent sandbox may run. 0 means no limit."
    ).tag(config=True)

    disk_limit = ByteSpecification(
        "",
        help="""How much one agent may write (bytes, or 1G). Enforced only by backends that can
        (see the session's ``limits.enforced``). Empty or 0: no limit.""",
    ).tag(config=True)

    network = Bool(
        False,
        help="""Whether agent sandboxes may open network connections. Off by default: an agent
        then reaches its LLM only through the server.""",
    ).tag(config=True)

    # -- what one agent may cost the server (see limits.py) ------------------------------------
    max_event_bytes = ByteSpecification(
        "1M",
        help="""Largest event (bytes, or 256K / 1M) a session keeps and sends to clients: longer
        text in an agent's update is cut, with a note saying how much was dropped.""",
    ).tag(config=True)

    max_history_bytes = ByteSpecification(
        "4M",
        help="""Bytes of events one session keeps for clients that reconnect (with
        ``max_history`` as a count). The oldest go first, and a ``history:truncated`` event says
        how many were dropped.""",
    ).tag(config=True)

    max_file_bytes = ByteSpecification(
        "8M",
        help="""Largest file an agent may read or write through ACP ``fs/*`` (it can still work on
        larger files inside its sandbox).""",
    ).tag(config=True)

    max_terminal_output_bytes = ByteSpecification(
        "1M",
        help="""Output kept per agent terminal, whatever ``outputByteLimit`` the agent asks for
        (the end of the output is kept).""",
    ).tag(config=True)

    max_terminals = Integer(
        8, help="Terminals one agent session may hold at once; more are refused. 0: no terminals."
    ).tag(config=True)

    @validate("pids_limit", "max_terminals")
    def _non_negative_limit(self, proposal: Any) -> int:
        if proposal["value"] < 0:
            raise TraitError(f"{proposal['trait'].name} must be >= 0")
        return proposal["value"]

    def limits_for(self, spec: AgentSpec) -> ResourceLimits:
        cap = parse_bytes(self.mem_limit)
        own = spec.mem_limit
        mem = min(x for x in (cap, own) if x) if (cap or own) else None
        return ResourceLimits(mem_limit=mem, cpu_limit=self.cpu_limit or None,
                              pids_limit=self.pids_limit or None,
                              disk_limit=parse_bytes(self.disk_limit), network=self.network)

    def input_limits(self) -> AgentInputLimits:
        """The admin's bounds on what one agent may make the server hold (see limits.py)."""
        defaults = AgentInputLimits()

        def size(value: str, fallback: int) -> int:
            return parse_bytes(value) or fallback

        return AgentInputLimits(
            max_event_bytes=size(self.max_event_bytes, defaults.max_event_bytes),
            max_history_bytes=size(self.max_history_bytes, defaults.max_history_bytes),
            max_file_bytes=size(self.max_file_bytes, defaults.max_file_bytes),
            max_terminal_output_bytes=size(self.max_terminal_output_bytes,
                                           defaults.max_terminal_output_bytes),
            max_terminals=self.max_terminals,
        )
