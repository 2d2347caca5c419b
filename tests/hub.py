"""A REAL JupyterHub 6.1 for the end-to-end tests (tests/test_hub_e2e.py), as a subprocess.

What runs, all on 127.0.0.1 with free ports, in a private (root-only, 0700) temporary directory:

* ``jupyterhub`` from the venv, as root, with configurable-http-proxy 5.3.0 from
  ``.cache/chp`` (``scripts/hub-deps``) on its PATH;
* ``DummyAuthenticator`` with a shared password, ``LocalProcessSpawner`` and REAL Unix users
  ``acp-alice``, ``acp-bob`` and the admin ``acp-admin`` (made with ``useradd -m`` when missing,
  homes 0700): each user's single-user server (``jupyterhub-singleuser`` from the venv, with
  jupyter-acp and JupyterLab) and its kernels run as that user, so what a hostile user's code can
  reach is what a real deployment's user can reach: the test is the Unix permission model, not a
  simulation of it. (``SimpleLocalProcessSpawner`` would run every server as root and prove
  nothing about the service's key or files.);
* when the tree has it (``jupyter_acp.hub``), the hub-managed service ``jupyter-acp``
  (``python -m jupyter_acp.hub``, as root) whose config file -- 0600, root-owned, in a 0700
  directory -- holds the fake LLM's "real" key; the fake LLM (tests/fake_llm.py) runs in the test
  process; the single-user servers get the service's URL in ``JUPYTER_ACP_HUB_SERVICE_URL``
  (``c.Spawner.environment``);
* custom scopes ``custom:acp:use`` / ``custom:acp-usage:read`` and ``load_roles`` granting them,
  a hub group ``acp-quota-group`` (bob) for a group quota, named servers allowed.

Test tokens are the users' own: each user asks the hub for a token with their password
(``POST /hub/api/users/<name>/tokens`` with ``auth``), like a person making a token on the
token page. The servers are started through the REST API with those tokens.

Our users' venv interpreter may live under a directory they cannot traverse (pyenv under a 0700
``/root``): the fixture checks, as each user, that the venv's python imports jupyter_acp, and
when it cannot, grants that user search (``x``) permission, nothing else, on exactly the
directories in the way, with a POSIX ACL (``setfacl -m u:<user>:x``), removed at teardown.

``JUPYTER_ACP_REQUIRE_HUB=1`` (``.ci/run``) turns a missing hub, proxy, useradd or root into a
failure instead of a skip.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
from conftest import acp_require

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent  # the venv's bin (not resolved: that is the interpreter's home)
CHP_BIN = REPO / ".cache" / "chp" / "node_modules" / ".bin"
AGENTS_BIN = REPO / ".cache" / "agents" / "node_modules" / ".bin"
USERS = ("acp-alice", "acp-bob")
ADMIN = "acp-admin"
PASSWORD = "acp-hub-test-password"
#: the LLM key only the service may hold (the fake LLM's "real" key)
REAL_KEY = "sk-hub-REAL-" + "7f3c9a1e5b2d4c6f8a0b"
GROUP = "acp-quota-group"
SERVICE = "jupyter-acp"
SERVICE_PREFIX = f"/services/{SERVICE}/"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_hub() -> None:
    """Skip (or fail under JUPYTER_ACP_REQUIRE_HUB=1) when the rig cannot run here."""
    switch = "JUPYTER_ACP_REQUIRE_HUB"
    acp_require(switch, (VENV_BIN / "jupyterhub").exists() and (VENV_BIN / "jupyterhub-singleuser").exists(),
                f"jupyterhub is not installed in {VENV_BIN} (pip install -e '.[hub]')")
    acp_require(switch, (CHP_BIN / "configurable-http-proxy").exists(),
                f"configurable-http-proxy is not installed in {CHP_BIN} (scripts/hub-deps)")
    acp_require(switch, os.geteuid() == 0, "the JupyterHub tests make real Unix users: they need root")
    acp_require(switch, shutil.which("useradd") is not None, "useradd is missing (apt-get install passwd)")
    acp_require(switch, shutil.which("runuser") is not None,
                "runuser is missing (apt-get install util-linux)")


def service_available() -> bool:
    """Whether the tree has the hub service yet (``python -m jupyter_acp.hub``)."""
    try:
        return importlib.util.find_spec("jupyter_acp.hub.__main__") is not None
    except ImportError:
        return False


# -- Unix users ---------------------------------------------------------------------------------
def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "-m", "-s", "/bin/bash", name], check=True, capture_output=True)
        pw = pwd.getpwnam(name)
    os.chmod(pw.pw_dir, 0o700)
    return pw


def as_user(user: str, code: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -c code`` as the Unix user ``user`` (a process of hers, outside any server)."""
    pw = pwd.getpwnam(user)
    environ = {"HOME": pw.pw_dir, "USER": user, "PATH": f"{VENV_BIN}:/usr/bin:/bin", "LANG": "C.UTF-8", **env}
    argv = ["env", "-i", *(f"{k}={v}" for k, v in environ.items()), str(VENV_BIN / "python"), "-c", code]
    return subprocess.run(["runuser", "-u", user, "--", *argv],
                          capture_output=True, text=True, timeout=timeout, cwd=pw.pw_dir)


