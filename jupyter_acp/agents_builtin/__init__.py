"""Agents that ship with jupyter-acp. Today: the demo agent (no LLM), see ``demo.py``."""

from __future__ import annotations

import sys
from pathlib import Path

from ..agents import AgentSpec


def python_ro_paths() -> list[str]:
    """Host paths a sandboxed ``sys.executable`` needs to import jupyter_acp and acp.

    The interpreter's prefixes, plus the ``jupyter_acp`` package directory itself (outside both
    prefixes for an editable install). Only the package: for an editable install its parent is
    the whole source checkout, which no sandbox needs to see (Python still finds the package
    there through the install's ``.pth`` entry, as bwrap and Docker create the parent
    directories of a mount point). Parents of each other are collapsed.
    """
    import acp

    paths = {sys.prefix, sys.base_prefix, str(Path(__file__).resolve().parents[1]),
             str(Path(acp.__file__).resolve().parents[1])}
    exe = Path(sys.executable)
    paths.add(str(exe.resolve().parent.parent))
    kept: list[str] = []
    for p in sorted(paths, key=len):
        if not any(p == k or p.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(p)
    return kept


def demo_agent_spec() -> AgentSpec:
    """The spec of the demo agent, registered through the ``jupyter_acp.agents`` entry point."""
    return AgentSpec(
        name="demo",
        display_name="Demo agent (no LLM)",
        command=[sys.executable, "-m", "jupyter_acp.agents_builtin.demo"],
        capabilities=["fs", "terminal", "permissions", "load_session", "modes", "demo"],
        description="A deterministic demo agent with no LLM: it echoes, writes files on /write, "
        "and exists to try jupyter-acp and to test it. Not a real coding agent.",
        demo=True,
        # no LLM: it writes only what the user typed (``/write``), so its "yolo" (write without
        # asking) carries no more risk than its "default" and any permission policy allows it
        mode_levels={"default": 1, "yolo": 1},
        mem_limit=256 * 1024**2,
        ro_paths=python_ro_paths(),
        source="builtin",
    )
