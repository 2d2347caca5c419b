"""Which requests the gateway forwards, and what it does with a response it cannot meter.

A gateway session is metered by the gateway only (the agent's own reports are not recorded),
so a response whose usage the gateway cannot read would pass uncounted and escape the quota —
as Codex's OpenAI Responses traffic did before ``UsageMeter`` read that format. Two rules close
that hole:

1. **Refuse before forwarding.** Each API has a list of endpoints: *billed* ones, whose
   response format ``UsageMeter`` reads, and *free* ones (model listings, token counting),
   which bill nothing. Any other request is answered 404 in the API's own error format and
   never reaches the endpoint, so nothing is spent. A new endpoint an agent starts to use is
   thus a visible error, fixed by teaching the meter its format, not a silent leak.
2. **Refuse to deliver what could not be metered.** A billed endpoint's successful response
   in which the meter found no usage (a format change, a truncated stream, a proxy that strips
   it) is not completed: the gateway holds back the response's last chunk until its usage is
   known, and here drops it and cuts the connection, so the agent never receives a whole answer
   that was not counted. The endpoint may still have billed it, so the request is recorded with
   an *estimate* (``estimate``: a quarter of the request's and the response's bytes, the usual
   bytes per token) under the source ``UNMETERED_SOURCE``, which flags it in the ledger.

Why not count such a response from the agent's own report, the alternative? Codex reports no
usage over ACP at all, Claude Code's reports leave out its title calls, and any agent's report
is its own word (a hostile agent reports zero). The byte estimate is bounded by what really
passed the gateway and needs nothing from the agent.
"""

from __future__ import annotations

import re
from typing import Literal

from ..usage import TurnUsage

#: The ledger source of a request the gateway could not meter and estimated (the flag).
UNMETERED_SOURCE = "gateway_estimate"

Kind = Literal["billed", "free"]

#: (method, path regex relative to the API's base URL, kind), per API. The paths are what the
#: agents' SDKs send: OpenAI's under ``/v1`` (the prefix is stripped before matching), Gemini's
#: and Anthropic's from the host root.
_ENDPOINTS: dict[str, list[tuple[str, re.Pattern[str], Kind]]] = {
    "openai": [
        ("POST", re.compile(r"/chat/completions"), "billed"),
        ("POST", re.compile(r"/responses"), "billed"),
        ("POST", re.compile(r"/completions"), "billed"),
        ("POST", re.compile(r"/embeddings"), "billed"),
        ("GET", re.compile(r"/models(/[^/]+)?"), "free"),
    ],
    "gemini": [
        ("POST", re.compile(r"/v1(beta|alpha)?/models/[^/:]+:(generateContent|streamGenerateContent)"),
         "billed"),
        ("POST", re.compile(r"/v1(beta|alpha)?/models/[^/:]+:countTokens"), "free"),
        ("GET", re.compile(r"/v1(beta|alpha)?/models(/[^/:]+)?"), "free"),
    ],
    "anthropic": [
        ("POST", re.compile(r"/v1/messages"), "billed"),
        ("POST", re.compile(r"/v1/messages/count_tokens"), "free"),
        ("GET", re.compile(r"/v1/models(/[^/]+)?"), "free"),
    ],
}

#: Bytes per token for the estimate of a response that could not be metered (the usual ratio of
#: English text and JSON in BPE tokenizers; an unmetered request is rare and flagged anyway).
BYTES_PER_TOKEN = 4


def endpoint_kind(api: str, method: str, path: str) -> Kind | None:
    """``billed``, ``free``, or None for an endpoint the gateway does not forward.

    ``path`` is relative to the API's base URL as the agent sees it, without the query."""
    for want, pattern, kind in _ENDPOINTS.get(api, []):
        if method == want and pattern.fullmatch(path):
            return kind
    return None


def estimate(request_bytes: int, response_bytes: int, model: str | None = None) -> TurnUsage:
    """The flagged record of a billed response whose usage could not be read."""
    inp = max(1, request_bytes // BYTES_PER_TOKEN)
    out = max(1, response_bytes // BYTES_PER_TOKEN)
    return TurnUsage(input_tokens=inp, output_tokens=out, total_tokens=inp + out, model=model,
                     source=UNMETERED_SOURCE)
