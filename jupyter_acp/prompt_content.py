"""What a user's prompt sends the agent besides its text: ``@path`` mentions and images.

A mention — ``@path`` at the start of the message or after a space, or ``@"a path with
spaces"`` — of a file in the session's workspace goes to the agent as an ACP resource: its text
embedded when the agent accepts embedded context (``promptCapabilities.embeddedContext``) and
the file is UTF-8 text within ``MAX_EMBED_BYTES`` (``MAX_EMBED_TOTAL`` for the whole prompt),
else a ``resource_link`` the agent can read itself. Files are read through the session's
``WorkspaceFS``, the very walk that confines the agent's own reads: a mention reaches no file
the agent could not (no ``..``, no absolute path outside, no symlink out). A mention of a
path that does not exist stays plain text (an e-mail address, a decorator); one that leaves
the workspace is refused.

Images (pasted or dropped in the sidebar) go as ACP image blocks to an agent that accepts them
(``promptCapabilities.image``); at most ``MAX_IMAGES``, each at most ``MAX_IMAGE_BYTES``, of
the types browsers paste. The history keeps what was attached (names, types, sizes) but not
the image data: a transcript stays small.
"""

from __future__ import annotations

import base64
import binascii
import mimetypes
import os
import posixpath
import re
from typing import TYPE_CHECKING, Any, TypedDict

from acp import helpers, schema
from acp.exceptions import RequestError

from .errors import BadRequest, PathOutsideWorkspace, SessionNotReady

if TYPE_CHECKING:
    from .session import AgentSession

MAX_MENTIONS = 20
MAX_EMBED_BYTES = 256 * 1024
MAX_EMBED_TOTAL = 1024 * 1024
MAX_IMAGES = 4
MAX_IMAGE_BYTES = 3 * 1024 * 1024
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
#: ``@path`` or ``@"path"``, at the start or after whitespace
MENTION = re.compile(r'(?:(?<=\s)|^)@(?:"([^"\n]{1,4096})"|([^\s"]{1,4096}))')
#: what may end a sentence after a mention ("see @a.py.") and is not part of the path
TRAILING = ".,;:!?)]}'"


class Image(TypedDict):
    mime_type: str
    data: str


def prompt_capabilities(caps: Any) -> dict[str, bool]:
    """What an agent accepts in a prompt besides text (its ``promptCapabilities``), for the
    session model (``prompt_capabilities``) and for ``build_prompt``."""
    caps = caps if isinstance(caps, dict) else {}
    return {k: bool(caps.get(k)) for k in ("image", "audio", "embeddedContext")}


def mentions(text: str) -> list[tuple[str, str]]:
    """Each mention in ``text``: (the path as written, the path without trailing punctuation)."""
    out = []
    for m in MENTION.finditer(text):
        path = m.group(1) or m.group(2)
        out.append((path, path if m.group(1) else path.rstrip(TRAILING)))
    return out


