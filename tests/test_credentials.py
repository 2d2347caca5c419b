"""The admin's credentials: given inline or by reference, and never written to any log.

The end-to-end test runs a real ``jupyter server --debug`` (``bench/harness.py``) whose admin
key for Qwen Code (real, from ``scripts/agents``) is given inline, inline as ``Secret``, by an
environment variable or by a file, makes a whole turn through the LLM gateway to the local fake
LLM (``fake_llm.py``), and then searches every line the server wrote — its stdout and stderr
and every file under its directory — for each key, while the fake LLM shows that the key was
really used. Without Qwen Code the test skips, or fails with ``JUPYTER_ACP_REQUIRE_AGENTS=1``.
The unit tests check the references' errors and the redaction of log records one by one.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import logging
import os
import pickle
import secrets
import subprocess
import sys
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fake_llm import FakeLLM
from test_real_agents import require_agent
from traitlets import TraitError
from traitlets.config import Config

from jupyter_acp import logredact
from jupyter_acp.agents import AgentConfigManager
from jupyter_acp.credentials import MAX_SECRET_FILE_BYTES, Credentials, CredentialUnavailable, Secret
from jupyter_acp.logredact import MASK
from jupyter_acp.testing import stop_process

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("acp_bench_harness", ROOT / "bench" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(harness)


def new_key(label: str) -> str:
    return f"sk-acp-{label}-{secrets.token_hex(12)}"


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Everything logged to ``acp-test`` (a logger of its own, at DEBUG), as text."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("acp-test")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    yield stream
    log.removeHandler(handler)


# -- references -------------------------------------------------------------------------------------
def test_references_are_read_at_session_start(tmp_path, monkeypatch):
    """``{"env": NAME}`` and ``{"file": PATH}`` are read at every session start (a rotated file
    is used by the next session; its trailing newline is dropped); what cannot be read refuses
    the session with an error naming the agent, the field and the reference, never a value."""
    key, rotated = new_key("env"), new_key("rotated")
    secret_file = tmp_path / "qwen_key"
    secret_file.write_text(key + "\n")
    monkeypatch.setenv("ACP_TEST_KEY", key)
    acm = AgentConfigManager(credentials={
        "qwen": {"api_key": {"file": str(secret_file)}, "model": "m"},
        "gemini": {"api_key": {"env": "ACP_TEST_KEY"}},
    })
    qwen, gemini = acm.get("qwen"), acm.get("gemini")
    assert acm.admin_credentials(qwen) == {"api_key": key, "model": "m"}
    assert acm.credentials_for(gemini, None) == {"api_key": key}
    secret_file.write_text(rotated + "\r\n")
    assert acm.credentials_for(qwen, None)["api_key"] == rotated
    assert acm.credentials_for(qwen, {"api_key": "mine"})["api_key"] == "mine"
    assert acm.credential_problems() == []
    assert rotated in logredact.known_secrets()  # what a reference gave is redacted from now on
    assert repr(acm.admin_credentials(qwen)) == f"{{'api_key': {MASK}, 'model': {MASK}}}"

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    big = tmp_path / "big"
    big.write_bytes(b"k" * (MAX_SECRET_FILE_BYTES + 1))
    empty = tmp_path / "empty"
    empty.write_text("\n")
    monkeypatch.setenv("ACP_TEST_EMPTY", "")
    monkeypatch.delenv("ACP_TEST_UNSET", raising=False)
    cases = {
        "unset": ({"env": "ACP_TEST_UNSET"}, "the environment variable ACP_TEST_UNSET, which is not set"),
        "empty env": ({"env": "ACP_TEST_EMPTY"}, "variable ACP_TEST_EMPTY, which is empty"),
        "missing": ({"file": str(tmp_path / "nope")}, "which cannot be read (No such file or directory)"),
        "directory": ({"file": str(tmp_path)}, "which is not a regular file"),
        "fifo": ({"file": str(fifo)}, "which is not a regular file"),  # refused at once, no hang
        "big": ({"file": str(big)}, f"which is larger than {MAX_SECRET_FILE_BYTES} bytes"),
        "empty": ({"file": str(empty)}, "which is empty"),
    }
    for name, (ref, why) in cases.items():
        acm.credentials = {"qwen": {"api_key": ref}}
        with pytest.raises(CredentialUnavailable) as info:
            acm.credentials_for(qwen, None)
        message = str(info.value)
        assert message.startswith("Agent 'qwen' cannot start: its credential 'api_key' is read from "), name
        assert why in message and "k" * 20 not in message, (name, message)
        assert info.value.status == 422
    acm.credentials = {"qwen": {"api_key": {"env": "ACP_TEST_UNSET"}}, "gemini": {"model": "x"}}
    assert acm.credential_problems() == [
        "Agent 'qwen' cannot start: its credential 'api_key' is read from the environment variable "
        "ACP_TEST_UNSET, which is not set (see c.AgentConfigManager.credentials)"]


async def test_an_unreadable_reference_refuses_the_session(acp_managers, monkeypatch):
    """Through the session manager: the error reaches the user as is (422), nothing starts."""
    monkeypatch.delenv("ACP_TEST_UNSET", raising=False)
    manager = acp_managers()
    manager.agents.credentials = {"demo": {"api_key": {"env": "ACP_TEST_UNSET"}}}
    with pytest.raises(CredentialUnavailable, match="'demo' cannot start: its credential 'api_key'"):
        await manager.create_user_session("alice", "demo")
    assert manager.get_user_sessions("alice") == []


def test_bad_credentials_config_is_refused_without_showing_it():
    """Config-time errors name the agent and the field; traitlets' own would quote the value."""
    key = new_key("bad")
    bad = {
        "a string": key,
        "not a dict of fields": {"qwen": key},
        "unknown field": {"qwen": {"apikey": key}},
        "not a reference": {"qwen": {"api_key": {"value": key}}},
        "two kinds": {"qwen": {"api_key": {"env": "A", "file": "/b"}}},
        "the key as env name": {"qwen": {"api_key": {"env": key}}},
        "the key as file": {"qwen": {"api_key": {"file": key}}},
        "a number": {"qwen": {"api_key": 12345678901234567890}},
    }
    for name, value in bad.items():
        with pytest.raises(TraitError) as info:
            AgentConfigManager(credentials=value)
        assert key not in str(info.value) and "12345678901234567890" not in str(info.value), name
    trait = AgentConfigManager.class_traits()["credentials"]
    assert isinstance(trait, Credentials)
    for cli in [f"{{'qwen': {{'api_key': '{key}'", f"qwen={key}"]:  # from the command line
        with pytest.raises(TraitError) as info:
            trait.from_string(cli)
        assert key not in str(info.value)
    with pytest.raises(TraitError) as info:
        trait.from_string_list([f"qwen{key}"])
    assert key not in str(info.value)
    assert trait.from_string("{'qwen': {'api_key': {'env': 'K'}}}") == {"qwen": {"api_key": {"env": "K"}}}


