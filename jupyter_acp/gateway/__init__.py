"""The LLM gateway: how an agent in a sandbox without network reaches its LLM (see ``server``).

``server.LlmGateway`` serves one unix socket per session in the Jupyter server process,
``relay.py`` bridges it to ``127.0.0.1:<port>`` inside the sandbox, ``meter.UsageMeter`` reads
the usage every response bills.
"""

from __future__ import annotations

from .meter import APIS, UsageMeter
from .server import DEFAULT_UPSTREAMS, GatewayRoute, LlmGateway

__all__ = ["APIS", "DEFAULT_UPSTREAMS", "GatewayRoute", "LlmGateway", "UsageMeter"]
