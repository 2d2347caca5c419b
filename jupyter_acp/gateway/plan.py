"""How one session's agent is launched with respect to its LLM: through the gateway, or directly.

``plan_launch`` decides it from the agent spec, the merged credentials and the admin's gateway
settings, and returns what the session manager puts into the sandbox spec. Through the gateway
the agent's environment carries only a per-session dummy key and a loopback ``base_url`` (set by
the relay once it has a port); the real key and endpoint stay in the server's memory.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from ..agents import AgentSpec
from .server import DEFAULT_UPSTREAMS, GatewayRoute, LlmGateway, QuotaCallback, UsageCallback


@dataclass
class Launch:
    argv: list[str]
    credentials: dict[str, str]
    """Credentials the agent may see (mapped to its env by ``spec.credentials_env``)."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment (the dummy key)."""
    ro_paths: list[str] = field(default_factory=list)
    rw_paths: list[str] = field(default_factory=list)
    route: GatewayRoute | None = None
    gateway_dir: str | None = None
    """The host directory of the route's socket (``SandboxSpec.gateway_dir``)."""


def uses_gateway(gateway: LlmGateway, spec: AgentSpec, creds: dict[str, str]) -> bool:
    """Whether this session's LLM traffic goes through the gateway (see ``LlmGateway.enabled``)."""
    env = spec.credential_env
    return bool(gateway.enabled and spec.llm_api and not spec.url and creds.get("api_key")
                and env.get("api_key") and env.get("base_url"))


def plan_launch(gateway: LlmGateway, spec: AgentSpec, creds: dict[str, str], admin: dict[str, str], *,
                session_id: str, user: str, on_usage: UsageCallback,
                check_quota: QuotaCallback, on_refused: Callable[[str], None] | None = None,
                gateway_target: str | None = None) -> Launch:
    """The launch of ``spec``; opens a gateway route when one is used (the caller closes it).
    ``gateway_target``: where the sandbox shows the route's socket directory (the backend's
    ``gateway_target``; None: at its host path, and then it is one of the writable paths)."""
    ro_paths = spec.runtime_ro_paths()
    if not uses_gateway(gateway, spec, creds):
        argv = spec.argv(creds.get("model"), creds.get("base_url") or spec.default_base_url)
        return Launch(argv=argv, credentials=dict(creds), ro_paths=ro_paths)
    assert spec.llm_api is not None
    upstream = creds.get("base_url") or DEFAULT_UPSTREAMS[spec.llm_api]
    trusted = [u for u in (admin.get("base_url"), DEFAULT_UPSTREAMS[spec.llm_api]) if u]
    gateway.check_endpoint(upstream, trusted)
    route = gateway.open_route(session_id=session_id, user=user, api=spec.llm_api, upstream=upstream,
                               api_key=creds["api_key"], on_usage=on_usage, check_quota=check_quota,
                               on_refused=on_refused)
    visible = {k: v for k, v in creds.items() if k not in ("api_key", "base_url")}
    env = {spec.credential_env["api_key"]: route.dummy_key}
    argv = spec.argv(creds.get("model"), route.agent_base_url)  # the relay fills in {port}
    argv = gateway.relay_argv(route, argv, {spec.credential_env["base_url"]: route.agent_base_url},
                              socket_dir=gateway_target)
    relay_ro, relay_rw = gateway.sandbox_paths(route)
    return Launch(argv=argv, credentials=visible, env=env, ro_paths=[*ro_paths, *relay_ro],
                  rw_paths=relay_rw if gateway_target is None else [], route=route,
                  gateway_dir=os.path.dirname(route.socket_path))
