"""A real ``jupyter server`` with the extension and Jupyter's own token identity, as a subprocess,
and a runtime directory where a kernel started by this test process finds it (``jpserver-<pid>.json``
for ``JPY_PARENT_PID`` = this process, which is what jupyter_client gives the kernels it starts)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from jupyter_acp.testing import stop_process

TOKEN = "kernel-test-token"


@contextlib.contextmanager
def server_for_kernels(tmp: Path, *extra: str, sandbox: str = "local") -> Iterator[dict]:
    """Yields ``{url, root, runtime, log}``; the kernel-side discovery file is written."""
    root, runtime = tmp / "root", tmp / "kernel-runtime"
    root.mkdir(parents=True, exist_ok=True)
    runtime.mkdir(exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JUPYTER_RUNTIME_DIR": str(tmp / "server-runtime"),
           "JUPYTER_DATA_DIR": str(tmp / "data")}
    cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", f"--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.root_dir={root}", "--ServerApp.jpserver_extensions={'jupyter_acp': True}",
           f"--IdentityProvider.token={TOKEN}", f"--UserSessionManager.sandbox={sandbox}",
           f"--UsageLedger.db_url=sqlite:///{tmp / 'usage.sqlite'}", "--ServerApp.log_level=WARN",
           f"--UserSessionManager.agent_home_dir={tmp / 'homes'}", *extra,
           *(["--allow-root"] if os.geteuid() == 0 else [])]
    log_path = tmp / "server.log"
    with open(log_path, "a") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 60
    while True:
        try:
            req = urllib.request.Request(url + "api/acp/agents", headers={"Authorization": f"token {TOKEN}"})
            urllib.request.urlopen(req, timeout=2).read()
            break
        except Exception:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"the server did not start:\n{log_path.read_text()[-3000:]}") from None
            time.sleep(0.2)
    info = {"url": url, "base_url": "/", "token": TOKEN, "pid": proc.pid, "root_dir": str(root)}
    (runtime / f"jpserver-{os.getpid()}.json").write_text(json.dumps(info))
    try:
        yield {"url": url, "root": root, "runtime": runtime, "log": log_path}
    finally:
        stop_process(proc)
