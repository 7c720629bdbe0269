"""ETags on what phones fetch again and again (model files, federated plans
and their files): a 304 without the body when they already have it."""

from fastapi.responses import Response


def etag_headers(tag: str) -> dict[str, str]:
    """The answer's ETag, to be checked again on every use (no-cache)."""
    return {"ETag": f'"{tag}"', "Cache-Control": "no-cache"}


def not_modified(if_none_match: str | None, tag: str) -> Response | None:
    """A 304 when If-None-Match names `tag` (weak or strong) or is "*", else None."""
    tags = {t.strip().removeprefix("W/").strip('"') for t in (if_none_match or "").split(",")}
    if "*" in tags or tag in tags:
        return Response(status_code=304, headers=etag_headers(tag))
    return None
