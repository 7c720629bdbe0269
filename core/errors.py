"""Exceptions a user can cause, translated once at each edge (CLI, UI, API)."""


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
