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

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, List, Unicode, default
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
    llm_api: str | None = None
    """The wire format of the agent's LLM endpoint (``openai``, ``gemini``, ``anthropic``): with an
    ``api_key`` it lets the server's LLM gateway carry, meter and cap its traffic."""
    default_model: str | None = None
    """The model used when the credentials name none; ``{model}`` in ``command`` is replaced by it."""
    settings_files: dict[str, Any] = field(default_factory=dict)
    """JSON files written into each session's private ``$HOME`` (path relative to it → content),
    e.g. settings that turn off telemetry, auto-update and hidden LLM calls."""
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
        if self.llm_api not in (None, "openai", "gemini", "anthropic"):
            raise ValueError(f"Agent {self.name!r}: llm_api must be openai, gemini or anthropic")

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

    def argv(self, model: str | None = None) -> list[str]:
        """The command with ``{model}`` replaced (the credentials' model, else ``default_model``)."""
        chosen = model or self.default_model or ""
        return [arg.replace("{model}", chosen) for arg in self.command]

    def write_home(self, home: Path) -> None:
        """Write ``settings_files`` into a session's fresh home directory."""
        for rel, content in self.settings_files.items():
            target = (home / rel).resolve()
            if home.resolve() not in target.parents:
                raise ValueError(f"Agent {self.name!r}: settings file {rel!r} lies outside $HOME")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(json.dumps(content, indent=2) + "\n")

    def runtime_ro_paths(self) -> list[str]:
        """``ro_paths`` plus what a node agent's executable needs inside a sandbox: its directory
        and the ``node_modules`` tree its script lives in (e.g. a cache outside ``/usr``)."""
        paths = list(self.ro_paths)
        exe = self.executable()
        if exe and self.llm_api:
            paths.append(os.path.dirname(exe))
            real = Path(os.path.realpath(exe))
            for parent in real.parents:
                if parent.name == "node_modules":
                    paths.append(str(parent))
                    break
            else:
                paths.append(str(real.parent))
        return list(dict.fromkeys(paths))

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

#: Qwen Code 0.24 settings: no telemetry, no auto-update, and none of the background LLM calls
#: (memory extraction/consolidation, skill review, follow-up suggestions, next-speaker check)
#: whose tokens it never reports over ACP. ``contextWindowSize`` makes it send ``usage_update``.
QWEN_SETTINGS = {
    "general": {"enableAutoUpdate": False, "gitCoAuthor": {"commit": False, "pr": False}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False, "logPrompts": False},
    "ui": {"enableFollowupSuggestions": False},
    "memory": {"enableManagedAutoMemory": False, "enableManagedAutoDream": False, "enableAutoSkill": False},
    "model": {"skipNextSpeakerCheck": True, "generationConfig": {"contextWindowSize": 131072}},
    "security": {"auth": {"selectedType": "openai"}},
}

