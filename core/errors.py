"""Exceptions a user can cause, translated once at each edge (CLI, UI, API),
and the checks that raise them for free text and numbers."""

import math


class UserError(Exception):
    """Something the caller can fix; the message says what to do."""

    status_code = 400


def bounded_text(value: str | None, what: str, limit: int) -> str | None:
    """`value` stripped (None when empty), or a UserError naming `what` when it
    is longer than `limit` characters: free text from callers (labels, device
    ids, reasons) is stored and shown, so it gets a bound."""
    clean = (value or "").strip()
    if len(clean) > limit:
        raise UserError(f"{what} can be at most {limit} characters (got {len(clean)})")
    return clean or None


class NotFoundError(UserError):
    """A job, version, image or category that does not exist."""

    status_code = 404


class ConflictError(UserError):
    """The request is valid but the current state does not allow it."""

    status_code = 409


class InvalidImageError(UserError):
    """An uploaded file that is not a usable image."""

    status_code = 422


class RequestTooLargeError(UserError):
    """A request over a size or count limit (MAX_REQUEST_BYTES, MAX_UPLOAD_FILES)."""

    status_code = 413


class FileTooLargeError(InvalidImageError):
    """An upload over the configured byte limit."""

    status_code = 413


class StorageFullError(UserError):
    """The disk (or quota) under DATA_DIR is full; the write was undone."""

    status_code = 507


class TrainingCancelled(Exception):
    """Raised inside the training loop when someone cancelled the round."""


class AuthenticationError(UserError):
    """A missing, unknown, revoked or expired credential."""

    status_code = 401


class PermissionDeniedError(UserError):
    """A valid credential whose role does not allow the action."""

    status_code = 403


def check_number(label: str, value, kind: type, low: float, high: float, *, top: str | None = None, also: str = ""):
    """`value` as `kind` (int or float) when it lies in [low, high], else a
    UserError naming `label` and the range: the one wording of every numeric
    setting (training parameters, automation settings). `top` replaces the
    maximum's number in the message (e.g. the setting that fixes it); `also`
    names another accepted value. Booleans are not numbers here."""
    between = f"between {_number(low)} and {top or _number(high)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        wanted = "a whole number" if kind is int else "a number"
        raise UserError(f"{label} must be {wanted} {between}{also} (got {value!r})")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise UserError(f"{label} must be a whole number {between} (got {value!r})")
    if not math.isfinite(value) or not low <= value <= high:
        raise UserError(f"{label} must be {between} (got {value!r})")
    return kind(value)


def _number(value: float) -> str:
    """1000000 -> "1,000,000", 0.25 -> "0.25" (":g" would say "1e+06")."""
    return f"{int(value):,}" if float(value).is_integer() else f"{value:g}"