def _user_can_run_venv(user: str) -> tuple[bool, str]:
    res = as_user(user, "import importlib.util, jupyter_acp; "
                        "assert importlib.util.find_spec('jupyterhub.singleuser'); print('ok')")
    return res.returncode == 0 and res.stdout.strip() == "ok", (res.stderr or res.stdout)[-500:]


def _blocking_dirs(user: str, paths: list[Path]) -> list[Path]:
    """The directories on the way to ``paths`` (symlinks followed) that ``user`` cannot search."""
    pw = pwd.getpwnam(user)
    groups = {g for g in os.getgrouplist(user, pw.pw_gid)}
    blocked: list[Path] = []
    for target in paths:
        for path in [target, *target.parents] if target.is_dir() else list(target.parents):
            st = path.stat()
            if st.st_uid == pw.pw_uid:
                ok = bool(st.st_mode & 0o100)
            elif st.st_gid in groups:
                ok = bool(st.st_mode & 0o010)
            else:
                ok = bool(st.st_mode & 0o001)
            if not ok and path not in blocked:
                blocked.append(path)
    return blocked


def grant_traverse(users: list[str]) -> list[tuple[str, Path]]:
    """Let each user run the venv: ``x`` ACL entries on the directories in the way (returned, to undo)."""
    granted: list[tuple[str, Path]] = []
    needed = [Path(os.path.realpath(VENV_BIN / "python")), VENV_BIN, REPO / "jupyter_acp", CHP_BIN.resolve()]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(users)) as pool:
        checked = dict(zip(users, pool.map(_user_can_run_venv, users), strict=True))
    for user in users:
        ok, why = checked[user]
        if ok:
            continue
        blocked = _blocking_dirs(user, needed)
        acp_require("JUPYTER_ACP_REQUIRE_HUB", bool(blocked) and shutil.which("setfacl") is not None,
                    f"{user} cannot run {VENV_BIN / 'python'} ({why.strip()}); blocked: {blocked} "
                    "(setfacl, from Debian's acl package, lets the fixture grant search permission)")
        for path in blocked:
            subprocess.run(["setfacl", "-m", f"u:{user}:x", str(path)], check=True)
            granted.append((user, path))
        ok, why = _user_can_run_venv(user)
        assert ok, f"{user} still cannot run the venv's python after setfacl on {blocked}: {why}"
    if granted:
        print(f"hub fixture: granted search (x) ACLs: {[(u, str(p)) for u, p in granted]}")
    return granted


def revoke_traverse(granted: list[tuple[str, Path]]) -> None:
    for user, path in granted:
        subprocess.run(["setfacl", "-x", f"u:{user}", str(path)], check=False)


def kill_user_processes(uids: set[int], keep: int = 0) -> list[int]:
    """SIGKILL every process owned by ``uids`` (the test users: only the hub started them)."""
    killed = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == keep:
            continue
        try:
            if entry.stat().st_uid in uids:
                os.kill(int(entry.name), signal.SIGKILL)
                killed.append(int(entry.name))
        except (OSError, ProcessLookupError):
            pass
    return killed


# -- the hub ------------------------------------------------------------------------------------
@dataclass
class HubUser:
    name: str
    token: str
    uid: int
    home: Path


