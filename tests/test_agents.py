"""Agent discovery: built-ins found on PATH, admin config, entry points, capability selection."""

from __future__ import annotations

from pathlib import Path

import pytest

from jupyter_acp.agents import AgentConfigManager, AgentSpec, builtin_specs, to_toml
from jupyter_acp.errors import AgentNotFound, AgentUnavailable


def fake_executable(directory: Path, name: str) -> Path:
    directory.mkdir(exist_ok=True)
    exe = directory / name
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    return exe


@pytest.fixture
def no_real_agents(monkeypatch, tmp_path):
    """A PATH without any real agent, so results do not depend on this machine."""
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def test_builtins_are_offered_only_when_installed(no_real_agents, tmp_path):
    acm = AgentConfigManager()
    status = {spec.name: (ok, why) for spec, ok, why in acm.list_agents()}
    assert {"qwen", "gemini", "claude", "codex", "demo"} <= set(status)
    assert status["qwen"] == (False, "'qwen' is not installed (not found on PATH)")
    assert status["demo"] == (True, "")
    with pytest.raises(AgentUnavailable, match="qwen"):
        acm.get_available("qwen")

    qwen = fake_executable(tmp_path / "bin", "qwen")
    acm.extra_paths = [str(tmp_path / "bin")]
    spec = acm.get_available("qwen")
    assert spec.command == [str(qwen), "--acp"]
    assert acm.get(None).name == "qwen"  # a real agent is preferred to the demo by default


def test_demo_is_labelled_and_comes_from_the_entry_point(no_real_agents):
    demo = AgentConfigManager().get("demo")
    assert demo.demo is True and "demo" in demo.display_name.lower()
    assert demo.source.startswith("entry point jupyter_acp.agents_builtin")
    assert AgentConfigManager().get(None).name == "demo"  # the only available agent


def test_entry_points_are_read_once_per_server(no_real_agents, monkeypatch):
    """Reading every distribution's metadata took ~20-50 ms of the event loop per new session."""
    import jupyter_acp.agents as agents

    scans = []
    real = agents.entry_points
    monkeypatch.setattr(agents, "entry_points", lambda **kw: scans.append(kw) or real(**kw))
    acm = AgentConfigManager()
    for _ in range(3):
        assert acm.get("demo").source.startswith("entry point jupyter_acp.agents_builtin")
        assert "demo" in {spec.name for spec, _, _ in acm.list_agents()}
    assert scans == [{"group": "jupyter_acp.agents"}]


def test_admin_adds_an_agent_with_no_code(no_real_agents, tmp_path):
    exe = fake_executable(tmp_path / "bin", "my-agent")
    acm = AgentConfigManager(agents={"mine": {"command": [str(exe), "--stdio"], "display_name": "Mine",
                                              "capabilities": ["fs", "custom"],
                                              "env": {"SECRET_TOKEN": "abc"}}},
                             disabled_agents=["claude"], default_agent="mine")
    spec = acm.get("mine")
    assert spec.command == [str(exe), "--stdio"] and spec.availability() == (True, "")
    assert "claude" not in {s.name for s, _, _ in acm.list_agents()}
    assert acm.get(None) is not None and acm.get(None).name == "mine"
    public = spec.to_public()
    assert "env" not in public and public["env_keys"] == ["SECRET_TOKEN"] and "abc" not in str(public)


def test_select_best_agent(no_real_agents, tmp_path):
    exe = fake_executable(tmp_path / "bin", "a")
    acm = AgentConfigManager(agents={"real": {"command": [str(exe)], "capabilities": ["fs", "llm"]}})
    assert acm.select_best_agent(["fs"]).name == "real"  # non-demo first
    assert acm.select_best_agent(["terminal", "permissions"]).name == "demo"
    with pytest.raises(AgentNotFound, match="No available agent offers all of"):
        acm.select_best_agent(["fs", "telepathy"])


def test_bad_specs_are_clear_errors():
    with pytest.raises(ValueError, match="exactly one of 'command' or 'url'"):
        AgentSpec(name="x")
    with pytest.raises(ValueError, match="ws:// or wss://"):
        AgentSpec(name="x", url="http://example.invalid")
    with pytest.raises(ValueError, match="unknown keys"):
        AgentSpec.from_dict("x", {"command": ["a"], "comand": ["b"]})
    with pytest.raises(ValueError, match="unknown credential fields"):
        AgentSpec(name="x", command=["a"], credential_env={"password": "P"})
    assert AgentSpec(name="r", url="wss://agents.example/acp").availability() == (True, "")
    with pytest.raises(AgentNotFound, match="Unknown agent 'nope'"):
        AgentConfigManager().get("nope")


def test_credentials_admin_defaults_and_user_override(no_real_agents):
    acm = AgentConfigManager(credentials={"qwen": {"api_key": "admin-key", "model": "qwen3-coder"}})
    spec = acm.get("qwen")
    merged = acm.credentials_for(spec, {"api_key": "user-key", "base_url": ""})
    assert merged == {"api_key": "user-key", "model": "qwen3-coder"}
    assert spec.credentials_env(merged) == {"OPENAI_API_KEY": "user-key", "OPENAI_MODEL": "qwen3-coder"}
    with pytest.raises(ValueError, match="Unknown credential field"):
        acm.credentials_for(spec, {"pwd": "x"})


def test_codex_config_is_toml_and_its_endpoint_an_argument(tmp_path):
    """Codex reads its provider from ``~/.codex/config.toml`` and has no base-URL variable: the
    spec writes TOML, and ``{base_url}`` in its argv is the gateway's loopback URL, whose
    ``{port}`` the relay fills in (``test_relay_fills_the_port_into_the_agents_arguments``)."""
    import tomllib

    spec = {s.name: s for s in builtin_specs()}["codex"].for_policy("ask")
    spec.write_home(tmp_path)
    config = tomllib.loads((tmp_path / ".codex" / "config.toml").read_text())
    assert config["model_provider"] == "jacp"
    assert config["model_providers"]["jacp"]["wire_api"] == "responses"
    assert config["model_providers"]["jacp"]["env_key"] == "OPENAI_API_KEY"
    assert (config["approval_policy"], config["sandbox_mode"]) == ("on-request", "read-only")
    assert config["check_for_update_on_startup"] is False and config["analytics"] == {"enabled": False}
    assert config["features"]["use_legacy_landlock"] is True  # no nested bwrap (refused in Docker)
    argv = spec.argv(None, "http://127.0.0.1:{port}/v1")
    assert 'model_providers.jacp.base_url="http://127.0.0.1:{port}/v1"' in argv
    assert 'model="gpt-5.3-codex"' in argv


def test_to_toml_round_trips():
    import tomllib

    data = {"a": 1, "b": "x \"q\" \\ y", "c": [True, 2.5], "t": {"u": {"v": False}, "w": "z"}}
    assert tomllib.loads(to_toml(data)) == data


def test_claude_is_kept_off_the_network_but_for_its_endpoint():
    spec = {s.name: s for s in builtin_specs()}["claude"]
    for name in ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_TELEMETRY", "DISABLE_AUTOUPDATER",
                 "DISABLE_ERROR_REPORTING"):
        assert spec.env[name] == "1"
    assert spec.env["CLAUDE_CODE_ENABLE_PROMPT_SUGGESTION"] == "false"  # one hidden LLM call less
    settings = spec.for_policy("deny").settings_files[".claude/settings.json"]
    assert settings["permissions"]["defaultMode"] == "plan"
    assert settings["permissions"]["allow"] == ["mcp__jupyter"]  # (the notebook tools ask themselves)
