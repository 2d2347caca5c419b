"""Every notebook in notebooks/ runs top to bottom in a real kernel (nbclient) against a real
Jupyter server with the extension, found by the kernel the way it finds its own server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
from kernel_server import server_for_kernels
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    with server_for_kernels(tmp_path_factory.mktemp("nb")) as info:
        yield info


def run(path: Path, server: dict, monkeypatch: pytest.MonkeyPatch) -> str:
    """Execute the notebook; returns every output's text, in order."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(server["runtime"]))
    for name in ("JUPYTER_ACP_SERVER_URL", "JUPYTER_ACP_TOKEN", "JUPYTERHUB_API_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=120,
                   resources={"metadata": {"path": str(server["root"])}}).execute()
    texts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                raise AssertionError(f"{path.name}: {output['ename']}: {output['evalue']}")
            texts.append(output.get("text", ""))
            for value in output.get("data", {}).values():
                texts.append(value if isinstance(value, str) else json.dumps(value))
    return "\n".join(texts)


def test_there_are_the_three_notebooks() -> None:
    names = ["01-quickstart.ipynb", "02-magics.ipynb", "03-admin-and-usage.ipynb"]
    assert [p.name for p in NOTEBOOKS] == names


def test_quickstart(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(NOTEBOOKS[0], server, monkeypatch)
    assert "Demo agent (no LLM)" in out and "heard 6 words: Hello agent, what can you do?" in out
    assert "Hello from the quick start notebook" in out  # the file the agent wrote, read back
    assert "acp: allow" in out and "end_turn · tokens:" in out
    assert "| total tokens |" in out


def test_magics_notebook(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(NOTEBOOKS[1], server, monkeypatch)
    assert "mode default (available: default, yolo)" in out and "mode yolo" in out
    assert (server["root"] / "notes" / "magics.txt").read_text().startswith("written in yolo mode")
    assert "<svg" in out and "tokens per turn" in out
    assert "heard 4 words: hello from the panel" in out and "panel tokens:" in out
    assert "acp: No session 'no-such-session' of yours" in out
    assert "acp: stopped session" in out


def test_admin_and_usage_notebook(server: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    out = run(NOTEBOOKS[2], server, monkeypatch)
    assert "tokens today (no daily quota)" in out and "| day (UTC) |" in out
    assert "total tokens:" in out and "sandbox local: available" in out
