"""Ending a turn whose LLM requests the gateway refused for quota (``AgentSession.quota_refused``).

Agents retry a 429 whatever it says (Qwen Code for minutes on end, Gemini CLI for about 3.5
minutes), so a turn over the quota would stay busy. The first refusal of a turn keeps its
message for the turn's one ``error`` event (emitted just before its ``turn_end``, and in its
``TurnResult``) and cancels the turn at the agent (ACP ``session/cancel``) at once; a turn the
agent has not ended ``AgentSession.QUOTA_CANCEL_GRACE`` s later is ended on our side (stop
reason ``cancelled``; the agent's late answer is dropped by the SDK, as for any cancelled
request). Later refusals of the turn, and refusals outside a turn, change nothing.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from acp import schema

from .session_types import SessionState

if TYPE_CHECKING:
    from .session import AgentSession

log = logging.getLogger("jupyter_acp.session")


class QuotaBrake:
    """One session's quota refusals: armed for each turn, fired by the gateway's first 429."""

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        #: the running turn's refusal message (None: not refused)
        self.error: str | None = None
        #: resolved here when the agent ignores the cancel: the prompt awaits it with the turn
        self.abort: asyncio.Future[Any] | None = None
        self._task: asyncio.Task[None] | None = None

    def arm(self) -> asyncio.Future[Any]:
        """A new turn: no refusal yet; the future that ends the turn on our side."""
        self.error = None
        self.abort = asyncio.get_running_loop().create_future()
        return self.abort

    def take(self) -> str | None:
        """The turn's refusal message, once (for its ``error`` event before ``turn_end``)."""
        error, self.error = self.error, None
        return error

    def refused(self, message: str) -> None:
        session, abort = self.session, self.abort
        turn_task = session._turn_task
        if (session.state is not SessionState.BUSY or turn_task is None or abort is None or abort.done()
                or self.error is not None):
            return
        self.error = message
        self._task = asyncio.get_running_loop().create_task(
            self._end(turn_task, abort), name=f"acp-quota-{session.id}")

    async def _end(self, turn_task: asyncio.Task[Any], abort: asyncio.Future[Any]) -> None:
        session = self.session
        if session._turn_task is turn_task:
            # not awaited before the grace period runs: an agent that stops reading its stdin
            # would hold the write, and the turn with it
            cancel = asyncio.ensure_future(session.cancel())

            def note_failure(t: asyncio.Future[bool]) -> None:
                if not t.cancelled() and t.exception():
                    log.info("Session %s: could not cancel the quota-refused turn: %s", session.id,
                             t.exception())

            cancel.add_done_callback(note_failure)
        grace = session.QUOTA_CANCEL_GRACE
        done, _ = await asyncio.wait({turn_task}, timeout=grace)
        if not done and not abort.done() and session._turn_task is turn_task:
            log.warning("Session %s (user %s): %s did not end its turn within %g s of session/cancel "
                        "after a quota refusal; the turn is ended here", session.id, session.user,
                        session.spec.name, grace)
            abort.set_result(schema.PromptResponse(stop_reason="cancelled"))