# -- redaction --------------------------------------------------------------------------------------
def test_logged_configs_are_masked_by_structure(captured):
    """A ``Config`` among a record's arguments (traitlets' ``Config changed: %r``) is logged
    with inline credentials, agents' ``env`` values and secret-named keys masked, references
    readable — whatever the values are, registered or not, parsable or not."""
    logredact.install()
    key, env_key, token = new_key("cfg"), new_key("agentenv"), "tok"  # (too short to register)
    config = Config()
    config.AgentConfigManager.credentials = {"qwen": {"api_key": key, "base_url": "http://x"},
                                             "gemini": {"api_key": {"env": "GEMINI_KEY"},
                                                        "access_token": {"env": key}}}
    config.AgentConfigManager.agents = {"mine": {"command": ["a"], "env": {"MY_KEY": env_key}}}
    config.IdentityProvider.token = token
    config.UserSessionManager.AgentConfigManager.credentials = f"{{'x': {{'api_key': '{key}'}}}}"
    log = logging.getLogger("acp-test")
    log.debug("Config changed: %r", config)
    log.debug("Config at the time: %s", config)
    log.debug("two: %s %s", config, "x")
    log.debug(config)
    text = captured.getvalue()
    assert key not in text and env_key not in text and "'tok'" not in text
    assert text.count("'credentials': {'qwen': {'api_key': <secret>, 'base_url': <secret>}, "
                      "'gemini': {'api_key': {'env': 'GEMINI_KEY'}, 'access_token': <secret>}}") == 4
    assert "'env': {'MY_KEY': <secret>}" in text and "'token': <secret>" in text
    assert config.AgentConfigManager.credentials["qwen"]["api_key"] == key  # the config is untouched


