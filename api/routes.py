"""The routes. Each one checks the caller, calls `core` or `jobs`, and shapes the answer."""

import logging
from dataclasses import asdict
from typing import Annotated
from urllib.parse import urlencode

from fastapi import APIRouter, File, Form, Header, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse, Response
from sqlalchemy import text

import jobs
from api.deps import JsonObject, Reader, Trainer, Uploader
from api.etags import etag_headers, not_modified
from api.schemas import (
    CancelResponse,
    CategoryList,
    EpochRow,
    Health,
    ModelManifest,
    TrainingStatus,
    TrainRequest,
    TrainResponse,
    UploadResponse,
)
from core import manifest, quality_views, review, uploads
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import InvalidImageError, RequestTooLargeError
from core.ingest import check_size, get_or_create_category
from core.models import ImageSource, RoundStatus
from core.round_details import RoundDetails, load_round_details
from core.storage import free_bytes

log = logging.getLogger(__name__)
router = APIRouter()

# The old service reported Celery's task states; apps still read them.
QUEUE_STATUS = {
    RoundStatus.queued: "PENDING",
    RoundStatus.in_progress: "STARTED",
    RoundStatus.completed: "SUCCESS",
    RoundStatus.failed: "FAILURE",
    RoundStatus.cancelled: "REVOKED",
}


@router.post("/models/train/", status_code=202, tags=["training"])
def start_training(caller: Trainer, _: JsonObject, body: TrainRequest | None = None) -> TrainResponse:
    """Queue a training job on all validated images."""
    round_ = jobs.submit_training((body or TrainRequest()).model_dump(exclude_unset=True), actor=caller.actor)
    return TrainResponse(
        job_id=round_.job_id,
        training_round_id=round_.id,
        status=round_.status.value,
        message=f"Training job started with {round_.total_images} images",
        parameters=round_.parameters,
        warnings=round_.warnings,
    )


def _status(details: RoundDetails) -> TrainingStatus:
    round_, version = details.round, details.version
    report = TrainingStatus(
        job_id=round_.job_id,
        training_round_id=round_.id,
        status=round_.status.value,
        queue_status=QUEUE_STATUS[round_.status],
        celery_status=QUEUE_STATUS[round_.status],
        start_time=round_.started_at,
        finished_time=round_.finished_at,
        attempts=round_.attempts,
        current_epoch=round_.current_epoch,
        total_epochs=round_.parameters.get("epochs", 0),
        current_batch=round_.current_batch,
        total_batches=round_.total_batches,
        progress=round_.progress,
        epoch_metrics=[EpochRow.model_validate(m, from_attributes=True) for m in details.epochs],
        metrics={"total_images": round_.total_images, "category_distribution": round_.category_distribution},
        warnings=round_.warnings,
        cancel_requested=round_.cancel_requested,
        error=round_.error,
        trials=round_.trials,
    )
    if version is not None:
        report.model_version = version.version
        report.model_version_id = version.id
        report.accuracy = version.metrics.get("val_accuracy")
        report.metrics |= quality_views.quality_metrics(version.metrics)
        if round_.started_at and round_.finished_at:
            report.duration_minutes = round(round_.elapsed_seconds() / 60, 2)
    return report


@router.get("/models/training-status/{job_id}/", tags=["training"])
def training_status(job_id: str, caller: Reader) -> TrainingStatus:
    """A job's state, progress, per-epoch metrics so far and, once completed, its model."""
    with read_session() as session:
        return _status(load_round_details(job_id, session=session))


@router.post("/models/training/{job_id}/cancel/", tags=["training"])
def cancel_training(job_id: str, caller: Trainer) -> CancelResponse:
    """Cancel a queued job, or ask a running one to stop after its current batch."""
    round_ = jobs.cancel_training(job_id, actor=caller.actor)
    return _cancel_response(round_, "Cancel requested: the job stops after its current batch")


@router.post("/models/training/{job_id}/stop/", tags=["training"])
def stop_training(job_id: str, caller: Trainer) -> CancelResponse:
    """Stop a running job after its current batch and register its best epoch
    so far as a version, through the promotion gate (a queued job is cancelled)."""
    round_ = jobs.cancel_training(job_id, actor=caller.actor, keep_best=True)
    return _cancel_response(
        round_, "Stop requested: the job stops after its current batch and registers its best epoch so far"
    )


def _cancel_response(round_, requested: str) -> CancelResponse:
    return CancelResponse(
        job_id=round_.job_id,
        training_round_id=round_.id,
        status=round_.status.value,
        queue_status=QUEUE_STATUS[round_.status],
        message="Job cancelled before it started" if round_.status == RoundStatus.cancelled else requested,
    )


