"""Which agents exist and how to start them: ``AgentSpec`` and ``AgentConfigManager``.

Specs come from three places, later ones overriding earlier ones by name:

1. built-in specs for well-known ACP agents (Qwen Code, Gemini CLI, Claude, Codex), offered only
   when their executable is found on ``PATH`` (or in ``extra_paths``);
2. the entry-point group ``jupyter_acp.agents`` (a package ships an agent with no config);
3. ``c.AgentConfigManager.agents = {"name": {...}}`` — an admin adds any ACP agent with no code.

This is the seed design's "agent discovery": ``select_best_agent(capabilities)`` picks an
available agent offering every requested capability.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from typing import Any

from traitlets import Dict, List, Unicode, default
from traitlets.config import LoggingConfigurable

from .errors import AgentNotFound, AgentUnavailable

#: Credential fields a user (or admin) may supply; the seed design's ``UserCredentials``.
CREDENTIAL_FIELDS = ("type", "api_key", "base_url", "model", "access_token", "refresh_token")


@dataclass
class AgentSpec:
    """How to run one ACP agent.

    ``command`` is an argv (the executable first) for a stdio agent; ``url`` a ``ws://`` or
    ``wss://`` endpoint for a remote one. ``credential_env`` maps a credential field (see
    ``CREDENTIAL_FIELDS``) to the environment variable the agent reads it from.
    """

    name: str
    display_name: str = ""
    command: list[str] = field(default_factory=list)
    url: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    capabilities: list[str] = field(default_factory=list)
    credential_env: dict[str, str] = field(default_factory=dict)
    description: str = ""
    demo: bool = False
    """A demo agent (no LLM): labelled as such in every UI; may run unsandboxed."""
    mem_limit: int | None = None
    """The agent's own memory need in bytes (node agents need ~1 GiB); capped by the admin's limit."""
    ro_paths: list[str] = field(default_factory=list)
    """Host paths the agent must read inside a sandbox (its interpreter, its packages)."""
    source: str = "config"

    def __post_init__(self) -> None:
        if not self.display_name:
            self.display_name = self.name
        if bool(self.command) == bool(self.url):
            raise ValueError(f"Agent {self.name!r} needs exactly one of 'command' or 'url'")
        if self.url and not self.url.startswith(("ws://", "wss://")):
            raise ValueError(f"Agent {self.name!r}: url must start with ws:// or wss://")
        unknown = set(self.credential_env) - set(CREDENTIAL_FIELDS)
        if unknown:
            raise ValueError(f"Agent {self.name!r}: unknown credential fields {sorted(unknown)}")

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any], source: str = "config") -> AgentSpec:
        known = {f for f in cls.__dataclass_fields__ if f not in ("name", "source")}
        extra = set(data) - known
        if extra:
            raise ValueError(f"Agent {name!r}: unknown keys {sorted(extra)}; known: {sorted(known)}")
        command = data.get("command", [])
        if isinstance(command, str):
            command = [command]
        return cls(name=name, source=source, **{**data, "command": list(command)})

    def executable(self) -> str | None:
        """The resolved path of the command's executable, or None when it is not installed."""
        if not self.command:
            return None
        exe = self.command[0]
        if os.path.isabs(exe):
            return exe if os.access(exe, os.X_OK) else None
        return shutil.which(exe)

    def availability(self) -> tuple[bool, str]:
        """Whether this agent can be started here, and if not, why (shown to users)."""
        if self.url:
            return True, ""
        if self.executable() is None:
            return False, f"{self.command[0]!r} is not installed (not found on PATH)"
        return True, ""

    def credentials_env(self, credentials: dict[str, str] | None) -> dict[str, str]:
        """The environment variables carrying ``credentials`` for this agent."""
        out: dict[str, str] = {}
        for key, value in (credentials or {}).items():
            var = self.credential_env.get(key)
            if var and value:
                out[var] = str(value)
        return out

    def to_public(self) -> dict[str, Any]:
        """What a user may see: no env values (an admin may have put keys there)."""
        data = asdict(self)
        data.pop("env")
        data["env_keys"] = sorted(self.env)
        return data


_OPENAI_CREDS = {"api_key": "OPENAI_API_KEY", "base_url": "OPENAI_BASE_URL", "model": "OPENAI_MODEL"}


def builtin_specs() -> list[AgentSpec]:
    """Specs of well-known ACP agents. They are offered only if their executable is found."""
    return [
        AgentSpec(
            name="qwen",
            display_name="Qwen Code",
            command=["qwen", "--acp"],
            capabilities=["fs", "terminal", "permissions", "load_session", "modes", "llm"],
            credential_env=dict(_OPENAI_CREDS),
            description="Qwen Code (npm @qwen-code/qwen-code) over ACP; OpenAI-compatible endpoints.",
            mem_limit=1024**3,
            source="builtin",
        ),
        AgentSpec(
            name="gemini",
            display_name="Gemini CLI",
            command=["gemini", "--acp", "-m", "gemini-2.5-flash"],
            capabilities=["fs", "terminal", "permissions", "load_session", "modes", "llm"],
            credential_env={"api_key": "GEMINI_API_KEY", "base_url": "GOOGLE_GEMINI_BASE_URL"},
            description="Gemini CLI (npm @google/gemini-cli) over ACP.",
            mem_limit=1024**3,
            source="builtin",
        ),
        AgentSpec(
            name="claude",
            display_name="Claude Code",
            command=["claude-agent-acp"],
            capabilities=["fs", "terminal", "permissions", "load_session", "modes", "llm"],
            credential_env={"api_key": "ANTHROPIC_API_KEY", "base_url": "ANTHROPIC_BASE_URL"},
            description="Claude Code through the claude-agent-acp adapter.",
            mem_limit=1024**3,
            source="builtin",
        ),
        AgentSpec(
            name="codex",
            display_name="Codex",
            command=["codex-acp"],
            capabilities=["fs", "terminal", "permissions", "llm"],
            credential_env=dict(_OPENAI_CREDS),
            description="OpenAI Codex through the codex-acp adapter.",
            mem_limit=1024**3,
            source="builtin",
        ),
    ]


