"""Sandboxes: where an agent process runs. See ``base.Sandbox`` for the contract."""

from __future__ import annotations

from .base import ProcessSandbox, ResourceLimits, Sandbox, SandboxBackend, SandboxSpec
from .local import LocalProcessSandbox

__all__ = ["LocalProcessSandbox", "ProcessSandbox", "ResourceLimits", "Sandbox", "SandboxBackend",
           "SandboxSpec", "backend"]


def backend(kind: str) -> SandboxBackend:
    """The sandbox class for a backend name (``local``, ``bubblewrap``, ``docker``)."""
    if kind == "local":
        return LocalProcessSandbox
    if kind == "bubblewrap":
        from .bubblewrap import BubblewrapSandbox

        return BubblewrapSandbox
    if kind == "docker":
        from .docker import DockerSandbox

        # the admin's configurable, not a Sandbox: its create() returns the per-session one
        return DockerSandbox
    raise ValueError(f"Unknown sandbox backend {kind!r}; choose docker, bubblewrap or local")