@dataclass
class Hub:
    url: str
    """The proxy's public URL, ``http://127.0.0.1:<port>/``: what browsers and clients use."""
    hub_api: str
    service_url: str | None
    """The service's own URL (``http://127.0.0.1:<port>/services/jupyter-acp/``), or None."""
    tmp: Path
    log: Path
    proc: subprocess.Popen[bytes]
    users: dict[str, HubUser]
    fake: Any
    service_config: Path | None
    site: Path
    """The servers' site config directory (world-readable; its scripts are run by agents)."""
    db_url: str | None = None
    startup: dict[str, float] = field(default_factory=dict)

    # -- HTTP helpers ---------------------------------------------------------------------------
    def request(self, method: str, url: str, token: str | None = None, body: Any = None,
                timeout: float = 60, **kwargs: Any) -> requests.Response:
        headers = kwargs.pop("headers", {})
        if token:
            headers["Authorization"] = f"token {token}"
        return requests.request(method, url, headers=headers, json=body, timeout=timeout,
                                allow_redirects=False, **kwargs)

    def hub(self, method: str, path: str, user: str, body: Any = None) -> requests.Response:
        return self.request(method, f"{self.hub_api}{path}", self.users[user].token, body)

    def server_url(self, user: str, server: str = "") -> str:
        return f"{self.url}user/{user}/" + (f"{server}/" if server else "")

    def acp(self, method: str, path: str, user: str, body: Any = None, *, server: str = "",
            owner: str | None = None, token: str | None = None, timeout: float = 60) -> requests.Response:
        """``/user/<owner>[/<server>]/api/acp/<path>`` through the proxy with ``user``'s token."""
        url = self.server_url(owner or user, server) + "api/acp/" + path
        return self.request(method, url, token or self.users[user].token, body, timeout=timeout)

    def service(self, method: str, path: str, user: str | None = None, body: Any = None, *,
                token: str | None = None) -> requests.Response:
        """The service's API through the proxy (``/services/jupyter-acp/<path>``)."""
        return self.request(method, f"{self.url}{SERVICE_PREFIX.lstrip('/')}{path}",
                            token or (self.users[user].token if user else None), body)

    # -- servers --------------------------------------------------------------------------------
    def start_server(self, user: str, server: str = "", timeout: float = START_TIMEOUT) -> float:
        """Start ``user``'s (named) server through the REST API; wait until jupyter-acp answers."""
        t0 = time.monotonic()
        path = f"users/{user}/servers/{server}" if server else f"users/{user}/server"
        r = self.hub("POST", path, user)
        assert r.status_code in (201, 202, 400), f"spawn {user}/{server}: {r.status_code} {r.text}"
        self.wait_ready(user, server, timeout)
        return time.monotonic() - t0

    def wait_ready(self, user: str, server: str = "", timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"the hub exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                model = self.hub("GET", f"users/{user}", user).json()
                if (model.get("servers", {}).get(server) or {}).get("ready"):
                    r = self.acp("GET", "agents", user, server=server, timeout=10)
                    if r.status_code == 200:
                        return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{user}'s server {server!r} not ready in {timeout} s:\n{self.tail()}")
            time.sleep(0.3)

    def stop_server(self, user: str, server: str = "", timeout: float = 60) -> None:
        path = f"users/{user}/servers/{server}" if server else f"users/{user}/server"
        r = self.hub("DELETE", path, user)
        assert r.status_code in (202, 204, 400, 404), f"stop {user}/{server}: {r.status_code} {r.text}"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            model = self.hub("GET", f"users/{user}", user).json()
            if server not in model.get("servers", {}):
                return
            time.sleep(0.3)
        raise AssertionError(f"{user}'s server {server!r} did not stop in {timeout} s")

    # -- kernels --------------------------------------------------------------------------------
    def execute(self, user: str, code: str | list[str], *, server: str = "", timeout: float = 120,
                kernel_id: str | None = None) -> list[dict[str, Any]]:
        """Run ``code`` (one cell, or several in order) in a kernel of ``user``'s server, started
        through the server's kernels API and driven over its channels WebSocket (what JupyterLab
        does). Returns the outputs per cell as ``{"text": ..., "error": ...}``; the kernel is shut
        down afterwards unless ``kernel_id`` was given."""
        import websocket  # websocket-client (jupyter_server's test deps)

        cells = [code] if isinstance(code, str) else code
        base = self.server_url(user, server)
        token = self.users[user].token
        own = kernel_id is None
        if own:
            r = self.request("POST", base + "api/kernels", token, {"name": "python3"})
            assert r.status_code == 201, f"start kernel: {r.status_code} {r.text}"
            kernel_id = r.json()["id"]
        ws = websocket.create_connection(
            base.replace("http://", "ws://") + f"api/kernels/{kernel_id}/channels",
            header=[f"Authorization: token {token}"], timeout=timeout)
        results = []
        try:
            for cell in cells:
                msg_id = uuid.uuid4().hex
                ws.send(json.dumps({
                    "header": {"msg_id": msg_id, "msg_type": "execute_request", "username": user,
                               "session": uuid.uuid4().hex, "version": "5.3", "date": ""},
                    "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
                    "content": {"code": cell, "silent": False, "store_history": True,
                                "user_expressions": {}, "allow_stdin": False, "stop_on_error": True},
                }))
                texts: list[str] = []
                error = None
                deadline = time.monotonic() + timeout
                while True:
                    assert time.monotonic() < deadline, f"cell did not finish in {timeout} s: {cell[:200]}"
                    msg = json.loads(ws.recv())
                    if msg.get("parent_header", {}).get("msg_id") != msg_id:
                        continue
                    kind, content = msg["msg_type"], msg["content"]
                    if kind == "stream":
                        texts.append(content["text"])
                    elif kind in ("execute_result", "display_data", "update_display_data"):
                        data = content.get("data", {})
                        texts.extend(str(v) for k, v in data.items() if k != "text/plain")
                        if "text/plain" in data and len(data) == 1:
                            texts.append(data["text/plain"])
                    elif kind == "error":
                        error = f"{content['ename']}: {content['evalue']}"
                    elif kind == "status" and content["execution_state"] == "idle":
                        break
                results.append({"text": "".join(texts), "error": error})
        finally:
            ws.close()
            if own:
                self.request("DELETE", base + f"api/kernels/{kernel_id}", token)
        return results

    def run_py(self, user: str, code: str, **kw: Any) -> str:
        """One cell in ``user``'s kernel; its text output (an error fails the test)."""
        out = self.execute(user, code, **kw)[0]
        assert out["error"] is None, f"{out['error']}\n{out['text']}"
        return out["text"]

    # -- processes ------------------------------------------------------------------------------
    def service_pid(self) -> int | None:
        """The hub-managed service's pid (a child of the hub running ``-m jupyter_acp.hub``)."""
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == self.proc.pid and b"jupyter_acp.hub" in cmd:
                return int(entry.name)
        return None

    def tail(self, chars: int = 6000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def _hub_config(tmp: Path, ports: dict[str, int], service_cmd: list[str] | None, service_env: dict[str, str],
                service_token: str, site: Path) -> str:
    venv_python = str(VENV_BIN / "python")
    service_url = f"http://127.0.0.1:{ports['service']}"
    services: list[dict[str, Any]] = []
    roles: list[dict[str, Any]] = [
        # the single-user server's own token: it mints gateway tokens and reads the quota
        {"name": "server", "scopes": ["users:activity!user", "access:servers!server", "custom:acp:use"]},
        # a user's tokens (and her browser): her servers, her quota and usage
        {"name": "user", "scopes": ["self", "custom:acp:use"]},
        {"name": "acp-usage-admin", "scopes": ["custom:acp-usage:read", "custom:acp:use"], "users": [ADMIN]},
    ]
    if service_cmd:
        services.append({
            "name": SERVICE, "url": service_url, "command": service_cmd, "environment": service_env,
            "api_token": service_token, "oauth_no_confirm": True, "display": True,
            "oauth_client_allowed_scopes": ["custom:acp-usage:read"],
        })
        # users may log in to the service's pages (the hub's OAuth); what they see there is the
        # service's decision (the admin page needs custom:acp-usage:read)
        roles[1]["scopes"].append(f"access:services!service={SERVICE}")
        roles.append({"name": "jupyter-acp-service", "services": [SERVICE],
                      "scopes": ["read:users:groups", "read:users:name", "list:users", "read:groups",
                                 "list:groups"]})
    cfg = {
        "ip": "127.0.0.1", "port": ports["proxy"], "hub_ip": "127.0.0.1", "hub_port": ports["hub"],
        "db": f"sqlite:///{tmp / 'jupyterhub.sqlite'}", "cookie": str(tmp / "jupyterhub_cookie_secret"),
        "pid": str(tmp / "jupyterhub.pid"), "proxy_api": f"http://127.0.0.1:{ports['proxy_api']}",
        "chp": str(CHP_BIN / "configurable-http-proxy"), "users": [*USERS, ADMIN], "admin": ADMIN,
        "password": PASSWORD, "singleuser": str(VENV_BIN / "jupyterhub-singleuser"),
        "path": f"{VENV_BIN}:{AGENTS_BIN}:/usr/local/bin:/usr/bin:/bin", "services": services, "roles": roles,
        "service_url": f"{service_url}{SERVICE_PREFIX}" if service_cmd else "", "group": GROUP,
        "python": venv_python, "site": str(site),
    }
    return textwrap.dedent(f"""\
        # written by tests/hub.py
        import json
        cfg = json.loads({json.dumps(json.dumps(cfg))})
        c = get_config()  # noqa
        c.JupyterHub.ip = cfg["ip"]
        c.JupyterHub.port = cfg["port"]
        c.JupyterHub.hub_ip = cfg["hub_ip"]
        c.JupyterHub.hub_port = cfg["hub_port"]
        c.JupyterHub.db_url = cfg["db"]
        c.JupyterHub.cookie_secret_file = cfg["cookie"]
        c.JupyterHub.pid_file = cfg["pid"]
        c.JupyterHub.log_level = "INFO"
        c.JupyterHub.allow_named_servers = True
        c.JupyterHub.named_server_limit_per_user = 3
        c.JupyterHub.cleanup_servers = True
        c.JupyterHub.cleanup_proxy = True
        c.ConfigurableHTTPProxy.api_url = cfg["proxy_api"]
        c.ConfigurableHTTPProxy.command = [cfg["chp"]]
        c.ConfigurableHTTPProxy.should_start = True
        c.JupyterHub.authenticator_class = "dummy"
        c.DummyAuthenticator.password = cfg["password"]
        c.Authenticator.allowed_users = set(cfg["users"])
        c.Authenticator.admin_users = {{cfg["admin"]}}
        c.JupyterHub.spawner_class = "localprocess"
        c.Spawner.cmd = [cfg["singleuser"]]
        c.Spawner.args = ["--ServerApp.log_level=INFO"]
        c.Spawner.default_url = "/lab"
        c.Spawner.http_timeout = 90
        c.Spawner.start_timeout = 120
        c.Spawner.environment = {{"PATH": cfg["path"], "LANG": "C.UTF-8", "JUPYTER_CONFIG_PATH": cfg["site"]}}
        c.JupyterHub.tornado_settings = {{"slow_spawn_timeout": 0}}  # POST .../server answers at once
        if cfg["service_url"]:
            c.Spawner.environment["JUPYTER_ACP_HUB_SERVICE_URL"] = cfg["service_url"]
        c.JupyterHub.services = cfg["services"]
        c.JupyterHub.custom_scopes = {{
            "custom:acp:use": {{"description": "use jupyter-acp's LLM gateway; own quota and usage"}},
            "custom:acp-usage:read": {{"description": "every user's jupyter-acp usage (the admin page)"}},
        }}
        c.JupyterHub.load_roles = cfg["roles"]
        c.JupyterHub.load_groups = {{cfg["group"]: {{"users": ["acp-bob"]}}}}
        """)


def _wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"jupyterhub exited with {proc.returncode}:\n{log.read_text()[-6000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:  # the proxy answers 404 until the hub's route
                return
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"jupyterhub did not answer at {url} in {timeout} s:\n"
                                 f"{log.read_text()[-6000:]}")
        time.sleep(0.2)


def user_token(hub_api: str, user: str) -> str:
    """A token the user makes for herself with her password (like the hub's token page)."""
    r = requests.post(f"{hub_api}users/{user}/tokens", timeout=30,
                      json={"auth": {"username": user, "password": PASSWORD}, "note": "acp e2e tests",
                            "expires_in": 3600})
    assert r.status_code in (200, 201), f"token for {user}: {r.status_code} {r.text}"
    return r.json()["token"]


@contextlib.contextmanager
def running_hub(tmp: Path, *, service_config: str = "", site_config: str = "",
                site_files: dict[str, str] | None = None, start: tuple[str, ...] = USERS,
                fake: Any = None) -> Iterator[Hub]:
    """The whole rig. ``service_config`` is the body of the service's config file (Python, ``c.``:
    root only); ``site_config`` the single-user servers' site config (``jupyter_server_config.py``
    in a world-readable directory on their JUPYTER_CONFIG_PATH, like ``/etc/jupyter``: it holds no
    key), ``site_files`` more files for that directory (name → text)."""
    require_hub()
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    os.chmod(tmp, 0o700)
    hubdir = tmp / "hub"
    hubdir.mkdir(mode=0o700)
    pws = {name: ensure_user(name) for name in (*USERS, ADMIN)}
    granted = grant_traverse(list(pws))
    timings["users"] = time.monotonic() - t0
    for pw in pws.values():  # a fresh home: a previous run's files (ledger, config, history) must not leak
        for leftover in Path(pw.pw_dir).iterdir():
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
    ports = {k: free_port() for k in ("proxy", "proxy_api", "hub", "service")}
    service_cmd: list[str] | None = None
    service_env: dict[str, str] = {}
    service_cfg_path: Path | None = None
    if service_available():
        secret_dir = tmp / "service"
        secret_dir.mkdir(mode=0o700)
        service_cfg_path = secret_dir / "jupyter_acp_hub_config.py"
        fd = os.open(service_cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("# the jupyter-acp hub service's config: root only (0600), never readable by users\n")
            f.write(service_config)
        service_cmd = [str(VENV_BIN / "python"), "-m", "jupyter_acp.hub", f"--config={service_cfg_path}"]
        service_env = {"JUPYTER_ACP_HUB_CONFIG": str(service_cfg_path), "PATH": f"{VENV_BIN}:/usr/bin:/bin"}
    service_token = secrets.token_hex(24)
    site = Path(tempfile.mkdtemp(prefix="acp-hub-site-"))  # outside tmp (0700): the users read it
    site.chmod(0o755)
    for name, text in {"jupyter_server_config.py": site_config, **(site_files or {})}.items():
        (site / name).write_text(text)
        (site / name).chmod(0o644)
    (hubdir / "jupyterhub_config.py").write_text(
        _hub_config(hubdir, ports, service_cmd, service_env, service_token, site))
    log = tmp / "hub.log"
    env = {"PATH": f"{CHP_BIN}:{VENV_BIN}:/usr/local/bin:/usr/bin:/bin", "HOME": str(hubdir),
           "LANG": "C.UTF-8", "CONFIGPROXY_AUTH_TOKEN": secrets.token_hex(24)}
    with log.open("wb") as out:
        proc = subprocess.Popen([str(VENV_BIN / "jupyterhub"), "-f", str(hubdir / "jupyterhub_config.py")],
                                cwd=hubdir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    hub_api = f"http://127.0.0.1:{ports['proxy']}/hub/api/"
    hub: Hub | None = None
    uids = {pw.pw_uid for pw in pws.values()}
    try:
        _wait_http(f"{hub_api}", proc, log)
        timings["hub"] = time.monotonic() - t0 - timings["users"]
        users = {name: HubUser(name, user_token(hub_api, name), pw.pw_uid, Path(pw.pw_dir))
                 for name, pw in pws.items()}
        hub = Hub(url=f"http://127.0.0.1:{ports['proxy']}/", hub_api=hub_api,
                  service_url=f"http://127.0.0.1:{ports['service']}{SERVICE_PREFIX}" if service_cmd else None,
                  tmp=tmp, log=log, proc=proc, users=users, fake=fake, service_config=service_cfg_path,
                  site=site)
        t1 = time.monotonic()
        for name in start:  # spawn them all, then wait: the servers start side by side
            r = hub.hub("POST", f"users/{name}/server", name)
            assert r.status_code in (201, 202), f"spawn {name}: {r.status_code} {r.text}\n{hub.tail()}"
        for name in start:
            hub.wait_ready(name)
        timings["servers"] = time.monotonic() - t1
        timings["total"] = time.monotonic() - t0
        hub.startup = timings
        print("hub fixture started in {total:.1f} s (users {users:.1f} s, hub+proxy {hub:.1f} s, "
              "servers {servers:.1f} s)".format(**timings))
        yield hub
    finally:
        stop_hub(proc, uids, hubdir, str(tmp))
        revoke_traverse(granted)
        shutil.rmtree(site, ignore_errors=True)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def stop_hub(proc: subprocess.Popen[bytes], uids: set[int], hubdir: Path, marker: str) -> None:
    """SIGTERM the hub (it stops the servers, the proxy and the service), then end what it could
    not: the proxy (its own session; the hub wrote its pid), the service (its command line names
    our temporary directory, ``marker``) and any process of the test users."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    strays = []
    with contextlib.suppress(OSError, ValueError):
        pid = int((hubdir / "jupyterhub-proxy.pid").read_text().strip())
        if b"configurable-http-proxy" in _cmdline(pid):
            strays.append(pid)
    strays += [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()
               and int(e.name) != os.getpid() and marker.encode() in _cmdline(int(e.name))]
    for pid in strays:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if strays:
        print(f"hub fixture: killed the hub's stray proxy/service processes {strays}")
    killed = kill_user_processes(uids)
    if killed:
        print(f"hub fixture: killed {len(killed)} stray processes of the test users: {killed}")
