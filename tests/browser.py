"""What the browser tests share: a real ``jupyter lab`` in a subprocess, Chromium, screenshots.

The server is ``jupyter lab`` in a subprocess (so this is the extension exactly as installed by
``pip install``: the labextension built by hatch-jupyter-builder, the server extension enabled
on the command line). Its config, data and runtime directories are private to the test, and
stay the same across ``stop()`` / ``start()``: a restarted server finds what the first one
stored (the ledger and the sessions live in the data directory), on the same port and token, so
a page can simply be reloaded.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from conftest import acp_require

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic",
]
LABEXTENSION = Path(__file__).resolve().parent.parent / "jupyter_acp" / "labextension"
STARTUP_TIMEOUT = 90.0  # a cold JupyterLab on 2 busy cores can take a while
UI_TIMEOUT = 60_000  # ms, for waits in the page


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def require_lab() -> None:
    """Skip (or fail under JUPYTER_ACP_REQUIRE_BROWSER=1) without JupyterLab or the built extension."""
    acp_require("JUPYTER_ACP_REQUIRE_BROWSER", shutil.which("jupyter-lab") is not None or
                (Path(sys.executable).parent / "jupyter-lab").exists(),
                "JupyterLab is not installed (pip install -e '.[lab]')")
    acp_require("JUPYTER_ACP_REQUIRE_BROWSER", (LABEXTENSION / "package.json").exists(),
                f"the labextension is not built ({LABEXTENSION}); pip install -e . builds it")


def require_playwright() -> Any:
    """``sync_playwright``, after checking Playwright and Chromium are there."""
    sync_playwright: Any = None
    with suppress(ImportError):
        from playwright.sync_api import sync_playwright
    acp_require("JUPYTER_ACP_REQUIRE_BROWSER", sync_playwright is not None,
                "playwright is not installed (pip install playwright)")
    acp_require("JUPYTER_ACP_REQUIRE_BROWSER", os.access(CHROMIUM, os.X_OK),
                f"{CHROMIUM} is missing (apt-get install chromium)")
    return sync_playwright


class LabServer:
    """A JupyterLab with jupyter-acp on a free port, in directories under ``base``."""

    def __init__(self, base: Path, extra_args: list[str] | None = None) -> None:
        require_lab()
        self.base = base
        self.root = base / "root"
        self.root.mkdir()
        # serve this checkout's build, whatever copy pip installed (like `labextension develop`):
        # JUPYTER_PATH comes before every other data directory
        jupyter_path = base / "jupyter-path"
        (jupyter_path / "labextensions").mkdir(parents=True)
        (jupyter_path / "labextensions" / "jupyter-acp").symlink_to(LABEXTENSION, target_is_directory=True)
        self.env = {
            **os.environ,
            "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_DATA_DIR": str(base / "data"),
            "JUPYTER_PATH": os.pathsep.join([str(jupyter_path),
                                             *filter(None, [os.environ.get("JUPYTER_PATH")])]),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"),
            "JUPYTERLAB_SETTINGS_DIR": str(base / "lab-settings"),
            "JUPYTERLAB_WORKSPACES_DIR": str(base / "lab-workspaces"),
        }
        self.port, self.token = free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = base / "jupyter-lab.log"
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def info(self) -> dict[str, str]:
        return {"url": self.url, "token": self.token, "root": str(self.root), "log": str(self.log)}

    def start(self) -> None:
        cmd = [
            str(Path(sys.executable).parent / "jupyter-lab"), "--no-browser", f"--port={self.port}",
            "--ServerApp.port_retries=0",  # a restart must come back on the same port (or fail)
            "--ip=127.0.0.1", f"--ServerApp.token={self.token}", f"--ServerApp.root_dir={self.root}",
            "--ServerApp.jpserver_extensions={'jupyter_acp': True}",
            "--UserSessionManager.sandbox=local",  # the demo agent; sandboxes have their own tests
            "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
            *self.extra_args,
        ]
        if os.geteuid() == 0:
            cmd.append("--allow-root")
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"\n===== start {self.starts} =====\n".encode())
            out.flush()
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         cwd=self.root, start_new_session=True)
        began = time.monotonic()
        self._wait(f"{self.url}api/status?token={self.token}")
        print(f"jupyter lab (start {self.starts}) answered in {time.monotonic() - began:.1f} s")

    def stop(self) -> None:
        """Stop the server as an admin would (SIGTERM: a clean shutdown), and wait for it.

        The end of its log is printed (pytest shows it only when the test fails)."""
        print(f"----- the end of {self.log} -----\n{self.tail(8000)}")
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        began = time.monotonic()
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            print("jupyter lab did not stop within 20 s of SIGTERM: killed")
            proc.kill()
            proc.wait()
        print(f"jupyter lab stopped in {time.monotonic() - began:.1f} s")

    def _wait(self, url: str) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"jupyter lab did not answer within {STARTUP_TIMEOUT} s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:]

    def api(self, path: str, method: str = "GET", body: Any = None) -> Any:
        return api(self.info(), path, method, body)


def api(server: dict[str, str], path: str, method: str = "GET", body: Any = None) -> Any:
    """A call to ``{url}api/acp/{path}`` with the server's token; the JSON answer (None for 204)."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"Authorization": f"token {server['token']}"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    req = urllib.request.Request(server["url"] + "api/acp/" + path, method=method, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=30) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


