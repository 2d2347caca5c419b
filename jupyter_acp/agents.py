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

import copy
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from traitlets import Bool, Dict, List, Unicode, default, observe
from traitlets.config import LoggingConfigurable

from .credentials import CREDENTIAL_FIELDS, Credentials, Secret, as_secret, problems, resolve_all
from .errors import AgentNotFound, AgentUnavailable
from .logredact import SECRET_KEY_RE, register
from .notebooks.channel import SERVER_NAME as NB_SERVER
from .notebooks.channel import TOOL_NAMES as NB_TOOLS

#: How permissive an agent's mode (ACP ``session/set_mode``) is, on one scale for every agent:
#: 0 changes nothing (plan, read-only); 1 asks before edits and commands; 2 edits without asking
#: (commands still ask); 3 runs commands without asking when a classifier deems them safe;
#: 4 does everything without asking. An admin's permission policy allows modes up to its level.
MODE_LEVEL_NAMES = {0: "read-only", 1: "asks before edits and commands", 2: "edits without asking",
                    3: "runs commands a classifier approves", 4: "does everything without asking"}
POLICY_LEVELS = {"deny": 0, "ask": 1, "allow": 2}

#: Levels of mode ids several agents share, for agents whose spec declares no ``mode_levels``
#: (e.g. one an admin added). A mode known neither here nor to its spec is never allowed unless
#: the admin lists it in ``c.UserSessionManager.allowed_modes``.
WELL_KNOWN_MODE_LEVELS = {
    "plan": 0, "read-only": 0, "default": 1, "ask": 1, "auto-edit": 2, "autoEdit": 2,
    "auto_edit": 2, "acceptEdits": 2, "yolo": 4, "bypassPermissions": 4, "full-access": 4,
}


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` merged in, nested dicts key by key (neither is changed)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


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
    default_base_url: str | None = None
    """The endpoint ``{base_url}`` in ``command`` stands for when the credentials name none and
    the gateway is not used."""
    settings_files: dict[str, Any] = field(default_factory=dict)
    """JSON files written into each session's private ``$HOME`` (path relative to it → content),
    e.g. settings that turn off telemetry, auto-update and hidden LLM calls."""
    mode_levels: dict[str, int] = field(default_factory=dict)
    """How permissive each ACP mode of the agent is (mode id → a level of ``MODE_LEVEL_NAMES``).
    Ids not listed are judged by ``WELL_KNOWN_MODE_LEVELS``."""
    policy_modes: dict[str, str] = field(default_factory=dict)
    """The mode a session starts in under each permission policy (``ask``, ``allow``, ``deny``
    → mode id). Unset: the agent's most permissive mode within the policy's level."""
    mode_args: dict[str, list[str]] = field(default_factory=dict)
    """Arguments appended to ``command`` to start the agent in a mode (mode id → argv)."""
    mode_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Settings merged into ``settings_files`` to start the agent in a mode (mode id →
    {file: content})."""
    notebook_tools_settings: dict[str, Any] = field(default_factory=dict)
    """Settings merged into ``settings_files`` when the sessions get the notebook tools
    (``c.NotebookTools.enabled``): e.g. the agent's own notebook editor taken away, which
    rewrites the whole ``.ipynb`` behind the open notebook's back ({file: content})."""
    mode_announcement: str = ""
    """A regular expression for a whole ``agent_message_chunk`` text by which the agent announces
    a mode change of its own (group 1: the mode id), for agents that send no
    ``current_mode_update`` (Gemini CLI 0.61: ``[MODE_UPDATE] autoEdit``)."""
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
        if set(self.policy_modes) - set(POLICY_LEVELS):
            raise ValueError(f"Agent {self.name!r}: policy_modes keys must be among {sorted(POLICY_LEVELS)}")
        if any(not isinstance(v, int) or v not in MODE_LEVEL_NAMES for v in self.mode_levels.values()):
            raise ValueError(f"Agent {self.name!r}: mode_levels values must be 0 to 4")

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

    def argv(self, model: str | None = None, base_url: str | None = None) -> list[str]:
        """The command with ``{model}`` replaced (the credentials' model, else ``default_model``)
        and ``{base_url}`` (the LLM endpoint as the agent reaches it, for agents that take it
        only as an argument, e.g. Codex; through the gateway it holds ``{port}``, which the
        relay fills in)."""
        chosen = model or self.default_model or ""
        return [arg.replace("{model}", chosen).replace("{base_url}", base_url or "") for arg in self.command]

    def write_home(self, home: Path) -> None:
        """Write ``settings_files`` into a session's fresh home directory: JSON, or TOML for a
        name ending in ``.toml`` (Codex's ``config.toml``)."""
        for rel, content in self.settings_files.items():
            target = (home / rel).resolve()
            if home.resolve() not in target.parents:
                raise ValueError(f"Agent {self.name!r}: settings file {rel!r} lies outside $HOME")
            target.parent.mkdir(parents=True, exist_ok=True)
            text = to_toml(content) if rel.endswith(".toml") else json.dumps(content, indent=2) + "\n"
            target.write_text(text)

    # -- modes ---------------------------------------------------------------------------------
    def mode_level(self, mode_id: str | None) -> int | None:
        """How permissive a mode is (``MODE_LEVEL_NAMES``), or None when unknown."""
        if mode_id is None:
            return None
        if mode_id in self.mode_levels:
            return self.mode_levels[mode_id]
        return WELL_KNOWN_MODE_LEVELS.get(mode_id)

    def policy_mode(self, policy: str, available: list[str] | None = None) -> str | None:
        """The mode a session starts in under ``policy``: the spec's ``policy_modes`` entry, else
        (among ``available``) the most permissive known mode within the policy's level, else the
        most restrictive one that still asks (the client applies the policy to every request).
        None when no known mode fits."""
        declared = self.policy_modes.get(policy)
        if declared and (available is None or declared in available):
            return declared
        known = [(level, m) for m in available or [] if (level := self.mode_level(m)) is not None]
        within = [(level, m) for level, m in known if level <= POLICY_LEVELS[policy]]
        if within:
            return max(within, key=lambda lm: lm[0])[1]
        asking = [(level, m) for level, m in known if level <= 1]
        return min(asking, key=lambda lm: lm[0])[1] if asking else None

    def mode_permitted(self, mode_id: str, policy: str) -> bool:
        """Whether ``policy`` alone (no admin list) lets a session be in ``mode_id``."""
        level = self.mode_level(mode_id)
        return level is not None and level <= POLICY_LEVELS[policy]

    def announced_mode(self, text: str) -> str | None:
        """The mode id a message chunk announces (``mode_announcement``), else None."""
        if not self.mode_announcement or len(text) > 200:
            return None
        match = re.fullmatch(self.mode_announcement, text.strip())
        return match.group(1) if match else None

    def for_policy(self, policy: str) -> AgentSpec:
        """A copy that starts in the policy's mode: ``mode_args`` and ``mode_settings`` applied."""
        mode = self.policy_modes.get(policy)
        if not mode:
            return self
        command = [*self.command, *self.mode_args.get(mode, [])] if self.command else []
        settings = _merged(self.settings_files, self.mode_settings.get(mode, {}))
        return replace(self, command=command, settings_files=settings)

    def with_notebook_tools(self) -> AgentSpec:
        """A copy for sessions that get the notebook tools: ``notebook_tools_settings`` applied."""
        if not self.notebook_tools_settings:
            return self
        return replace(self, settings_files=_merged(self.settings_files, self.notebook_tools_settings))

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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for settings files (tables, strings, numbers, booleans, lists):
    enough for Codex's ``config.toml``, without a dependency."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    out = "\n".join(lines) + ("\n" if lines else "")
    for key, value in data.items():
        if isinstance(value, dict):
            name = f"{prefix}.{json.dumps(key)}" if prefix else json.dumps(key)
            out += f"\n[{name}]\n" + to_toml(value, name)
    return out


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
    # the notebook tools (notebooks/channel.py): Qwen Code 0.24 offers MCP tools to its LLM only
    # through its ``tool_search`` tool unless they are listed here (a plain tool loop never
    # finds them); its env QWEN_CODE_LEGACY_MCP_BLOCKING=1 connects them before the first turn
    "tools": {"visible": [f"mcp__{NB_SERVER}__{name}" for name in NB_TOOLS]},
    # ... and runs them without a permission request per cell edit (the rule ``mcp__jupyter``
    # covers all of the server's tools): the tools guard themselves (a run in a kernel asks the
    # user, an edit is undoable)
    "permissions": {"allow": [f"mcp__{NB_SERVER}"]},
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
    # the notebook tools (notebooks/channel.py), ``mcp_jupyter_<tool>`` to Gemini: it runs them
    # without asking (outside plan mode) instead of sending a permission request per cell edit,
    # which the server could not tell from others (Gemini's carry no ``_meta.toolName``). The
    # tools guard themselves: a run in a kernel asks the user, an edit is undoable. (Also an
    # allow-list: no other MCP server connects — none is configured.)
    "mcp": {"allowed": [NB_SERVER]},
}

#: The ACP modes of each built-in agent, least permissive first, with their levels and how each
#: is started (read from the agents' own code):
#: Qwen Code 0.24: ``plan``, ``default``, ``auto-edit``, ``auto`` (an LLM classifier approves),
#: ``yolo``; it starts in ``auto`` unless ``--approval-mode`` or ``tools.approvalMode`` says
#: otherwise (and a settings reload without ``tools.approvalMode`` puts live sessions in ``auto``).
QWEN_MODE_LEVELS = {"plan": 0, "default": 1, "auto-edit": 2, "auto": 3, "yolo": 4}
#: Gemini CLI 0.61: ACP ids ``default``, ``autoEdit``, ``yolo``, ``plan``; ``--approval-mode``
#: spells ``autoEdit`` as ``auto_edit``. It starts in ``default``. It switches itself to
#: ``autoEdit`` when the user answers "allow always" to an edit, and (like any switch of its own)
#: says so only in a message chunk ``[MODE_UPDATE] autoEdit``, never ``current_mode_update``.
GEMINI_MODE_LEVELS = {"plan": 0, "default": 1, "autoEdit": 2, "yolo": 4}
GEMINI_MODE_FLAGS = {"plan": "plan", "default": "default", "autoEdit": "auto_edit", "yolo": "yolo"}
#: claude-agent-acp 0.101: ``auto`` (a classifier), ``default``, ``acceptEdits``, ``plan``,
#: ``dontAsk`` (denies what is not pre-approved), ``bypassPermissions`` (refused as root). Its
#: starting mode depends on the model (``auto`` for names it does not know) and on
#: ``permissions.defaultMode`` in ``~/.claude/settings.json``; the session sets the policy's mode
#: after ``session/new`` anyway.
CLAUDE_MODE_LEVELS = {"plan": 0, "dontAsk": 1, "default": 1, "acceptEdits": 2, "auto": 3,
                      "bypassPermissions": 4}
#: Claude Code's environment: no telemetry, error reports or auto-update, and none of its
#: "nonessential" traffic (without that switch it calls api.anthropic.com directly, past the
#: gateway); no prompt suggestion after each turn (one more, hidden, LLM call). Measured with
#: claude-agent-acp 0.101.0 (native ``claude`` 2.1.318): with these, the only requests are
#: ``POST /v1/messages`` to ``ANTHROPIC_BASE_URL`` (the turn's, plus one title call per turn).
CLAUDE_ENV = {"DISABLE_TELEMETRY": "1", "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1",
              "DISABLE_BUG_COMMAND": "1", "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
              "CLAUDE_CODE_ENABLE_PROMPT_SUGGESTION": "false", "CLAUDE_CODE_DISABLE_FEEDBACK_SURVEY": "1"}
#: ``~/.claude/settings.json``: no co-author lines in commits it makes for the user. The notebook
#: tools (``mcp__jupyter__<tool>``; the rule ``mcp__jupyter`` covers all of the server's) run
#: without a permission request per cell edit, which the server could not tell from others
#: (Claude's carry ``_meta.claudeCode.toolName``): the tools guard themselves (a run in a
#: kernel asks the user, an edit is undoable).
CLAUDE_SETTINGS = {"includeCoAuthoredBy": False,
                   "permissions": {"defaultMode": "default", "allow": [f"mcp__{NB_SERVER}"]}}
#: codex-acp 0.16 (codex 0.137): ``read-only`` (asks before edits and commands), ``auto`` (edits and
#: runs commands in the workspace without asking), ``full-access``; the mode follows the
#: ``approval_policy`` and ``sandbox_mode`` of its config.
CODEX_MODE_LEVELS = {"read-only": 1, "auto": 2, "full-access": 4}
CODEX_MODE_CONFIG = {"read-only": ("on-request", "read-only"), "auto": ("on-request", "workspace-write"),
                     "full-access": ("never", "danger-full-access")}
#: ``~/.codex/config.toml``: the model provider ``jacp`` (the Responses wire API, the key from
#: ``OPENAI_API_KEY``; its ``base_url`` is an argument, see the spec), no update check, no
#: analytics, feedback or OpenTelemetry export, no history file. Codex has no base-URL
#: environment variable and no login is needed with ``env_key``. Its own sandbox (for commands
#: it runs without asking, e.g. read-only ones) uses Landlock, not its default nested
#: bubblewrap: nested user namespaces are refused inside a Docker container ("bwrap: No
#: permissions to create new namespace", so every such command failed), Landlock works in both
#: of our backends (measured with codex-acp 0.16.0). Our sandbox stays the boundary.
CODEX_CONFIG = {
    "model_provider": "jacp",
    "check_for_update_on_startup": False,
    "model_providers": {"jacp": {"name": "jupyter-acp", "wire_api": "responses",
                                 "env_key": "OPENAI_API_KEY", "request_max_retries": 1,
                                 "stream_max_retries": 1}},
    "analytics": {"enabled": False},
    "feedback": {"enabled": False},
    "otel": {"exporter": "none", "trace_exporter": "none", "log_user_prompt": False},
    "history": {"persistence": "none"},
    "features": {"use_legacy_landlock": True},
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
            env={"QWEN_CODE_LEGACY_MCP_BLOCKING": "1"},
            settings_files={".qwen/settings.json": QWEN_SETTINGS},
            # (its ``notebook_edit`` writes the whole file through fs/write_text_file, which the
            # server refuses while the tools are on: offered, it only wastes a call of the LLM)
            notebook_tools_settings={".qwen/settings.json": {"permissions": {"deny": ["notebook_edit"]}}},
            mode_levels=dict(QWEN_MODE_LEVELS),
            policy_modes={"ask": "default", "allow": "auto-edit", "deny": "plan"},
            mode_args={m: ["--approval-mode", m] for m in QWEN_MODE_LEVELS},
            mode_settings={m: {".qwen/settings.json": {"tools": {"approvalMode": m}}}
                           for m in QWEN_MODE_LEVELS},
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
            mode_levels=dict(GEMINI_MODE_LEVELS),
            policy_modes={"ask": "default", "allow": "autoEdit", "deny": "plan"},
            mode_args={m: ["--approval-mode", flag] for m, flag in GEMINI_MODE_FLAGS.items()},
            mode_announcement=r"\[MODE_UPDATE\] (\w+)",
            source="builtin",
        ),
        AgentSpec(
            name="claude",
            display_name="Claude Code",
            command=["claude-agent-acp"],
            capabilities=["fs", "terminal", "permissions", "load_session", "modes", "llm"],
            credential_env={"api_key": "ANTHROPIC_API_KEY", "base_url": "ANTHROPIC_BASE_URL",
                            "model": "ANTHROPIC_MODEL", "access_token": "CLAUDE_CODE_OAUTH_TOKEN"},
            description="Claude Code (npm @agentclientprotocol/claude-agent-acp) over ACP.",
            mem_limit=1024**3,
            llm_api="anthropic",
            env=dict(CLAUDE_ENV),
            settings_files={".claude/settings.json": CLAUDE_SETTINGS},
            mode_levels=dict(CLAUDE_MODE_LEVELS),
            policy_modes={"ask": "default", "allow": "acceptEdits", "deny": "plan"},
            mode_settings={m: {".claude/settings.json": {"permissions": {"defaultMode": m}}}
                           for m in CLAUDE_MODE_LEVELS},
            source="builtin",
        ),
        AgentSpec(
            name="codex",
            display_name="Codex",
            # the provider's endpoint and the model are arguments: codex reads no base-URL variable
            command=["codex-acp", "-c", 'model_providers.jacp.base_url="{base_url}"',
                     "-c", 'model="{model}"'],
            capabilities=["fs", "terminal", "permissions", "modes", "llm"],
            credential_env=dict(_OPENAI_CREDS),
            description="OpenAI Codex (npm @zed-industries/codex-acp) over ACP; OpenAI Responses.",
            mem_limit=1024**3,
            llm_api="openai",
            default_model="gpt-5.3-codex",
            default_base_url="https://api.openai.com/v1",
            settings_files={".codex/config.toml": CODEX_CONFIG},
            mode_levels=dict(CODEX_MODE_LEVELS),
            policy_modes={"ask": "read-only", "allow": "auto", "deny": "read-only"},
            mode_settings={m: {".codex/config.toml": {"approval_policy": approval, "sandbox_mode": sandbox}}
                           for m, (approval, sandbox) in CODEX_MODE_CONFIG.items()},
            source="builtin",
        ),
    ]


class AgentConfigManager(LoggingConfigurable):
    """Knows every agent this server may run and which of them can run here."""

    agents = Dict(
        help="""Agents added by the admin, by name. Each value is a dict with the keys of
        ``AgentSpec``: ``command`` (argv list) or ``url`` (ws:// endpoint), and optionally
        ``display_name``, ``env``, ``capabilities``, ``credential_env`` (credential field →
        environment variable), ``description``, ``mem_limit`` (bytes), ``ro_paths``, and for its
        modes ``mode_levels``, ``policy_modes``, ``mode_args``, ``mode_settings``, and
        ``notebook_tools_settings`` (settings applied while the notebook tools are on).
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

    credentials = Credentials(
        help="""Admin-supplied default credentials per agent name, e.g.
        ``{"qwen": {"api_key": {"env": "DASHSCOPE_API_KEY"}, "base_url": "...", "model": "..."}}``.
        A field's value is the value itself, or a reference read at every session start:
        ``{"env": "NAME"}`` (an environment variable of the server) or ``{"file": "/abs/path"}``
        (a trailing newline is dropped; a rotated file is used by the next session). Prefer a
        reference: the key then never enters the configuration. Values reach only the LLM
        gateway or the agent process environment, never a log or an API response.""",
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

    @observe("agents")
    def _register_env_secrets(self, change: Any) -> None:
        """A key the admin put in an agent's ``env`` (``OPENAI_API_KEY``, ``*_TOKEN``, ...) is
        masked in every log line, like ``credentials`` (config dumps mask every ``env`` value)."""
        for data in (change.new or {}).values():
            env = data.get("env") if isinstance(data, dict) else None
            for name, value in (env if isinstance(env, dict) else {}).items():
                if SECRET_KEY_RE.match(str(name)):
                    register(value)

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
        """Admin defaults overlaid with the user's own values (which win where given).

        Values are ``Secret``s (masked by ``repr``). The user's are not registered for log
        redaction (see ``logredact``): nothing logs them."""
        merged = self.admin_credentials(spec)
        for key, value in (user_credentials or {}).items():
            if key not in CREDENTIAL_FIELDS:
                raise ValueError(f"Unknown credential field {key!r}; known: {', '.join(CREDENTIAL_FIELDS)}")
            if value and key not in self.user_credential_fields:
                raise ValueError(f"Your admin does not let users set the credential {key!r} "
                                 f"(allowed: {', '.join(self.user_credential_fields) or 'none'})")
            if value:
                merged[key] = Secret(value)
        return merged

    def admin_credentials(self, spec: AgentSpec) -> dict[str, str]:
        """The admin's defaults for ``spec``: ``credentials[name]`` with references read now
        (``CredentialUnavailable`` when one cannot be), then the server's env if allowed."""
        merged = resolve_all(spec.name, self.credentials.get(spec.name, {}))
        if self.credentials_from_env:
            for key, var in spec.credential_env.items():
                if key not in merged and os.environ.get(var):
                    merged[key] = as_secret(key, os.environ[var])
        return merged

    def credential_problems(self) -> list[str]:
        """Admin references that cannot be read now (for a warning when the server starts)."""
        return problems(self.credentials)
