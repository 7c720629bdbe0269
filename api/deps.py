"""Who is calling: the bearer token, checked once per request, and its role."""

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from core import tokens
from core.access import Actor, Permission, check_permission
from core.changes import StampedCache, Stamps
from core.db import current_stamps, read_session, session_scope
from core.errors import AuthenticationError

# Where RequestLimits keeps the caller it identified (the request's state).
CALLER_STATE = "caller"

bearer = HTTPBearer(
    auto_error=False,
    description="An API token from `python -m cli token create --role device|viewer|operator|admin --label NAME`",
)


@dataclass(frozen=True)
class Caller:
    token_id: int
    label: str
    role: str

    @property
    def name(self) -> str:
        """How the caller appears in `uploaded_by`, `requested_by`, histories and the audit trail."""
        return f"api:{self.label}"

    @property
    def actor(self) -> Actor:
        return Actor(self.name, self.role)


MISSING_TOKEN = "Missing API token: send the header 'Authorization: Bearer <token>'"


# Live tokens seen lately, by the SHA-256 of their secret, until any token
# changes (a revocation, a new token, `last_used_at` written once a minute):
# a request then costs no token query, only the read of the change stamps.
known_tokens = StampedCache(size=1000)
TOKEN_KINDS = ("tokens",)


def _secret(authorization: str | None) -> str:
    scheme, secret = get_authorization_scheme_param(authorization)
    if scheme.lower() != "bearer" or not secret:
        raise AuthenticationError(MISSING_TOKEN)
    return secret


def known_caller(authorization: str | None, stamps: Stamps) -> Caller | None:
    """The caller, from the cache of live tokens alone (no query, no write):
    None when the token is not cached or is due for its `last_used_at`."""
    token = known_tokens.get(tokens.hash_secret(_secret(authorization).strip()), stamps, TOKEN_KINDS)
    if token is None or tokens.needs_touch(token):
        return None
    tokens.check_live(token)
    return Caller(token.id, token.label, token.role)


def identify(authorization: str | None) -> Caller:
    """The caller behind an `Authorization` header; AuthenticationError when it names none."""
    stamps = current_stamps()
    if (known := known_caller(authorization, stamps)) is not None:
        return known
    secret = _secret(authorization)
    with read_session() as session:
        token = tokens.verify_token(secret, session=session)
    if tokens.needs_touch(token):
        with session_scope() as session:
            tokens.touch_token(token.id, session=session)
        # The touch changed the token (and its stamp): cache it from the next request on.
        return Caller(token.id, token.label, token.role)
    known_tokens.put(tokens.hash_secret(secret.strip()), stamps, TOKEN_KINDS, token)
    return Caller(token.id, token.label, token.role)


def authenticate(
    request: Request,
    # Read from the header below; declared so the API docs show the bearer scheme.
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    # A request with a body was identified before its body was read (api/limits.py).
    known = request.scope.get("state", {}).get(CALLER_STATE)
    if known is not None:
        return known
    return identify(request.headers.get("authorization"))


def require(permission: Permission):
    """A dependency that lets the request through only with `permission`."""

    def check(caller: Annotated[Caller, Depends(authenticate)]) -> Caller:
        check_permission(caller.role, permission)
        return caller

    return Depends(check)


async def _json_object(request: Request) -> None:
    # FastAPI reads a JSON `null` body as no body at all, which would queue the
    # defaults; any other non-object is refused by the body's model.
    if (await request.body()).strip() == b"null":
        raise HTTPException(
            422, 'The request body must be a JSON object, e.g. {"epochs": 5}; send no body for the defaults'
        )


# After the caller's check in a route's parameters, so a stranger gets 401 first.
JsonObject = Annotated[None, Depends(_json_object)]


Reader = Annotated[Caller, require(Permission.read)]
Uploader = Annotated[Caller, require(Permission.upload_images)]
Trainer = Annotated[Caller, require(Permission.train)]
