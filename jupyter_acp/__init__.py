"""jupyter-acp: run Agent Client Protocol coding agents from Jupyter, sandboxed, tokens counted.

This module stays import-light: the server extension, the IPython extension and the widget are
found through the hooks below and imported only when Jupyter or IPython asks for them.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def _jupyter_server_extension_points() -> list[dict[str, Any]]:
    from .app import AcpExtension

    return [{"module": "jupyter_acp", "app": AcpExtension}]


def _jupyter_labextension_paths() -> list[dict[str, str]]:
    return [{"src": "labextension", "dest": "jupyter-acp"}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext jupyter_acp``: the ``%acp`` / ``%%acp`` magics (see ``jupyter_acp.kernel``)."""
    from .kernel.magics import load_ipython_extension as load

    load(ipython)


def __getattr__(name: str) -> Any:
    if name == "ChatPanel":
        from .kernel.widget import ChatPanel

        return ChatPanel
    raise AttributeError(f"module 'jupyter_acp' has no attribute {name!r}")