@contextmanager
def lab(base: Path) -> Iterator[LabServer]:
    """A started LabServer, stopped at the end."""
    server = LabServer(base)
    try:
        server.start()
        yield server
    finally:
        server.stop()


def tokens(text: str) -> int:
    """The number in a counter like "1,234 tokens" or "Today: 12 tokens of 1,000"."""
    match = re.search(r"([\d,]+) tokens?", text)
    assert match, f"no token count in {text!r}"
    return int(match.group(1).replace(",", ""))


class Screenshots:
    """Screenshots of each step, under ``base/screenshots`` (their paths are printed)."""

    def __init__(self, base: Path) -> None:
        self.dir = base / "screenshots"
        self.dir.mkdir()

    def __call__(self, page: Any, name: str) -> None:
        path = self.dir / f"{name}.png"
        page.screenshot(path=str(path))
        print(f"screenshot: {path}")


class PageTrace:
    """What the page asked of the server and said on its console, printed when a test fails.

    A browser test that times out shows only the page it gave up on; where its time went (a
    request the server never answered, one that took a minute, an error in a plugin) is what the
    next reader of a CI log needs, so it is kept as the page runs."""

    def __init__(self, page: Any) -> None:
        self.started = time.monotonic()
        self.pending: dict[Any, float] = {}
        self.finished: list[tuple[float, float, str]] = []  # (seconds, at, "METHOD url status")
        self.console: list[str] = []
        page.on("request", lambda r: self.pending.__setitem__(r, time.monotonic()))
        page.on("requestfinished", lambda r: self._done(r, "done"))
        page.on("requestfailed", lambda r: self._done(r, f"failed: {r.failure}"))
        page.on("console", lambda m: self.console.append(f"{self._at():7.1f}s {m.type}: {m.text[:300]}"))

    def _at(self) -> float:
        return time.monotonic() - self.started

    @staticmethod
    def _name(request: Any) -> str:
        return f"{request.method} {re.sub(r'token=[0-9a-f]+', 'token=…', request.url)}"

    def _done(self, request: Any, how: str) -> None:
        began = self.pending.pop(request, None)
        if began is not None:
            took = time.monotonic() - began
            self.finished.append((took, began - self.started, f"{self._name(request)} {how}"))

    def report(self) -> str:
        now = time.monotonic()
        lines = [f"page trace, {self._at():.1f} s after the browser started:", "requests in flight:"]
        lines += [f"  {now - began:7.1f}s  (from {began - self.started:.1f}s) {self._name(r)}"
                  for r, began in sorted(self.pending.items(), key=lambda kv: kv[1])] or ["  none"]
        lines.append("slowest finished requests:")
        lines += [f"  {took:7.1f}s  (from {at:.1f}s) {what}"
                  for took, at, what in sorted(self.finished, reverse=True)[:15]] or ["  none"]
        lines.append("console (last 30):")
        lines += [f"  {line}" for line in self.console[-30:]] or ["  none"]
        return "\n".join(lines)


@contextmanager
def chromium(pw: Any) -> Iterator[tuple[Any, list[str]]]:
    """A page in a fresh headless Chromium (1400 by 900) and the list of errors thrown in it.

    When the test fails inside, the page's trace (``PageTrace``) is printed."""
    browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    # every action (a click waits for its element to be stable) gets the patience of the page waits:
    # Playwright's 30 s default ran out once on 2 loaded cores, while JupyterLab was still starting
    context.set_default_timeout(UI_TIMEOUT)
    try:
        page = context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        trace = PageTrace(page)
        try:
            yield page, errors
        except BaseException:
            print(trace.report())
            print("errors thrown in the page:", errors or "none")
            raise
    finally:
        context.close()
        browser.close()


def open_panel(page: Any, server: dict[str, str] | None = None, timeout: int = UI_TIMEOUT) -> Any:
    """Load JupyterLab (when ``server`` is given), show the agents sidebar; its locator."""
    from playwright.sync_api import expect

    if server is not None:
        page.goto(f"{server['url']}lab?token={server['token']}")
    tab = page.locator('.jp-SideBar [data-id="jupyter-acp-panel"]')
    expect(tab).to_be_visible(timeout=timeout)
    # the splash screen covers the page until JupyterLab has restored its layout (which may
    # switch the sidebar's current tab itself): only then is the tab's state worth reading
    expect(page.locator("#jupyterlab-splash")).to_have_count(0, timeout=timeout)
    # a click on the current tab would collapse the sidebar
    if "lm-mod-current" not in (tab.get_attribute("class") or ""):
        tab.click()
    panel = page.locator("#jupyter-acp-panel")
    expect(panel).to_be_visible()
    return panel


def kernel_ready(server: LabServer, path: str, timeout: float = 90) -> None:
    """Wait until JupyterLab has an idle kernel for the notebook ``path`` (before a cell runs in
    it, or an agent's ``run_cell``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        req = urllib.request.Request(f"{server.url}api/sessions",
                                     headers={"Authorization": f"token {server.token}"})
        with urllib.request.urlopen(req, timeout=10) as r:
            sessions = json.loads(r.read())
        if any(s.get("path") == path and (s.get("kernel") or {}).get("execution_state") == "idle"
               for s in sessions):
            return
        time.sleep(0.5)
    raise AssertionError(f"no idle kernel for {path}:\n{server.tail()}")
