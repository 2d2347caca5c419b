"""Permission requests of one session: asked of the user, or decided by the admin's policy.

An agent asks before it acts (``session/request_permission``). Under the ``ask`` policy the
request waits for the user's answer (a ``permission:request`` event, answered through the API)
and is rejected after ``permission_timeout``; under ``allow`` / ``deny`` it is decided at once.
The agent is hostile, so what it can make wait is bounded: at most ``max_pending`` requests at
once, a bounded number of options of bounded length; anything past that is answered
"cancelled" at once, with one log line per burst.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from acp import schema

from .errors import BadRequest, PermissionNotFound

log = logging.getLogger("jupyter_acp.session")

#: Options one permission request may offer (ACP agents offer 2 to 4); more are refused.
MAX_PERMISSION_OPTIONS = 16
#: ... and the longest id or name of one of them (kept while the request waits).
MAX_OPTION_CHARS = 4096


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


@dataclass
class PendingPermission:
    request_id: str
    tool_call: dict[str, Any]
    options: list[schema.PermissionOption]
    future: asyncio.Future[schema.RequestPermissionResponse]

    def public(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "tool_call": self.tool_call,
                "options": [_dump(o) for o in self.options]}


def choose(options: list[schema.PermissionOption], *, allow: bool) -> schema.RequestPermissionResponse:
    """The allowing (or rejecting) option, a once-only one first: an "always" answer given for
    the user would make the agent stop asking (Qwen Code lists its "always" options first, and
    "always for this project" writes an allow rule into the user's workspace); "cancelled"
    when there is none."""
    kinds = ("allow_once", "allow_always") if allow else ("reject_once", "reject_always")
    for kind in kinds:
        for option in options:
            if option.kind == kind:
                return schema.RequestPermissionResponse(
                    outcome=schema.AllowedOutcome(outcome="selected", option_id=option.option_id))
    return schema.RequestPermissionResponse(outcome=schema.DeniedOutcome(outcome="cancelled"))


CANCELLED = schema.RequestPermissionResponse(outcome=schema.DeniedOutcome(outcome="cancelled"))


class PermissionDesk:
    """The pending permission requests of one session and the rules that answer them."""

    def __init__(self, *, policy: str, timeout: float, max_pending: int,
                 emit: Callable[[str, dict[str, Any]], dict[str, Any]],
                 audit: Callable[..., None], label: str = "") -> None:
        self.policy, self.timeout, self.max_pending = policy, timeout, max_pending
        self._emit, self._audit, self.label = emit, audit, label
        self.pending: dict[str, PendingPermission] = {}
        self._refused = 0

    async def ask(self, tool_call: schema.ToolCallUpdate, options: list[schema.PermissionOption],
                  *, always_ask: bool = False) -> schema.RequestPermissionResponse:
        """The answer to one request of the agent: the policy's, the user's, or a rejection.
        ``always_ask``: the user is asked even under the ``allow`` policy (a run of code in the
        user's own kernel, outside the sandbox); ``deny`` still refuses at once."""
        if self.policy == "deny" or (self.policy == "allow" and not always_ask):
            response = choose(options, allow=self.policy == "allow")
            self._audit("permission", decision=self.policy, by="policy", tool_call=tool_call.title)
            return response
        refusal = self._refusal(options)
        if refusal:
            self._refused += 1
            if self._refused == 1:  # one line per burst, not one per request
                log.warning("Session %s: permission request refused at once (%s)", self.label, refusal)
            return CANCELLED
        self._refused = 0
        request_id = uuid.uuid4().hex[:16]
        future: asyncio.Future[schema.RequestPermissionResponse] = asyncio.get_running_loop().create_future()
        pending = PendingPermission(request_id, _dump(tool_call), options, future)
        self.pending[request_id] = pending
        event = self._emit("permission_request", pending.public())
        # keep what was shown (cut to max_event_bytes), not the agent's original
        pending.tool_call = event["data"].get("tool_call") or {}
        try:
            # (not wait_for(shield(...)): on Python 3.11 wait_for swallows a cancellation that
            # comes while the answer arrives, and the SDK then waits forever to send the reply,
            # which hung the session's stop)
            await asyncio.wait({future}, timeout=self.timeout)
            if not future.done():
                self._resolve(request_id, choose(options, allow=False), by="timeout")
            return future.result()
        finally:
            self.pending.pop(request_id, None)

    def _refusal(self, options: list[schema.PermissionOption]) -> str:
        """Why a request is answered "cancelled" without asking ("" if it is not)."""
        if len(self.pending) >= self.max_pending:
            return f"{self.max_pending} already wait for the user (max_pending_permissions)"
        if len(options) > MAX_PERMISSION_OPTIONS:
            return f"{len(options)} options, more than {MAX_PERMISSION_OPTIONS}"
        if any(len(o.option_id) > MAX_OPTION_CHARS or len(o.name) > MAX_OPTION_CHARS for o in options):
            return f"an option's id or name is longer than {MAX_OPTION_CHARS} characters"
        return ""

    def answer(self, request_id: str, option_id: str | None) -> None:
        """The user's answer: an option id, or None to dismiss (reject)."""
        pending = self.pending.get(request_id)
        if pending is None or pending.future.done():
            raise PermissionNotFound(f"No pending permission request {request_id!r}")
        if option_id is None:
            response = choose(pending.options, allow=False)
        else:
            if option_id not in {o.option_id for o in pending.options}:
                valid = ", ".join(o.option_id for o in pending.options)
                raise BadRequest(f"Unknown option {option_id!r}; choose one of: {valid}")
            response = schema.RequestPermissionResponse(
                outcome=schema.AllowedOutcome(outcome="selected", option_id=option_id))
        self._resolve(request_id, response, by="user")

    def _resolve(self, request_id: str, response: schema.RequestPermissionResponse, *, by: str) -> None:
        pending = self.pending.get(request_id)
        if pending is None or pending.future.done():
            return
        pending.future.set_result(response)
        outcome = response.outcome
        option_id = getattr(outcome, "option_id", None)
        self._emit("permission_resolved", {"request_id": request_id, "outcome": outcome.outcome,
                                           "option_id": option_id, "by": by})
        self._audit("permission", request_id=request_id, decision=option_id or outcome.outcome, by=by,
                    tool_call=pending.tool_call.get("title"))

    def cancel_all(self) -> None:
        """Reject every waiting request (the turn was cancelled or the session stops)."""
        for request_id in list(self.pending):
            self._resolve(request_id, CANCELLED, by="cancel")