@router.get("/models/latest/", tags=["models"])
def latest_model(request: Request, caller: Reader) -> ModelManifest:
    """The production model: classes in output order, input, metrics and files to download."""

    # root_path is "/api" where server.py mounts the API; the Host header plays no part.
    base = get_settings().public_url + request.scope.get("root_path", "")

    def download_url(version: str, fmt: str) -> str:
        return f"{base}{router.url_path_for('download_model')}?{urlencode({'version': version, 'format': fmt})}"

    with read_session() as session:
        version = manifest.resolve_version(None, session=session)
    return ModelManifest.model_validate(manifest.model_manifest(version, download_url=download_url))


@router.get(
    "/models/download/",
    response_class=FileResponse,
    tags=["models"],
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The model file"},
        304: {"description": "The file matches If-None-Match: the phone already has it"},
    },
)
def download_model(
    caller: Reader,
    version: Annotated[str | None, Query(description="MAJOR.MINOR.PATCH; default: the production model")] = None,
    fmt: Annotated[str, Query(alias="format", description="ptl (lite interpreter) or pte (ExecuTorch)")] = "ptl",
    if_none_match: Annotated[str | None, Header()] = None,
) -> Response:
    """A model file, with its SHA-256 as ETag so unchanged models are not sent again."""
    with read_session() as session:
        model = manifest.resolve_version(version, session=session)
    artifact = manifest.artifact_file(model, fmt)
    if unchanged := not_modified(if_none_match, artifact.sha256):
        return unchanged
    return FileResponse(
        artifact.path,
        media_type="application/octet-stream",
        filename=artifact.filename,
        headers=etag_headers(artifact.sha256),
    )


@router.post("/images/", tags=["images"])
def upload_images(
    caller: Uploader,
    images: Annotated[list[UploadFile], File(description="One or more image files (JPEG, PNG, WebP, ...)")],
    category: Annotated[str, Form(description="An existing category name")],
    device_id: Annotated[str | None, Form(description="The phone that took the pictures")] = None,
) -> UploadResponse:
    """Store photos from a phone; they wait for review (`pending`)."""
    limit = get_settings().max_upload_files
    if len(images) > limit:
        raise RequestTooLargeError(
            f"{len(images)} files in one request; the limit is {limit} (MAX_UPLOAD_FILES): send them in several requests"
        )
    for upload in images:
        check_size(upload.size or 0, upload.filename or "upload")
    with session_scope() as session:
        # Checked once, before any file, so a typo does not refuse every file separately.
        get_or_create_category(category, session=session, create=False)
        report = uploads.ingest_uploads(
            [(upload.filename or "upload", upload.file.read()) for upload in images],
            session=session,
            actor=caller.actor,
            category=category,
            source=ImageSource.mobile,
            device_id=device_id,
            archives=False,
        )
        if len(report.refused) == len(report.results):
            raise InvalidImageError("; ".join(r.reason for r in report.refused))
    return UploadResponse(
        category=category.strip(),
        device_id=device_id,
        stored=report.count("stored"),
        duplicates=report.count("duplicate"),
        refused=report.count("refused"),
        message=f"{report.summary()}; new images wait for review",
        results=[asdict(r) for r in report.results],
    )


@router.get("/categories/", tags=["images"])
def list_categories(caller: Reader) -> CategoryList:
    """Category names (for the phone's picker) and their validated image counts."""
    with read_session() as session:
        counts = review.validated_counts(session=session)
    return CategoryList(categories=[{"name": name, "validated_images": n} for name, n in counts.items()])


@router.get("/health/", tags=["health"], response_model=Health, responses={503: {"model": Health}})
def health() -> Health | JSONResponse:
    """No token needed: is the database reachable, can the queue be written
    and does it hold every queued job, is there free disk space?"""
    settings = get_settings()
    report = {"status": "ok", "database": "ok", "queue": "ok", "disk": "ok"}
    problems = []
    try:
        with read_session() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        log.warning("health: database unreachable", exc_info=True)
        report |= {"status": "unavailable", "database": f"unreachable: {exc}"}
    try:
        report |= jobs.queue_health()
    except Exception as exc:
        log.warning("health: queue not usable", exc_info=True)
        report |= {"status": "unavailable", "queue": f"not writable or unreachable: {exc}"}
    else:
        if report["missing_from_queue"]:
            report["queue"] = "missing jobs"
            problems.append(
                f"{report['missing_from_queue']} queued job(s) are missing from the queue; "
                "a running worker enqueues them (python -m cli worker)"
            )
    report["free_disk_bytes"] = free_bytes(settings.images_dir)
    if report["free_disk_bytes"] < settings.min_free_disk_bytes:
        report["disk"] = "low"
        problems.append(
            f"{report['free_disk_bytes'] / 2**20:,.0f} MB free in DATA_DIR, under MIN_FREE_DISK_BYTES "
            f"({settings.min_free_disk_bytes / 2**20:,.0f} MB): uploads and training will soon fail"
        )
    if report["status"] != "ok":
        return JSONResponse(report | {"detail": "The service is not ready"}, status_code=503)
    if problems:
        report |= {"status": "degraded", "detail": "; ".join(problems)}
    return Health(**report)
