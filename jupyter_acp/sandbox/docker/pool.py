"""The warm pool: containers created and started before the sessions that will use them.

A spare holds nothing of any session (``spec.spare_template``): it runs an idle command as its
init's child, with no environment, no session label and an empty home directory of its own. A
session takes one whose key (``spec.pool_key``: image, limits, user, mounts such as the user's
workspace and the agent's read-only paths) matches its own; the sandbox then swaps the spare's
home directory in for the session's on the host and execs the agent in it with the session's
environment. So one spare serves any new session of the same user and agent kind, and a spare
never carries another session's data: spares are used once and removed with their session.

Docker cannot change mounts after create, so the per-session mounts (``spec.SWAPPED``: the home,
and the LLM gateway's socket directory, shown at a fixed path) are bound from fresh directories
beside the sessions' ones (same file system, so the swap is a rename), and the session's files
(its settings; the gateway's listening socket) are moved into them at claim. Keys unused for
``idle_timeout`` seconds lose their spares; orphans of a crash are found by their labels.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .engine import Engine, run_blocking
from .spec import AGENT_HOME, LABEL_POOL, SPARE_HOME_PREFIX, spare_dir_parents, with_spare_dirs

#: The longest a refill waits for the session that emptied the pool to start its agent.
AFTER_CAP = 3.0


@dataclass
class Spare:
    id: str
    name: str
    created: float
    dirs: dict[str, str] = field(default_factory=dict)
    """The spare's own directories on the host, by mount target (``spec.SWAPPED``)."""

    @property
    def home(self) -> str | None:
        return self.dirs.get(AGENT_HOME)


def remove_spare_home(path: str | None) -> None:
    """Remove a spare's own directory (only ever one we made: checked by its name)."""
    if path and os.path.basename(path).startswith(SPARE_HOME_PREFIX):
        shutil.rmtree(path, ignore_errors=True)


class WarmPool:
    """Started spare containers by configuration key (owned by one ``DockerSandbox`` backend)."""

    def __init__(self, *, size: int, idle_timeout: float, name_prefix: str,
                 engine: Callable[[], Awaitable[Engine]], log: logging.Logger | logging.LoggerAdapter[Any]
                 ) -> None:
        self.size = size
        self.idle_timeout = idle_timeout
        self.name_prefix = name_prefix
        self._engine = engine
        self.log = log
        self.spares: dict[str, list[Spare]] = {}
        self.filling: dict[str, int] = {}
        self.expiry: dict[str, asyncio.TimerHandle] = {}
        self.tasks: set[asyncio.Task[Any]] = set()
        self.fill_tasks: set[asyncio.Task[Any]] = set()
        self.engine: Engine | None = None

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def take(self, key: str) -> Spare | None:
        spares = self.spares.get(key)
        return spares.pop(0) if spares else None

    def status(self) -> dict[str, int]:
        """Ready spares per configuration key."""
        return {k: len(v) for k, v in self.spares.items()}

    async def settled(self) -> None:
        """Wait until no spare is being started."""
        while self.fill_tasks:
            await asyncio.wait(set(self.fill_tasks))

    def replenish(self, key: str, kwargs: dict[str, Any], *, after: asyncio.Event | None = None) -> None:
        """Keep ``size`` spares of this configuration (in the background). ``after``: start them
        once it is set (at most ``AFTER_CAP`` seconds later), e.g. once the agent that just took
        a spare has started, so that the new spare does not compete with it for the CPU."""
        missing = self.size - len(self.spares.get(key, [])) - self.filling.get(key, 0)
        for _ in range(max(missing, 0)):
            self.filling[key] = self.filling.get(key, 0) + 1
            task = self._spawn(self._make_spare(key, kwargs, after))
            self.fill_tasks.add(task)
            task.add_done_callback(self.fill_tasks.discard)
        if self.idle_timeout > 0:
            if key in self.expiry:
                self.expiry[key].cancel()
            self.expiry[key] = asyncio.get_running_loop().call_later(
                self.idle_timeout, lambda: self._spawn(self.drain(key)))

    async def _make_spare(self, key: str, template: dict[str, Any],
                          after: asyncio.Event | None = None) -> None:
        dirs: dict[str, str] = {}
        try:
            if after is not None:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(after.wait(), AFTER_CAP)
            for target, parent in spare_dir_parents(template).items():
                dirs[target] = os.path.join(parent, SPARE_HOME_PREFIX + secrets.token_hex(8))
                os.mkdir(dirs[target], 0o700)
            spare_kwargs = with_spare_dirs(template, dirs)
            spare_kwargs["name"] = f"{self.name_prefix}warm-{secrets.token_hex(4)}"
            spare_kwargs["labels"] = {**spare_kwargs["labels"], LABEL_POOL: key}
            engine = self.engine = await self._engine()
            cid = await run_blocking(engine.create, spare_kwargs)
            try:
                await run_blocking(engine.api.start, cid)
            except Exception:
                await run_blocking(engine.remove_quietly, cid)
                raise
            self.spares.setdefault(key, []).append(Spare(cid, spare_kwargs["name"], time.time(), dirs))
        except BaseException as e:  # (cancelled at shutdown too: its container goes with the run)
            for path in dirs.values():
                remove_spare_home(path)
            if not isinstance(e, Exception):
                raise
            self.log.warning("Could not pre-start a warm-pool container: %s", e)
        finally:
            self.filling[key] = max(self.filling.get(key, 1) - 1, 0)

    async def discard(self, spare: Spare) -> None:
        """Remove a spare that will not serve (dead, or its claim failed)."""
        if self.engine is not None:
            await run_blocking(self.engine.remove_quietly, spare.id)
        for path in spare.dirs.values():
            remove_spare_home(path)

    async def drain(self, key: str | None = None) -> None:
        """Remove the spares of one configuration (or all)."""
        keys = [key] if key is not None else list(self.spares)
        spares = [s for k in keys for s in self.spares.pop(k, [])]
        for k in keys:
            handle = self.expiry.pop(k, None)
            if handle is not None:
                handle.cancel()
        if spares:
            await asyncio.gather(*(self.discard(s) for s in spares))

    async def close(self) -> None:
        """Stop filling and expiring; the spares' containers go with the run's containers."""
        for handle in self.expiry.values():
            handle.cancel()
        self.expiry.clear()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):
                await task
        for spares in self.spares.values():
            for spare in spares:
                for path in spare.dirs.values():
                    remove_spare_home(path)
        self.spares.clear()
