"""The jupyter-acp JupyterHub service: the admin's side of a hub deployment (issue 16).

Under JupyterHub each single-user server runs as its user, so whatever it holds the user holds.
This service runs as the hub's account instead and holds the real LLM keys, the LLM gateway
every session's traffic goes through (metered, held to the quota), the usage ledger, the quotas
per user and per hub group, the admin page and a REST API. Servers in hub mode get a per-session
gateway token from it (``POST api/gateway-tokens``, with the user's own hub token).

* ``app`` — ``AcpHub``, the traitlets application (``jupyter-acp-hub``, ``python -m jupyter_acp.hub``);
* ``api`` — the REST API; ``admin`` — the admin page; ``gateway`` — the LLM proxy;
* ``tokens`` — gateway tokens (HMAC-signed, stateless); ``policy`` — credentials and quotas;
* ``reports`` — usage sums for the API, the page and CSV.
"""

from __future__ import annotations

from .app import AcpHub, main

__all__ = ["AcpHub", "main"]
