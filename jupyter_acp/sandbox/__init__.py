"""Sandboxes: where an agent process runs. See ``base.Sandbox`` for the contract."""

from __future__ import annotations

from typing import cast

from .base import ProcessSandbox, ResourceLimits, Sandbox, SandboxSpec
from .local import LocalProcessSandbox

__all__ = ["LocalProcessSandbox", "ProcessSandbox", "ResourceLimits", "Sandbox", "SandboxSpec", "backend"]


def backend(kind: str) -> type[Sandbox]:
    """The sandbox class for a backend name (``local``, ``bubblewrap``, ``docker``)."""
    if kind == "local":
        return LocalProcessSandbox
    if kind == "bubblewrap":
        from .bubblewrap import BubblewrapSandbox

        return BubblewrapSandbox
    if kind == "docker":
        from .docker import DockerSandbox

        # the admin's configurable, not a Sandbox: it offers the class-level part of the contract
        # (kind, isolated, create, available, on_manager_*); create() returns a real Sandbox
        return cast("type[Sandbox]", DockerSandbox)
    raise ValueError(f"Unknown sandbox backend {kind!r}; choose docker, bubblewrap or local")