def test_known_secrets_are_masked_in_any_record(captured):
    """A registered value is masked in the message, its arguments, a traceback and a structured
    (dict) record; user-supplied credentials are not registered (a user must not
    be able to blank words of the admin's log)."""
    logredact.install()
    key, env_key = new_key("known"), new_key("agentenv")
    env = {"MY_API_KEY": env_key, "MODE": "fast-mode"}
    AgentConfigManager(credentials={"qwen": {"api_key": key, "model": "fake-model"}},
                       agents={"mine": {"command": ["a"], "env": env}})
    log = logging.getLogger("acp-test")
    log.info("agent stderr: Invalid API key %s for model fake-model", key)
    log.info("agent stderr: %s", env)
    log.info(f"inline {key}")
    try:
        raise RuntimeError(f"upstream refused {key}")
    except RuntimeError:
        log.exception("gateway failed")
    records: list[logging.LogRecord] = []
    catcher = logging.Handler()
    catcher.emit = records.append  # type: ignore[method-assign]
    log.addHandler(catcher)
    log.info({"event": "x", "detail": [key]})
    log.removeHandler(catcher)
    text = captured.getvalue()
    assert key not in text and env_key not in text and text.count(MASK) >= 4, text
    assert "fake-model" in text and "fast-mode" in text  # only secrets are searched for
    assert records[0].msg == {"event": "x", "detail": [MASK]}
    user_key = new_key("user")
    AgentConfigManager().credentials_for(AgentConfigManager().get("qwen"), {"api_key": user_key})
    assert user_key not in logredact.known_secrets()


def test_secret_is_a_string_with_a_masked_repr():
    key = new_key("secret")
    value = Secret(key)
    assert value == key and f"{value}" == key and str(value) == key and type(str(value)) is str
    assert json.dumps({"k": value}) == json.dumps({"k": key})
    assert repr(value) == MASK and repr({"k": value}) == f"{{'k': {MASK}}}"
    assert copy.deepcopy(value) is value and pickle.loads(pickle.dumps(value)) == key
    assert repr(pickle.loads(pickle.dumps(value))) == MASK


def test_log_filter_for_logging_config(captured):
    """The filter a JSON config can name in ``c.ServerApp.logging_config`` (resolved the way
    ``dictConfig`` does) installs the redaction and masks a logged config by itself too."""
    from logging.config import DictConfigurator

    log_filter = DictConfigurator({}).configure_filter({"()": "jupyter_acp.logredact.log_filter"})
    assert isinstance(log_filter, logredact.RedactingFilter)
    key = new_key("filter")
    config = Config({"AgentConfigManager": {"credentials": {"qwen": {"api_key": key}}}})
    record = logging.LogRecord("x", logging.DEBUG, __file__, 1, "Config changed: %r", (config,), None)
    assert log_filter.filter(record) and key not in record.getMessage()
    assert "'api_key': <secret>" in record.getMessage()


# -- the real server --------------------------------------------------------------------------------
#: How each case gives the admin's key: lines before, and the ``api_key`` value (``<KEY>`` and
#: ``<FILE>`` are filled in). In ``secret`` a lazy value (``.update``) makes the ServerApp log its
#: whole config before it loads any extension.
CASES = {
    "inline": ("", '"<KEY>"'),
    "secret": ('c.ServerApp.jpserver_extensions.update({"jupyter_acp": True})\n'
               "from jupyter_acp.credentials import Secret\n", 'Secret("<KEY>")'),
    "env": ("", '{"env": "ACP_TEST_QWEN_KEY"}'),
    "file": ("", '{"file": "<FILE>"}'),
}


def write_config(path: Path, case: str, key: str, key_file: Path, fake: FakeLLM, bin_dir: str) -> None:
    before, api_key = CASES[case]
    api_key = api_key.replace("<KEY>", key).replace("<FILE>", str(key_file))
    path.write_text(
        f"{before}"
        f"c.AgentConfigManager.extra_paths = [{bin_dir!r}]\n"
        f"c.AgentConfigManager.credentials = {{'qwen': {{'api_key': {api_key}, "
        f"'base_url': {fake.url + '/v1'!r}, 'model': 'fake-model'}}}}\n"
        f"c.UserSessionManager.allow_unsandboxed = True\n"
        f"c.UserSessionManager.agent_home_dir = {str(path.parent / 'homes')!r}\n")


