"""The routes phones use to take part in federated rounds
(core/training/federated.py; docs/federated.md): the current plan, its files,
and their updates."""

import json
from typing import Annotated

from fastapi import APIRouter, Header, Path, Request
from fastapi.responses import FileResponse, Response
from starlette.concurrency import run_in_threadpool

from api.deps import Reader, Uploader
from api.etags import etag_headers, not_modified
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import UserError
from core.training import federated

router = APIRouter(prefix="/federated", tags=["federated"])


@router.get("/plan/", responses={304: {"description": "The plan matches If-None-Match: nothing changed"}})
def current_plan(request: Request, caller: Reader, if_none_match: Annotated[str | None, Header()] = None) -> Response:
    """The open federated round's plan: files to fetch (URL, SHA-256), local
    epochs, learning rate, batch size, FedProx mu, deadline, round number,
    classes, input size and the update's shapes. 404 when none is open."""
    base = get_settings().public_url + request.scope.get("root_path", "")

    def file_url(plan_id: int, name: str) -> str:
        return base + router.url_path_for("plan_file", plan_id=str(plan_id), name=name)

    with read_session() as session:
        plan, round_ = federated.current_plan(session=session)
        tag = federated.plan_etag(plan)
        if unchanged := not_modified(if_none_match, tag):
            return unchanged
        document = federated.plan_document(plan, round_, file_url)
    return Response(json.dumps(document), media_type="application/json", headers=etag_headers(tag))


@router.get(
    "/plans/{plan_id}/files/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 304: {"description": "Unchanged"}},
)
def plan_file(
    plan_id: Annotated[int, Path(ge=1, le=federated.MAX_ID)],
    name: str,
    caller: Reader,
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A plan's `backbone` (inference) or `head` (trainable) `.pte`, with its
    SHA-256 as ETag. Fetching the head (or asking whether it changed) marks
    the phone as working on the plan."""
    with read_session() as session:
        path, sha256 = federated.plan_file(plan_id, name, session=session)
    if name == "head":
        with session_scope() as session:
            federated.record_fetch(plan_id, caller.token_id, caller.name, session=session)
    if unchanged := not_modified(if_none_match, sha256):
        return unchanged
    return FileResponse(
        path, media_type="application/octet-stream", filename=f"{name}.pte", headers=etag_headers(sha256)
    )


async def _read_update(request: Request) -> dict:
    """The update's fields from JSON, or from a multipart form whose `update`
    file is an .npz (the compact form: float32, no text)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
        form = await request.form()
        upload = form.get("update")
        if upload is None or isinstance(upload, str):
            raise UserError("Send the update's arrays as the file field 'update' (.npz with weight and bias)")
        try:
            metrics = json.loads(form.get("metrics") or "{}")
            num_examples = int(form.get("num_examples", ""))
            plan_id = int(form.get("plan_id", ""))
        except (ValueError, TypeError):
            raise UserError("plan_id and num_examples must be whole numbers, metrics a JSON object") from None
        arrays = federated.from_npz(await upload.read())
        return {"plan_id": plan_id, "kind": form.get("kind", "weights"), "arrays": arrays,
                "num_examples": num_examples, "metrics": metrics}  # fmt: skip
    try:
        body = await request.json()
    except ValueError:
        raise UserError("The request body is not valid JSON; send JSON or a multipart form with an .npz") from None
    if not isinstance(body, dict):
        raise UserError('The request body must be a JSON object: {"plan_id", "num_examples", "weights", ...}')
    kind = "delta" if "delta" in body else "weights"
    plan_id = body.get("plan_id")
    if isinstance(plan_id, bool) or not isinstance(plan_id, int):
        raise UserError(f"plan_id must be the plan's id, a whole number (got {plan_id!r})")
    return {"plan_id": plan_id, "kind": kind, "arrays": body.get(kind), "num_examples": body.get("num_examples"),
            "metrics": body.get("metrics")}  # fmt: skip


@router.post("/updates/", status_code=201)
async def send_update(request: Request, caller: Uploader) -> dict:
    """A phone's update for a plan: the head's new `weights` (or their `delta`)
    as arrays `weight` and `bias`, `num_examples` (its pictures) and local
    `metrics`. JSON, or multipart with an .npz file `update`. Refused with a
    4xx that says why: wrong shape, not finite, moved too far, a second
    update from this device, or a closed round."""
    fields = await _read_update(request)

    def store():
        with session_scope() as session:
            return federated.receive_update(
                fields.pop("plan_id"), session=session, actor=caller.actor, token_id=caller.token_id, **fields
            )

    receipt = await run_in_threadpool(store)
    if receipt.error is not None:
        raise receipt.error
    update = receipt.update
    return {
        "status": update.status,
        "update_id": update.id,
        "plan_id": update.plan_id,
        "update_norm": update.update_norm,
        "message": "Update accepted; it is averaged when the round closes",
    }
