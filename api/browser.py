"""The browser's side of a dashboard session (see core/sessions.py): the two
routes that set and clear the session cookie, and the guard that serves
Streamlit's `/media/*` files (thumbnails, model downloads) only to a signed-in
browser. Mounted beside the dashboard by server.py, outside the mobile API.
"""

from urllib.parse import urlsplit

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from core import sessions
from core.config import get_settings
from core.db import read_session, session_scope


def local_path(target: str | None) -> str:
    """`target` if it is a path on this site (e.g. `/metrics?round=3`), else
    `/`: a redirect after sign-in must never lead to another site."""
    if not target or not target.startswith("/") or target.startswith(("//", "/\\")):
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc:
        return "/"
    return parts.path + (f"?{parts.query}" if parts.query else "")


def start(request: Request) -> Response:
    """Exchange the sign-in form's one-time ticket for the session cookie, then
    open the page the browser asked for before signing in."""
    with session_scope() as session:
        cookie = sessions.claim_ticket(request.query_params.get("ticket", ""), session=session)
    if cookie is None:
        # A used or stale ticket: back to the sign-in form, which asks again.
        return RedirectResponse("/", status_code=303)
    response = RedirectResponse(local_path(request.query_params.get("next")), status_code=303)
    response.set_cookie(
        sessions.COOKIE_NAME,
        cookie.token,
        expires=cookie.expires_at,
        path="/",
        httponly=True,
        samesite="lax",
        secure=get_settings().session_cookie_secure,
    )
    return response


def end(request: Request) -> Response:
    """Drop the cookie of a session that has ended (the dashboard's Sign out
    ends it first), then open `next` (a page on this site); a live session's
    cookie stays, so a link from elsewhere cannot sign anyone out."""
    token = request.cookies.get(sessions.COOKIE_NAME)
    with read_session() as session:
        alive = sessions.session_user(token, session=session) is not None
    response = RedirectResponse(local_path(request.query_params.get("next")), status_code=303)
    if token and not alive:
        response.delete_cookie(sessions.COOKIE_NAME, path="/", httponly=True, samesite="lax")
    return response


routes = [Route("/session/start", start), Route("/session/end", end)]


def _signed_in(token: str | None) -> bool:
    with read_session() as session:
        return sessions.session_user(token, session=session) is not None


class MediaNeedsSession:
    """Refuse `/media/*` (403) to a request without a live session cookie.

    Streamlit serves what pages show (thumbnails, download buttons) under
    `/media/<id>` to anyone with the link; this puts the dashboard's sign-in in
    front of it."""

    def __init__(self, app: ASGIApp, prefix: str = "/media/") -> None:
        self.app, self.prefix = app, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix):
            token = Request(scope).cookies.get(sessions.COOKIE_NAME)
            if not await run_in_threadpool(_signed_in, token):
                refusal = PlainTextResponse("Sign in to the dashboard to see this file.", status_code=403)
                await refusal(scope, receive, send)
                return
        await self.app(scope, receive, send)