@contextlib.contextmanager
def jupyter_server(tmp: Path, config: Path) -> Iterator[dict[str, Any]]:
    """``jupyter server --debug --config=CONFIG`` as an admin runs it: jupyter-acp enabled by
    its installed enable file, not on the command line (so the server's config holds the lazy
    ``jpserver_extensions`` that makes every extension app log the whole config as it links,
    the issue's "Config changed" lines). Everything it prints goes to ``tmp/server.log``."""
    port = harness.free_port()
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"), "JUPYTER_DATA_DIR": str(tmp / "data")}
    (tmp / "root").mkdir()
    cmd = [sys.executable, "-m", "jupyter_server", "--debug", f"--config={config}", "--no-browser",
           f"--port={port}", "--ip=127.0.0.1", f"--ServerApp.root_dir={tmp / 'root'}",
           "--ServerApp.identity_provider_class=jupyter_acp.testing.TokenPerUser",
           "--UserSessionManager.sandbox=local", f"--UsageLedger.db_url=sqlite:///{tmp / 'usage.sqlite'}",
           *(["--allow-root"] if os.geteuid() == 0 else [])]
    with open(tmp / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        server = {"url": f"http://127.0.0.1:{port}/", "proc": proc}
        try:
            deadline = time.monotonic() + 90
            while True:
                try:
                    harness.rest(server, "GET", "agents")
                    break
                except OSError as e:  # a 404: the server runs without the extension (see its log)
                    failed = isinstance(e, urllib.error.HTTPError) and e.code == 404
                    assert not failed and proc.poll() is None and time.monotonic() < deadline, \
                        (tmp / "server.log").read_text()[-3000:]
                    time.sleep(0.2)
            yield server
        finally:
            stop_process(proc)


def turn(server: dict[str, Any], user: int, body: dict[str, Any]) -> str:
    """A new session of Qwen Code and one whole turn; returns the session's id."""
    session = harness.rest(server, "POST", "sessions", user, {"agent": "qwen", "new": True, **body})
    assert session["state"] == "ready" and session["sandbox"] == "local", session
    result = harness.rest(server, "POST", f"sessions/{session['id']}/messages", user,
                          {"message": "hello there agent"})
    assert "Hello from the fake LLM. You said: hello there agent" in result["text"], result
    return session["id"]


def scan(directory: Path, keys: list[str], skip: set[Path]) -> tuple[int, int, list[str]]:
    """(files, lines) read under ``directory`` and where any key was found."""
    files = lines = 0
    found = []
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p not in skip):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        files += 1
        lines += data.count(b"\n") + 1
        found += [f"{path}: {key}" for key in keys if key.encode() in data]
    return files, lines, found


@pytest.mark.agent
@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("case", list(CASES))
def test_no_key_in_any_log_through_a_real_turn(case, tmp_path, monkeypatch):
    """``jupyter server --debug`` with the admin's key given ``case``-wise: a real Qwen Code
    turn goes through the gateway with that key (the fake LLM sees it), and no line the server
    wrote holds it. ``file`` also rotates the key between two sessions; ``env`` also starts a
    session with a key the user supplies in the POST body, which no log holds either."""
    bin_dir = require_agent("qwen")
    key = new_key(case)
    keys = [key]
    key_file = tmp_path / "qwen_key"
    key_file.write_text(key + "\n")
    monkeypatch.setenv("ACP_TEST_QWEN_KEY", key)
    config = tmp_path / "jupyter_server_config.py"
    started = time.monotonic()
    with FakeLLM() as fake:
        write_config(config, case, key, key_file, fake, bin_dir)
        with jupyter_server(tmp_path, config) as server:
            turn(server, 0, {})
            seen = [fake.requests[-1].headers.get("authorization")]
            if case == "file":  # the next session reads the rotated file
                keys.append(new_key("rotated"))
                key_file.write_text(keys[-1] + "\n")
                turn(server, 0, {})
                seen.append(fake.requests[-1].headers.get("authorization"))
            if case == "env":  # a key of the user's own, in the POST body
                keys.append(new_key("user"))
                turn(server, 1, {"credentials": {"api_key": keys[-1]}})
                seen.append(fake.requests[-1].headers.get("authorization"))
            live = scan(tmp_path, keys, {config, key_file})  # agent homes exist only now
        assert seen == [f"Bearer {k}" for k in keys]  # the gateway really used each key
        assert all(r.headers.get("authorization") in seen for r in fake.requests)
    log = (tmp_path / "server.log").read_text()
    after = scan(tmp_path, keys, {config, key_file})
    assert live[2] == [] and after[2] == [], (live[2], after[2])
    lines = log.splitlines()
    changed = [line for line in lines if "Config changed:" in line]
    assert changed and all("AgentConfigManager" in line for line in changed)  # debug was on
    if case in ("inline", "secret"):
        assert all("'api_key': <secret>" in line for line in changed)
    else:
        assert all(("'env': 'ACP_TEST_QWEN_KEY'" if case == "env" else str(key_file)) in line
                   for line in changed)
    early = lines.index(next(line for line in lines if "Extension package jupyter_acp" in line))
    if case == "secret":  # the ServerApp logged its config before it imported jupyter-acp
        assert any("Config changed:" in line for line in lines[:early])
    warned = "may have logged inline keys of c.AgentConfigManager.credentials (qwen.api_key)" in log
    assert warned == (case == "inline")
    assert "LLM gateway route for session" in log
    print(f"\n[{case}] {len(lines)} server log lines ({len(changed)} 'Config changed'), "
          f"{after[0]} files / {after[1]} lines after, {live[0]} files / {live[1]} lines live, "
          f"{len(fake.requests)} LLM requests, {time.monotonic() - started:.1f} s")
