"""The answers phones poll most, served from memory while they still hold.

`GET /models/latest/` (the manifest) and `GET /models/training-status/{id}/`
of a finished job are the same bytes until a version, a promotion or a round
changes. This ASGI middleware keeps each such answer with the change stamps
read before it was made (core/changes.py) and, while one read of the stamps
gives the same numbers, answers from memory: no thread, no query but that
one, no validation, no serialisation. The caller's token and role are
checked on every request, from a cache of live tokens invalidated the same
way; a token not cached yet, a stale entry, a refused caller and every other
request go to the app as usual (and a fresh answer is kept on the way out).
"""

import json

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import known_caller
from api.limits import route_path
from core.access import Permission, check_permission
from core.changes import StampedCache
from core.db import current_stamps
from core.errors import UserError
from core.models import FINISHED_STATUSES

LATEST = "/models/latest/"
STATUS_PREFIX = "/models/training-status/"
FINISHED = {status.value for status in FINISHED_STATUSES}


def kinds_of(path: str) -> tuple[str, ...] | None:
    """The kinds of rows the answer on `path` is made of, or None: not cached."""
    if path == LATEST:
        return ("models",)
    if path.startswith(STATUS_PREFIX) and path.endswith("/") and path.count("/") == 4:
        return ("rounds", "models")
    return None


def _cacheable(path: str, status: int, body: bytes) -> bool:
    if status != 200:
        return False
    # A running job's status changes with every batch; only a finished one's is kept.
    return path == LATEST or json.loads(body).get("status") in FINISHED


class CachedReads:
    """The API app wrapped: cached answers first, the app for everything else."""

    def __init__(self, app: ASGIApp, size: int = 10_000) -> None:
        self.app = app
        self.answers = StampedCache(size)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope) if scope["type"] == "http" and scope["method"] == "GET" else ""
        kinds = kinds_of(path)
        if kinds is None:
            await self.app(scope, receive, send)
            return
        # Read before the answer is made, so a change committed meanwhile invalidates it.
        stamps = current_stamps()
        try:
            caller = known_caller(Headers(scope=scope).get("authorization"), stamps)
            if caller is not None:
                check_permission(caller.role, Permission.read)
        except UserError:
            caller = None
        if caller is None:
            # The app checks the token in its thread pool (it may write `last_used_at`) and answers any refusal.
            await self.app(scope, receive, send)
            return
        # The manifest's links start with root_path (/api where server.py mounts the API).
        key = (scope.get("root_path", ""), path)
        found = self.answers.get(key, stamps, kinds)
        if found is not None:
            headers, body = found
            # A copy: middleware further out (api/security.py) adds its headers to the list it is given.
            await send({"type": "http.response.start", "status": 200, "headers": list(headers)})
            await send({"type": "http.response.body", "body": body})
            return
        started: dict = {}
        chunks: list[bytes] = []

        async def keep(message: Message) -> None:
            if message["type"] == "http.response.start":
                started.update(message)
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body", False):
                    body = b"".join(chunks)
                    if _cacheable(path, started["status"], body):
                        self.answers.put(key, stamps, kinds, (list(started["headers"]), body))
            await send(message)

        await self.app(scope, receive, keep)