class AgentConfigManager(LoggingConfigurable):
    """Knows every agent this server may run and which of them can run here."""

    agents = Dict(
        help="""Agents added by the admin, by name. Each value is a dict with the keys of
        ``AgentSpec``: ``command`` (argv list) or ``url`` (ws:// endpoint), and optionally
        ``display_name``, ``env``, ``capabilities``, ``credential_env`` (credential field →
        environment variable), ``description``, ``mem_limit`` (bytes), ``ro_paths``.
        A name equal to a built-in agent replaces it.""",
    ).tag(config=True)

    default_agent = Unicode(
        "",
        help="""Name of the agent used when a request names none. Empty: the first available
        non-demo agent, else the demo agent.""",
    ).tag(config=True)

    disabled_agents = List(
        Unicode(),
        help="Names of agents (built-in or from entry points) that are never offered.",
    ).tag(config=True)

    credentials = Dict(
        help="""Admin-supplied default credentials per agent name, e.g.
        ``{"qwen": {"api_key": "...", "base_url": "...", "model": "..."}}``. They reach only
        the agent process environment, never a log or an API response.""",
    ).tag(config=True)

    extra_paths = List(
        Unicode(),
        help="Directories searched for agent executables before PATH (e.g. an npm prefix's bin).",
    ).tag(config=True)

    @default("extra_paths")
    def _default_extra_paths(self) -> list[str]:
        return []

    def _specs(self) -> dict[str, AgentSpec]:
        specs: dict[str, AgentSpec] = {s.name: s for s in builtin_specs()}
        for ep in entry_points(group="jupyter_acp.agents"):
            try:
                obj = ep.load()
                spec = obj() if callable(obj) else obj
                spec.source = f"entry point {ep.value}"
                specs[spec.name] = spec
            except Exception as e:  # a broken plugin must not take the server down
                self.log.warning("Ignoring agent entry point %s: %s", ep.name, e)
        for name, data in self.agents.items():
            specs[name] = AgentSpec.from_dict(name, dict(data))
        for name in self.disabled_agents:
            specs.pop(name, None)
        if self.extra_paths:
            for spec in specs.values():
                self._resolve_in_extra_paths(spec)
        return specs

    def _resolve_in_extra_paths(self, spec: AgentSpec) -> None:
        if not spec.command or os.path.isabs(spec.command[0]):
            return
        found = shutil.which(spec.command[0], path=os.pathsep.join(self.extra_paths))
        if found:
            spec.command = [found, *spec.command[1:]]

    def list_agents(self) -> list[tuple[AgentSpec, bool, str]]:
        """Every known agent with whether it is available and, if not, why."""
        return [(spec, *spec.availability()) for spec in self._specs().values()]

    def get(self, name: str | None) -> AgentSpec:
        """The spec named ``name`` (or the default agent), available or not."""
        specs = self._specs()
        if not name:
            return self._default(specs)
        try:
            return specs[name]
        except KeyError:
            known = ", ".join(sorted(specs)) or "none"
            raise AgentNotFound(f"Unknown agent {name!r}; known agents: {known}") from None

    def get_available(self, name: str | None) -> AgentSpec:
        spec = self.get(name)
        ok, why = spec.availability()
        if not ok:
            raise AgentUnavailable(f"Agent {spec.name!r} is not available: {why}")
        return spec

    def _default(self, specs: dict[str, AgentSpec]) -> AgentSpec:
        if self.default_agent:
            if self.default_agent not in specs:
                raise AgentNotFound(f"The default agent {self.default_agent!r} is not configured")
            return specs[self.default_agent]
        available = [s for s in specs.values() if s.availability()[0]]
        for spec in sorted(available, key=lambda s: s.demo):
            return spec
        raise AgentNotFound("No agent is available on this server")

    def select_best_agent(self, capabilities: list[str] | tuple[str, ...] = ()) -> AgentSpec:
        """An available agent with every capability asked for: non-demo first, then by name."""
        wanted = set(capabilities)
        candidates = [
            spec for spec, ok, _ in self.list_agents() if ok and wanted <= set(spec.capabilities)
        ]
        if not candidates:
            raise AgentNotFound(
                f"No available agent offers all of {sorted(wanted)}; see GET /api/acp/agents"
            )
        candidates.sort(key=lambda s: (s.demo, s.name != self.default_agent, s.name))
        return candidates[0]

    def credentials_for(self, spec: AgentSpec, user_credentials: dict[str, str] | None) -> dict[str, str]:
        """Admin defaults overlaid with the user's own values (which win where given)."""
        merged = {k: v for k, v in dict(self.credentials.get(spec.name, {})).items() if v}
        for key, value in (user_credentials or {}).items():
            if key not in CREDENTIAL_FIELDS:
                raise ValueError(f"Unknown credential field {key!r}; known: {', '.join(CREDENTIAL_FIELDS)}")
            if value:
                merged[key] = value
        return merged
