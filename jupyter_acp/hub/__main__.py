"""``python -m jupyter_acp.hub``: run the jupyter-acp JupyterHub service (see ``app``)."""

from __future__ import annotations

from .app import main

if __name__ == "__main__":
    main()
