"""Response headers that keep browsers safe, on every answer of the one server
(dashboard and API), and Streamlit's metrics hidden from the network."""

from starlette.datastructures import MutableHeaders
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Streamlit's page has one inline script and its charts (Vega) compile
# expressions with `new Function`, hence 'unsafe-inline' and 'unsafe-eval';
# it fetches a `:material/...:` page icon (the favicon) from Google's font
# server, the one other origin allowed, for images only.
# What the policy buys: nothing is loaded from, sent to or framed by another
# origin, so markdown that slipped through cannot fetch a remote image or
# script, and no other site can frame the dashboard (clickjacking).
CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self' 'unsafe-inline' 'unsafe-eval'",
        "style-src 'self' 'unsafe-inline'",
        "img-src 'self' data: blob: https://fonts.gstatic.com",
        "font-src 'self' data:",
        "connect-src 'self'",
        "worker-src 'self' blob:",
        "frame-src 'self'",
        "object-src 'none'",
        "base-uri 'self'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}
# Open to anyone who can reach the port (sessions, memory, cache sizes); the
# product has its own health check at /api/health/.
HIDDEN_PATHS = ("/_stcore/metrics",)


class SecurityHeaders:
    """Pure ASGI middleware (streaming answers and websockets pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"].rstrip("/").endswith(HIDDEN_PATHS):
            await PlainTextResponse("Not Found", status_code=404, headers=SECURITY_HEADERS)(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)
