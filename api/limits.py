"""Limits applied before a request's body is read: who is calling, and how much.

FastAPI reads (and spools) a whole body before any dependency runs, so the
token check in api/deps.py alone came after a 200 MB body had been received.
This ASGI middleware runs first: a request that carries a body must name a
valid token, and its body may not exceed its route's limit, checked against
Content-Length up front and counted as it streams in; either refusal is
answered at once, without reading the rest.
"""

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import CALLER_STATE, identify
from core.config import get_settings
from core.errors import RequestTooLargeError, UserError

# Every JSON body this API takes is a handful of fields.
JSON_BODY_LIMIT = 16 * 1024
# Routes whose body is a multipart upload (or a federated update's arrays),
# limited by MAX_REQUEST_BYTES.
UPLOAD_ROUTES = {"/images/", "/federated/updates/"}
# On a refusal the server closes the connection: keeping it open would mean
# reading (and throwing away) the rest of the body first.
CLOSE = {"Connection": "close"}


def body_limit(route_path: str) -> tuple[int, str]:
    """The most bytes a body sent to `route_path` may have, and what to do when over it."""
    if route_path in UPLOAD_ROUTES:
        return get_settings().max_request_bytes, "MAX_REQUEST_BYTES: send the files in several requests"
    return JSON_BODY_LIMIT, "this route takes a few fields of JSON"


def _size(size: int) -> str:
    return f"{size / 2**20:,.1f} MB" if size >= 2**20 else f"{size / 1024:,.0f} KB"


def _too_large(limit: int, hint: str, declared: int | None = None) -> str:
    size = f" ({_size(declared)})" if declared is not None else ""
    return f"The request body{size} is over the limit of {_size(limit)} ({hint})"


def route_path(scope: Scope) -> str:
    """The path inside the API app (`/models/latest/`), wherever it is mounted."""
    # Mounted at /api, the scope's path keeps the prefix and root_path names it.
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


class RequestLimits:
    """The API app wrapped: token first, then the body, within its limit."""

    def __init__(self, app: ASGIApp, error_response) -> None:
        self.app = app
        # api.app.user_error: the same JSON errors as everywhere else.
        self.error_response = error_response

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope) if scope["type"] == "http" else Headers()
        if headers.get("content-length", "0") == "0" and "transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        limit, hint = body_limit(route_path(scope))
        try:
            scope.setdefault("state", {})[CALLER_STATE] = await run_in_threadpool(
                identify, headers.get("authorization")
            )
            declared = headers.get("content-length")
            if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
                raise RequestTooLargeError(_too_large(limit, hint, int(declared)))
        except UserError as exc:
            response = self.error_response(Request(scope), exc)
            response.headers.update(CLOSE)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                # FastAPI passes an HTTPException raised while it reads the body on as it is (other errors become 400).
                raise HTTPException(RequestTooLargeError.status_code, _too_large(limit, hint), headers=CLOSE)
            return message

        await self.app(scope, counted, send)