async def build_prompt(session: AgentSession, text: str, images: list[Image]
                       ) -> tuple[list[Any], list[dict[str, Any]]]:
    """The ACP content blocks of a prompt, and what the history shows of its attachments."""
    blocks: list[Any] = [helpers.text_block(text)]
    attachments: list[dict[str, Any]] = []
    caps = prompt_capabilities(session.agent_capabilities.get("promptCapabilities"))
    if images and not caps["image"]:
        raise BadRequest(f"{session.spec.display_name} does not accept images")
    if len(images) > MAX_IMAGES:
        raise BadRequest(f"At most {MAX_IMAGES} images per message")
    for image in images:
        blocks.append(_image(image))
        attachments.append({"type": "image", "name": "image", "mime_type": image["mime_type"],
                            "size": len(base64.b64decode(image["data"]))})
    found = mentions(text)
    if not found:
        return blocks, attachments
    client, sandbox = session.client, session.sandbox
    if client is None or sandbox is None:
        raise SessionNotReady("The session's agent is not running")
    seen: set[str] = set()
    embedded = 0
    for written, stripped in found[:MAX_MENTIONS]:
        path = None
        data = b""
        for candidate in dict.fromkeys((written, stripped)):
            try:
                data = await client.fs.read_bytes(candidate, MAX_EMBED_TOTAL + 1)
                path = candidate
                break
            except RequestError as e:
                reason = str((e.data or {}).get("reason", "")) if isinstance(e.data, dict) else ""
                if "outside the workspace" in reason or "'..'" in reason:
                    raise PathOutsideWorkspace(f"@{written} is outside the session's workspace") from None
                if "larger than" in reason:
                    path, data = candidate, b""
                    break
        if path is None or path in seen:
            continue  # not a file of the workspace (or named twice): plain text
        seen.add(path)
        agent_path = posixpath.normpath(posixpath.join(sandbox.workspace_path, path))
        uri = f"file://{agent_path}"
        name = posixpath.basename(agent_path)
        mime = mimetypes.guess_type(name)[0] or "text/plain"
        try:
            content = data.decode("utf-8") if data else None
        except UnicodeDecodeError:
            content = None
        if (content is not None and caps["embeddedContext"] and len(data) <= MAX_EMBED_BYTES
                and embedded + len(data) <= MAX_EMBED_TOTAL):
            embedded += len(data)
            resource = helpers.embedded_text_resource(uri, content, mime_type=mime)
            blocks.append(helpers.resource_block(resource))
            attachments.append({"type": "resource", "name": path, "uri": uri, "mime_type": mime,
                                "size": len(data)})
        else:
            size = len(data) if data else None
            blocks.append(helpers.resource_link_block(name, uri, mime_type=mime, size=size))
            attachments.append({"type": "resource_link", "name": path, "uri": uri, "mime_type": mime,
                                "size": size})
    return blocks, attachments


def _image(image: Image) -> schema.ImageContentBlock:
    mime = image.get("mime_type")
    if mime not in IMAGE_TYPES:
        raise BadRequest(f"Images must be one of {', '.join(IMAGE_TYPES)}, not {str(mime)[:40]!r}")
    try:
        raw = base64.b64decode(image.get("data", ""), validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise BadRequest("An image's data is not valid base64") from None
    if not raw:
        raise BadRequest("An image is empty")
    if len(raw) > MAX_IMAGE_BYTES:
        raise BadRequest(f"An image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MiB")
    return helpers.image_block(image["data"], mime)


#: Paths one completion answers (``GET sessions/{id}/files``).
MAX_COMPLETIONS = 50


def complete_paths(workspace: str, prefix: str, limit: int = MAX_COMPLETIONS) -> list[str]:
    """Workspace paths starting with ``prefix`` (relative to ``workspace``), for the sidebar's
    ``@`` completion: directories end with ``/``; hidden entries only when the name typed
    starts with ``.``. Confined like a mention: no ``..``, no absolute path, and a directory
    reached through a symlink must still be inside the workspace. Blocking: run it in a thread."""
    if "\x00" in prefix or prefix.startswith("/") or len(prefix.encode(errors="surrogatepass")) > 4096:
        raise BadRequest("prefix must be a relative path in the session's workspace")
    head, _, partial = prefix.rpartition("/")
    parts = [p for p in head.split("/") if p]
    if ".." in parts:
        raise PathOutsideWorkspace("'..' is not allowed in a mention")
    root = os.path.realpath(workspace)
    directory = os.path.realpath(os.path.join(root, *parts))
    if directory != root and not directory.startswith(root + os.sep):
        raise PathOutsideWorkspace(f"{head!r} is outside the session's workspace")
    try:
        with os.scandir(directory) as entries:
            names = sorted((e.name, e.is_dir(follow_symlinks=False)) for e in entries
                           if e.name.startswith(partial)
                           and (partial.startswith(".") or not e.name.startswith(".")))
    except (FileNotFoundError, NotADirectoryError, PermissionError):
        return []
    base = f"{head}/" if head else ""
    return [f"{base}{name}{'/' if is_dir else ''}" for name, is_dir in names[:limit]]