#: Gemini CLI 0.61 settings: API-key auth, no telemetry or usage statistics, no auto-update,
#: no next-speaker check (a hidden LLM call), no IDE integration or checkpointing.
GEMINI_SETTINGS = {
    "general": {"disableAutoUpdate": True, "disableUpdateNag": True, "enableAutoUpdate": False,
                "enableAutoUpdateNotification": False, "checkpointing": {"enabled": False}},
    "privacy": {"usageStatisticsEnabled": False},
    "telemetry": {"enabled": False, "logPrompts": False},
    # the workspace is the user's own, chosen by the server: no folder-trust prompt to answer
    "security": {"auth": {"selectedType": "gemini-api-key"}, "folderTrust": {"enabled": False}},
    "model": {"skipNextSpeakerCheck": True},
    "ide": {"enabled": False},
}


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
            llm_api="openai",
            settings_files={".qwen/settings.json": QWEN_SETTINGS},
            source="builtin",
        ),
        AgentSpec(
            name="gemini",
            display_name="Gemini CLI",
            # always a concrete model: the "auto" router stalls against OpenAI-compatible fakes
            command=["gemini", "--acp", "-m", "{model}"],
            capabilities=["fs", "terminal", "permissions", "load_session", "modes", "llm"],
            credential_env={"api_key": "GEMINI_API_KEY", "base_url": "GOOGLE_GEMINI_BASE_URL",
                            "model": "GEMINI_MODEL"},
            description="Gemini CLI (npm @google/gemini-cli) over ACP.",
            mem_limit=1024**3,
            llm_api="gemini",
            default_model="gemini-2.5-flash",
            settings_files={".gemini/settings.json": GEMINI_SETTINGS},
            source="builtin",
        ),
        AgentSpec(
            name="claude",
            display_name="Claude Code",
            command=["claude-agent-acp"],
            capabilities=["fs", "terminal", "permissions", "load_session", "modes", "llm"],
            credential_env={"api_key": "ANTHROPIC_API_KEY", "base_url": "ANTHROPIC_BASE_URL",
                            "model": "ANTHROPIC_MODEL", "access_token": "CLAUDE_CODE_OAUTH_TOKEN"},
            description="Claude Code through the claude-agent-acp adapter.",
            mem_limit=1024**3,
            llm_api="anthropic",
            env={"DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
                 "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1"},
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
            llm_api="openai",
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

    user_credential_fields = List(
        Unicode(),
        default_value=list(CREDENTIAL_FIELDS),
        help="""Credential fields a user may supply when starting a session (their values win
        over the admin's defaults). Leave out e.g. ``base_url`` to pin every user to the admin's
        endpoint; a field not listed is refused with a clear error.""",
    ).tag(config=True)

    credentials_from_env = Bool(
        False,
        help="""Complete the admin's default credentials of each agent from the server's own
        environment variables that agent reads (e.g. ``OPENAI_API_KEY`` for Qwen Code,
        ``GEMINI_API_KEY`` for Gemini CLI). Off by default: the server's environment is not
        handed to agents unless the admin says so.""",
    ).tag(config=True)

    extra_paths = List(
        Unicode(),
        help="Directories searched for agent executables before PATH (e.g. an npm prefix's bin).",
    ).tag(config=True)

    @default("extra_paths")
    def _default_extra_paths(self) -> list[str]:
        return []

    _plugins: list[tuple[str, Any]] | None = None

    def _plugin_agents(self) -> list[tuple[str, Any]]:
        """The ``jupyter_acp.agents`` entry points, loaded once: (where, spec or factory).

        Finding them reads the metadata of every installed distribution, ~20-50 ms on the
        server's event loop, which used to happen for every new session and agent listing and
        stalled every session's stream meanwhile (bench/scale.py). Like a server extension, an
        agent plugin installed later is seen after a restart."""
        if self._plugins is None:
            self._plugins = []
            for ep in entry_points(group="jupyter_acp.agents"):
                try:
                    self._plugins.append((ep.value, ep.load()))
                except Exception as e:  # a broken plugin must not take the server down
                    self.log.warning("Ignoring agent entry point %s: %s", ep.name, e)
        return self._plugins

    def _specs(self) -> dict[str, AgentSpec]:
        specs: dict[str, AgentSpec] = {s.name: s for s in builtin_specs()}
        for where, obj in self._plugin_agents():
            try:
                spec = obj() if callable(obj) else obj
                spec.source = f"entry point {where}"
                specs[spec.name] = spec
            except Exception as e:
                self.log.warning("Ignoring agent entry point %s: %s", where, e)
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
        merged = self.admin_credentials(spec)
        for key, value in (user_credentials or {}).items():
            if key not in CREDENTIAL_FIELDS:
                raise ValueError(f"Unknown credential field {key!r}; known: {', '.join(CREDENTIAL_FIELDS)}")
            if value and key not in self.user_credential_fields:
                raise ValueError(f"Your admin does not let users set the credential {key!r} "
                                 f"(allowed: {', '.join(self.user_credential_fields) or 'none'})")
            if value:
                merged[key] = value
        return merged

    def admin_credentials(self, spec: AgentSpec) -> dict[str, str]:
        """The admin's defaults for ``spec``: ``credentials[name]``, then the server's env if allowed."""
        merged = {k: str(v) for k, v in dict(self.credentials.get(spec.name, {})).items() if v}
        if self.credentials_from_env:
            for key, var in spec.credential_env.items():
                if key not in merged and os.environ.get(var):
                    merged[key] = os.environ[var]
        return merged
