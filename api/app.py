"""The FastAPI app: routes, and every error as JSON `{"detail": "..."}`."""

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline

from api.cached import CachedReads
from api.federated import router as federated_router
from api.limits import RequestLimits
from api.routes import router
from api.schemas import allowed_range
from core.config import get_settings
from core.errors import AuthenticationError, UserError

log = logging.getLogger(__name__)

DESCRIPTION = """
The training dashboard's API for mobile apps and scripts.

Send `Authorization: Bearer <token>` on every call except `/health/`.
Tokens come from `python -m cli token create --role device|viewer|operator|admin --label NAME`.
Errors are JSON `{"detail": "..."}` saying what to fix.
"""


def user_error(request: Request, exc: UserError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthenticationError) else None
    return JSONResponse({"detail": str(exc)}, status_code=exc.status_code, headers=headers)


def _describe(error: dict) -> str:
    if error["type"] == "json_invalid":
        return f"The request body is not valid JSON ({error.get('ctx', {}).get('error', 'cannot be parsed')})"
    # ("body", "epochs") -> "epochs"; the location kind is noise to a caller.
    path = [str(part) for part in error["loc"] if part not in ("body", "query", "path", "header", "form")]
    field = ".".join(path) or "request body"
    text = f"{field}: {error['msg']}"
    allowed = allowed_range(path[-1]) if path else None
    return f"{text} ({allowed})" if allowed else text


def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": "; ".join(_describe(e) for e in exc.errors())}, status_code=422)


def unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "Internal error; the server log has the details"}, status_code=500)


def create_app() -> FastAPI:
    about = {"title": "Training dashboard API", "version": "1.0.0", "description": DESCRIPTION}
    if get_settings().api_docs:
        # The docs pages' scripts and styles come from /api/static-offline-docs, not a CDN.
        app = FastAPIOffline(**about)
    else:
        app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None, **about)
    app.include_router(router)
    app.include_router(federated_router)
    app.add_exception_handler(UserError, user_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected_error)
    app.add_middleware(RequestLimits, error_response=user_error)
    # Outermost: a cached answer skips the rest.
    app.add_middleware(CachedReads)
    return app


app = create_app()
