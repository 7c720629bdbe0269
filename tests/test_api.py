"""The HTTP API through real HTTP requests: in-process, and as `make run` serves it."""

import hashlib
import json
import re
import stat
import subprocess
from datetime import timedelta

import httpx
import pytest
from sqlmodel import select

from core import review
from core.db import read_session
from core.models import ApiToken, ImageSource, ImageStatus, RoundStatus, TrainingImage, TrainingRound, utcnow
from tests.conftest import wait_for
from tests.factories import add_demo, add_fake_version, add_images, add_token, as_actor, distinct_images, image_bytes
from tests.servers import run_cli, start_api, start_app


@pytest.fixture
def client(data_dir):
    from fastapi.testclient import TestClient

    # Imported after DATA_DIR is set, so the queue file lands in the test's folder.
    from api.app import app

    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def tokens(session):
    """Authorization headers per role."""
    return {role: add_token(session, role) for role in ("device", "viewer", "operator", "admin")}


# --- health and access --------------------------------------------------------


def test_health_needs_no_token_and_reports_database_queue_and_disk(client, data_dir):
    import shutil

    response = client.get("/health/")
    assert response.status_code == 200
    body = response.json()
    free = body.pop("free_disk_bytes")
    assert abs(free - shutil.disk_usage(data_dir).free) < 2**30
    assert body == {
        "status": "ok",
        "database": "ok",
        "queue": "ok",
        "queued_jobs": 0,
        "missing_from_queue": 0,
        "disk": "ok",
        "detail": None,
    }


def test_health_is_unavailable_when_the_queue_cannot_be_written(client, monkeypatch):
    import sqlite3

    import jobs

    def unwritable(*args):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(jobs.huey.storage, "put_data", unwritable)
    response = client.get("/health/")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["queue"] == "not writable or unreachable: attempt to write a readonly database"


def test_health_is_degraded_while_queued_jobs_are_missing_from_the_queue(client, session, monkeypatch):
    from core.config import get_settings
    from core.training.rounds import start_training

    monkeypatch.setenv("HEARTBEAT_TIMEOUT", "0.1")  # the sweep's grace
    get_settings.cache_clear()
    add_demo(session, per_category=10)
    start_training({"epochs": 1}, session=session)  # recorded, never enqueued
    session.commit()
    wait_for(lambda: client.get("/health/").json()["missing_from_queue"] == 1, timeout=5)
    body = client.get("/health/").json()
    assert (body["status"], body["queue"], body["queued_jobs"]) == ("degraded", "missing jobs", 0)
    assert "1 queued job(s) are missing from the queue" in body["detail"]


def test_health_is_degraded_when_free_disk_space_is_under_the_threshold(client, monkeypatch):
    from core.config import get_settings

    monkeypatch.setenv("MIN_FREE_DISK_BYTES", str(2**60))
    get_settings.cache_clear()
    body = client.get("/health/").json()
    assert (body["status"], body["disk"]) == ("degraded", "low")
    assert "under MIN_FREE_DISK_BYTES" in body["detail"]


@pytest.fixture
def full_images_disk(data_dir):
    """DATA_DIR/images on a real filesystem (a 1 MB tmpfs) that is full."""
    folder = data_dir / "images"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        try:
            with open(folder / "filler", "wb") as fh:
                while True:
                    fh.write(bytes(4096))
                    fh.flush()
        except OSError:  # full
            pass
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


@pytest.mark.parametrize(
    "route", ["/categories/", "/models/latest/", "/models/download/", "/models/training-status/x/"]
)
def test_reading_without_a_token_is_401_saying_how_to_send_one(client, route):
    response = client.get(route)
    assert response.status_code == 401
    assert response.json() == {"detail": "Missing API token: send the header 'Authorization: Bearer <token>'"}
    assert response.headers["www-authenticate"] == "Bearer"


def test_unknown_revoked_and_expired_tokens_are_401_naming_neither_the_token_nor_its_holder(client, session):
    from core.tokens import revoke_token

    response = client.get("/categories/", headers={"Authorization": "Bearer tdb_not-a-real-token"})
    assert response.status_code == 401 and "Unknown API token" in response.json()["detail"]
    response = client.get("/categories/", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401 and "Missing API token" in response.json()["detail"]

    revoked = add_token(session, "viewer", label="old phone")
    assert client.get("/categories/", headers=revoked).status_code == 200
    revoke_token(1, session=session, actor=as_actor())
    session.commit()
    response = client.get("/categories/", headers=revoked)
    assert response.status_code == 401
    assert response.json()["detail"] == "This API token is revoked or expired: ask for a new one"

    expired = add_token(session, "viewer", label="temp", expires_days=1)
    assert client.get("/categories/", headers=expired).status_code == 200
    from core.models import ApiToken

    token = session.get(ApiToken, 2)
    token.expires_at = utcnow() - timedelta(minutes=1)
    session.add(token)
    session.commit()
    response = client.get("/categories/", headers=expired)
    assert response.status_code == 401
    assert response.json()["detail"] == "This API token is revoked or expired: ask for a new one"


def test_a_token_label_longer_than_its_bound_is_refused(session):
    from core.errors import UserError
    from core.tokens import create_token

    with pytest.raises(UserError, match="A token label can be at most 100 characters"):
        create_token(session=session, actor=as_actor(), role="device", label="x" * 101)


def test_a_token_records_when_it_was_last_used(client, session):
    from core.models import ApiToken

    headers = add_token(session, "viewer")
    # Reads go through read_session: the fixture's session would take the write lock.
    with read_session() as reader:
        assert reader.get(ApiToken, 1).last_used_at is None
    client.get("/categories/", headers=headers)
    with read_session() as reader:
        assert reader.get(ApiToken, 1).last_used_at is not None


@pytest.mark.parametrize(
    ("role", "method", "route", "allowed"),
    [
        ("viewer", "post", "/models/train/", False),
        ("device", "post", "/models/train/", False),
        ("viewer", "post", "/models/training/x/cancel/", False),
        ("device", "post", "/models/training/x/cancel/", False),
        ("viewer", "post", "/models/training/x/stop/", False),
        ("viewer", "post", "/images/", False),
        ("operator", "post", "/images/", True),
        ("device", "get", "/models/latest/", True),
        ("viewer", "get", "/categories/", True),
        ("operator", "post", "/models/train/", True),
        ("admin", "post", "/models/train/", True),
        ("admin", "post", "/images/", True),
    ],
)
def test_each_role_may_do_only_its_part(client, tokens, role, method, route, allowed):
    response = getattr(client, method)(route, headers=tokens[role])
    if allowed:
        # Through the role check; what follows (no model, no images, no files) is another 4xx.
        assert response.status_code not in (401, 403), response.text
    else:
        assert response.status_code == 403
        assert response.json()["detail"].startswith(f"The role '{role}' may not ")
        assert "roles that may:" in response.json()["detail"]


# --- training -----------------------------------------------------------------


def test_training_without_enough_validated_images_gives_the_counts(client, session, tokens):
    add_images(session, {"cat": 3, "dog": 2})
    response = client.post("/models/train/", json={}, headers=tokens["operator"])
    assert response.status_code == 400
    assert "Training needs at least 50 validated images; there are 5. Validate 45 more." in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "status", "detail"),
    [
        ({"epochs": 0}, 400, "epochs must be between 1 and 500 (got 0)"),
        ({"batch_size": 5000}, 400, "batch_size must be between 2 and 1,024 (got 5000)"),
        ({"learning_rate": 2}, 400, "learning_rate must be between 1e-06 and 1 (got 2.0)"),
        ({"architecture": "vgg"}, 400, "architecture must be one of mobilenet_v3_small, resnet18, efficientnet_b0"),
        ({"processes": 5}, 400, "processes must be between 1 and MAX_TRAINING_PROCESSES=4 (got 5)"),
        ({"processes": 2, "training_mode": "head"}, 400, "Training mode head runs in one process"),
        (
            {"training_mode": "auto", "budget_minutes": 0.05},
            400,
            "budget_minutes must be between 0.1 and 1,440 (got 0.05)",
        ),
        ({"budget_minutes": 5}, 400, "A time budget applies to training mode auto only"),
        ({"training_mode": "auto", "budget_minutes": "ten"}, 422, "budget_minutes: Input should be a valid number"),
        ({"epochs": 2.5}, 422, "epochs: Input should be a valid integer"),
        ({"learning_rate": "fast"}, 422, "learning_rate: Input should be a valid number"),
        ({"momentum": 0.9}, 400, "Unknown parameter(s) momentum; allowed:"),
        ({"image_size": 8}, 400, "image_size must be between 32 and 512 (got 8)"),
        ({"image_size": "big"}, 422, "image_size: Input should be a whole number of pixels or 'auto'"),
        ([20, 32], 422, "request body: Input should be a valid dictionary"),
    ],
)
def test_training_parameters_out_of_range_name_the_field_and_range(client, tokens, body, status, detail):
    response = client.post("/models/train/", json=body, headers=tokens["operator"])
    assert response.status_code == status
    assert detail in response.json()["detail"]
    if status == 422 and isinstance(body, dict):
        # FastAPI's own validation errors say what to fix too, range included.
        assert "between" in response.json()["detail"]


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({"epochs": True}, "epochs: Input should be a valid integer"),
        ({"batch_size": False}, "batch_size: Input should be a valid integer"),
        ({"learning_rate": True}, "learning_rate: Input should be a valid number"),
        ({"epochs": "5"}, "epochs: Input should be a valid integer"),
        ({"use_existing_model": 1}, "use_existing_model: Input should be a valid boolean"),
        ({"architecture": 5}, "architecture: Input should be a valid string"),
        (None, "The request body must be a JSON object"),
        ("20", "request body: Input should be a valid dictionary"),
    ],
)
def test_loose_json_is_refused_and_queues_nothing(client, session, tokens, body, detail):
    add_demo(session, per_category=10, size=16)
    response = client.post(
        "/models/train/",
        content=json.dumps(body),
        headers={**tokens["operator"], "Content-Type": "application/json"},
    )
    assert response.status_code == 422, response.text
    assert detail in response.json()["detail"]
    with read_session() as reader:
        assert reader.exec(select(TrainingRound)).first() is None


def test_a_body_that_is_not_json_is_422_saying_so(client, tokens):
    response = client.post(
        "/models/train/", content=b"{epochs: 5", headers={**tokens["operator"], "Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"].startswith("The request body is not valid JSON (")


def test_a_queued_job_has_the_original_shapes_and_can_be_cancelled(client, session, tokens):
    add_demo(session, per_category=10, size=16)
    response = client.post("/models/train/", json={"epochs": 3, "batch_size": 16}, headers=tokens["operator"])
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["message"] == "Training job started with 50 images"
    assert body["training_round_id"] == 1
    assert {k: body["parameters"][k] for k in ("epochs", "batch_size", "learning_rate", "use_existing_model")} == {
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 0.001,
        "use_existing_model": True,
    }
    job_id = body["job_id"]
    with read_session() as reader:
        round_ = reader.exec(select(TrainingRound)).one()
    assert round_.requested_by == "api:test operator"

    status = client.get(f"/models/training-status/{job_id}/", headers=tokens["device"]).json()
    assert status["status"] == "queued" and status["queue_status"] == status["celery_status"] == "PENDING"
    assert status["start_time"] is None and status["progress"] == 0 and status["epoch_metrics"] == []
    assert status["total_epochs"] == 3
    assert status["metrics"]["total_images"] == 50
    assert sum(status["metrics"]["category_distribution"].values()) == 50

    response = client.post(f"/models/training/{job_id}/cancel/", headers=tokens["operator"])
    assert response.status_code == 200
    assert response.json() | {"message": ""} == {
        "job_id": job_id,
        "training_round_id": 1,
        "status": "cancelled",
        "queue_status": "REVOKED",
        "message": "",
    }
    response = client.post(f"/models/training/{job_id}/cancel/", headers=tokens["operator"])
    assert response.status_code == 409
    assert "already cancelled" in response.json()["detail"]


def test_stop_asks_a_running_job_to_keep_its_best_epoch_and_answers_like_cancel(client, session, tokens):
    from core.training.rounds import start_training

    add_demo(session, per_category=10, size=16)
    running = start_training({"epochs": 3}, session=session, requested_by="x")
    running.status = RoundStatus.in_progress
    session.add(running)
    session.commit()
    response = client.post(f"/models/training/{running.job_id}/stop/", headers=tokens["operator"])
    assert response.status_code == 200
    assert response.json() == {
        "job_id": running.job_id,
        "training_round_id": running.id,
        "status": "in_progress",
        "queue_status": "STARTED",
        "message": "Stop requested: the job stops after its current batch and registers its best epoch so far",
    }
    with read_session() as reader:
        stopped = reader.get(TrainingRound, running.id)
    assert stopped.stop_requested and not stopped.cancel_requested


def test_image_size_is_chosen_from_the_images_unless_given(client, session, tokens):
    add_images(session, {"cat": 25, "dog": 25}, size=(100, 60))
    for body, size in (({}, 64), ({"image_size": "auto"}, 64), ({"image_size": 96}, 96)):
        response = client.post("/models/train/", json=body, headers=tokens["operator"])
        assert response.status_code == 202
        assert response.json()["parameters"]["image_size"] == size
        chosen = [w for w in response.json()["warnings"] if w.startswith("Image size auto: 64 px")]
        assert len(chosen) == (size == 64)


def test_defaults_are_the_original_ones_when_the_body_is_empty(client, session, tokens):
    add_demo(session, per_category=10, size=16)
    response = client.post("/models/train/", headers=tokens["admin"])
    assert response.status_code == 202
    params = response.json()["parameters"]
    assert (params["epochs"], params["batch_size"], params["learning_rate"], params["use_existing_model"]) == (
        20,
        32,
        0.001,
        True,
    )


def test_unknown_job_id_is_404(client, tokens):
    response = client.get("/models/training-status/no-such-job/", headers=tokens["viewer"])
    assert response.status_code == 404
    assert response.json() == {"detail": "No training job with id 'no-such-job'"}
    # Digits that are not ASCII, or too many for the database's integer, are just unknown ids.
    for odd in ("①", "²", "99999999999999999999999"):
        response = client.get(f"/models/training-status/{odd}/", headers=tokens["viewer"])
        assert response.status_code == 404, (odd, response.text)
    response = client.post("/models/training/no-such-job/cancel/", headers=tokens["operator"])
    assert response.status_code == 404


def test_a_running_job_reports_epoch_progress_and_the_metrics_so_far(client, session, tokens):
    from core.models import EpochMetric

    running = TrainingRound(
        status=RoundStatus.in_progress,
        parameters={"epochs": 4},
        started_at=utcnow(),
        attempts=1,
        current_epoch=2,
        current_batch=3,
        total_batches=4,
        progress=0.4375,
        total_images=60,
        category_distribution={"cat": 30, "dog": 30},
    )
    session.add(running)
    session.flush()
    session.add(
        EpochMetric(
            round_id=running.id,
            epoch=1,
            train_loss=0.9,
            train_accuracy=61.0,
            val_loss=1.1,
            val_accuracy=55.0,
            learning_rate=0.001,
            seconds=2.5,
        )
    )
    session.commit()
    status = client.get(f"/models/training-status/{running.job_id}/", headers=tokens["device"]).json()
    assert status["status"] == "in_progress" and status["queue_status"] == status["celery_status"] == "STARTED"
    assert (status["current_epoch"], status["total_epochs"], status["progress"]) == (2, 4, 0.4375)
    assert (status["current_batch"], status["total_batches"], status["attempts"]) == (3, 4, 1)
    assert status["epoch_metrics"] == [
        {
            "epoch": 1,
            "train_loss": 0.9,
            "train_accuracy": 61.0,
            "val_loss": 1.1,
            "val_accuracy": 55.0,
            "learning_rate": 0.001,
            "seconds": 2.5,
        }
    ]
    assert status["metrics"] == {"total_images": 60, "category_distribution": {"cat": 30, "dog": 30}}
    assert status["model_version"] is None and status["error"] is None

    cancel = client.post(f"/models/training/{running.job_id}/cancel/", headers=tokens["admin"]).json()
    assert (cancel["status"], cancel["queue_status"]) == ("in_progress", "STARTED")
    assert cancel["message"] == "Cancel requested: the job stops after its current batch"
    status = client.get(f"/models/training-status/{running.job_id}/", headers=tokens["device"]).json()
    assert status["cancel_requested"] is True


def test_completed_and_failed_jobs_report_their_outcome(client, session, tokens):
    version = add_fake_version(session)
    # 38 of 40 validation and 41 of 45 test images right; the commonest test category has 23.
    version.metrics = {**version.metrics, "val_images": 40, "test_accuracy": 91.11, "test_images": 45}
    version.metrics |= {"test_correct": 41, "test_majority": 23}
    start = utcnow() - timedelta(minutes=15)
    done = TrainingRound(
        status=RoundStatus.completed,
        parameters={"epochs": 2},
        total_images=60,
        category_distribution={"cat": 30, "dog": 30},
        started_at=start,
        finished_at=start + timedelta(minutes=15, seconds=18),
        model_version_id=version.id,
        progress=1.0,
    )
    failed = TrainingRound(status=RoundStatus.failed, error="RuntimeError: out of memory", parameters={"epochs": 2})
    session.add_all([done, failed])
    session.commit()

    status = client.get(f"/models/training-status/{done.job_id}/", headers=tokens["viewer"]).json()
    assert status["status"] == "completed" and status["queue_status"] == status["celery_status"] == "SUCCESS"
    assert status["model_version"] == "1.0.0" and status["model_version_id"] == version.id
    assert status["accuracy"] == 95.5 and status["duration_minutes"] == 15.3
    assert status["metrics"] == {
        "total_images": 60,
        "category_distribution": {"cat": 30, "dog": 30},
        "train_accuracy": 98.2,
        "val_accuracy": 95.5,
        "val_images": 40,
        "val_correct": 38,
        "val_accuracy_ci95_low": 83.5,
        "val_accuracy_ci95_high": 98.6,
        "test_accuracy": 91.11,
        "test_images": 45,
        "test_correct": 41,
        "test_accuracy_ci95_low": 79.3,
        "test_accuracy_ci95_high": 96.5,
        "near_chance": False,
        "model_size_mb": 8.1,
    }
    assert status["start_time"].endswith("Z")

    status = client.get(f"/models/training-status/{failed.job_id}/", headers=tokens["viewer"]).json()
    assert status["status"] == "failed" and status["queue_status"] == "FAILURE"
    assert status["error"] == "RuntimeError: out of memory"


# --- models -------------------------------------------------------------------


def test_latest_without_a_production_model_is_404_saying_why(client, session, tokens):
    response = client.get("/models/latest/", headers=tokens["device"])
    assert response.status_code == 404
    assert response.json() == {"detail": "No model is in production yet: train a model first"}
    add_fake_version(session, "1.0.0", production=False)
    response = client.get("/models/latest/", headers=tokens["device"])
    assert response.json() == {"detail": "No model is in production yet: promote one of 1.0.0"}
    assert client.get("/models/download/", headers=tokens["device"]).status_code == 404


def test_latest_describes_the_production_model_and_links_its_files(client, session, tokens):
    add_fake_version(session, "1.0.0", production=False, classes=["b", "a"])
    add_fake_version(session, "1.1.0", production=True, classes=["zebra", "apple"])
    manifest = client.get("/models/latest/", headers=tokens["device"]).json()
    assert manifest["version"] == "1.1.0"
    assert manifest["classes"] == ["zebra", "apple"] and manifest["num_classes"] == 2
    assert manifest["input"]["shape"] == [1, 3, 32, 32]
    assert manifest["input"]["mean"] == [0.485, 0.456, 0.406] and manifest["input"]["std"] == [0.229, 0.224, 0.225]
    assert manifest["metrics"] == {  # a version without counts: none are made up
        "train_accuracy": 98.2,
        "val_accuracy": 95.5,
        "val_images": 0,
        "val_correct": None,
        "val_accuracy_ci95_low": None,
        "val_accuracy_ci95_high": None,
        "test_accuracy": None,
        "test_images": 0,
        "test_correct": None,
        "test_accuracy_ci95_low": None,
        "test_accuracy_ci95_high": None,
        "near_chance": None,
        "model_size_mb": 8.1,
    }
    assert [a["format"] for a in manifest["artifacts"]] == ["ptl", "pte"]
    for artifact in manifest["artifacts"]:
        assert artifact["filename"] == f"model_1.1.0.{artifact['format']}"
        # Relative without PUBLIC_URL: the request's Host header plays no part.
        assert artifact["url"] == f"/models/download/?version=1.1.0&format={artifact['format']}"
        assert artifact["runtime"]
        response = client.get(artifact["url"], headers=tokens["device"])
        assert response.status_code == 200
        assert hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert len(response.content) == artifact["size_bytes"]


def test_manifest_links_follow_public_url_never_the_host_header(client, session, tokens, monkeypatch):
    from core.config import get_settings

    add_fake_version(session)
    forged = {**tokens["device"], "Host": "evil.example"}
    url = client.get("/models/latest/", headers=forged).json()["artifacts"][0]["url"]
    assert url == "/models/download/?version=1.0.0&format=ptl"
    monkeypatch.setenv("PUBLIC_URL", "https://train.example.com/")
    get_settings.cache_clear()
    url = client.get("/models/latest/", headers=forged).json()["artifacts"][0]["url"]
    assert url == "https://train.example.com/models/download/?version=1.0.0&format=ptl"


def test_public_url_must_be_an_http_address(monkeypatch):
    from pydantic import ValidationError

    from core.config import Settings

    monkeypatch.setenv("PUBLIC_URL", "evil.example")
    with pytest.raises(ValidationError, match="PUBLIC_URL must be empty or an http"):
        Settings()


@pytest.mark.parametrize("version", ["99999999999999999999.0.0", "1.0.²", "1.0.①", "1.0", "1.0.0.0", "v1.x.0"])
def test_odd_version_strings_are_400_saying_the_form(client, session, tokens, version):
    add_fake_version(session)
    response = client.get("/models/download/", params={"version": version}, headers=tokens["device"])
    assert response.status_code == 400, response.text
    assert "is not a version: use MAJOR.MINOR.PATCH" in response.json()["detail"]


def test_download_sends_the_file_with_etag_and_answers_304_when_the_phone_has_it(client, session, tokens):
    version = add_fake_version(session)
    sha = version.artifacts[0]["sha256"]
    response = client.get("/models/download/", headers=tokens["device"])
    assert response.status_code == 200
    assert response.headers["content-disposition"] == 'attachment; filename="model_1.0.0.ptl"'
    assert response.headers["etag"] == f'"{sha}"'
    assert response.headers["content-type"] == "application/octet-stream"
    assert hashlib.sha256(response.content).hexdigest() == sha

    for value in (f'"{sha}"', f'W/"{sha}"', f'"other", "{sha}"', sha, "*"):
        cached = client.get("/models/download/", headers={**tokens["device"], "If-None-Match": value})
        assert cached.status_code == 304, value
        assert cached.content == b"" and cached.headers["etag"] == f'"{sha}"'
    stale = client.get("/models/download/", headers={**tokens["device"], "If-None-Match": '"an-older-model"'})
    assert stale.status_code == 200 and stale.content == response.content

    pte = client.get("/models/download/?version=1.0.0&format=pte", headers=tokens["device"])
    assert pte.status_code == 200
    assert pte.headers["content-disposition"] == 'attachment; filename="model_1.0.0.pte"'


@pytest.mark.parametrize(
    ("query", "status", "detail"),
    [
        ("version=9.9.9", 404, "No model version 9.9.9. Known versions: 1.0.0"),
        ("format=onnx", 404, "Model 1.0.0 has no 'onnx' file; its formats: ptl, pte"),
        ("version=latest", 400, "'latest' is not a version: use MAJOR.MINOR.PATCH (each at most 6 digits), e.g. 1.0.0"),
    ],
)
def test_unknown_version_or_format_is_a_clear_error(client, session, tokens, query, status, detail):
    add_fake_version(session)
    response = client.get(f"/models/download/?{query}", headers=tokens["device"])
    assert response.status_code == status
    assert response.json() == {"detail": detail}


# --- images and categories -----------------------------------------------------


def _files(*items: tuple[str, bytes]) -> list:
    return [("images", (name, data, "application/octet-stream")) for name, data in items]


def test_phone_upload_answers_per_file_and_leaves_new_images_pending(client, session, tokens):
    add_images(session, {"cat": 1, "dog": 1})
    first, second = distinct_images(4)[2:]
    with read_session() as reader:
        existing = reader.exec(select(TrainingImage).order_by(TrainingImage.id)).first()
    response = client.post(
        "/images/",
        data={"category": "cat", "device_id": "pixel-7"},
        files=_files(
            ("a.png", first),
            ("b.png", second),
            ("again.png", distinct_images(1)[0]),
            ("notes.txt", b"hello"),
        ),
        headers=tokens["device"],
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["stored"], body["duplicates"], body["refused"]) == (2, 1, 1)
    assert body["category"] == "cat" and body["device_id"] == "pixel-7"
    outcomes = {r["filename"]: r for r in body["results"]}
    assert outcomes["again.png"] == {
        "filename": "again.png",
        "outcome": "duplicate",
        "image_id": existing.id,
        "reason": None,
    }
    assert outcomes["notes.txt"]["outcome"] == "refused"
    assert "not an image" in outcomes["notes.txt"]["reason"]
    new = [session.get(TrainingImage, outcomes[name]["image_id"]) for name in ("a.png", "b.png")]
    for image in new:
        assert image.status == ImageStatus.pending
        assert image.source == ImageSource.mobile
        assert image.device_id == "pixel-7"
        assert image.uploaded_by == "api:test device"


def test_upload_refuses_an_unknown_category_naming_the_known_ones(client, session, tokens):
    add_images(session, {"cat": 1, "dog": 1})
    response = client.post(
        "/images/", data={"category": "cta"}, files=_files(("a.png", image_bytes())), headers=tokens["device"]
    )
    assert response.status_code == 400
    assert response.json() == {"detail": "Unknown category 'cta'. Known categories: cat, dog"}


def test_upload_of_files_that_are_not_images_is_422(client, session, tokens):
    add_images(session, {"cat": 1})
    response = client.post(
        "/images/",
        data={"category": "cat"},
        files=_files(("photo.jpg", b"\xff\xd8 not really a jpeg"), ("empty.png", b"")),
        headers=tokens["device"],
    )
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "photo.jpg: not an image" in detail and "empty.png: the file is empty" in detail
    assert session.exec(select(TrainingImage)).all()[1:] == []


def test_upload_over_the_size_limit_is_413_and_stores_nothing(client, session, tokens, monkeypatch):
    from core.config import get_settings

    add_images(session, {"cat": 1})
    monkeypatch.setenv("MAX_UPLOAD_BYTES", "2048")
    get_settings.cache_clear()
    big = image_bytes(size=(256, 256), fmt="BMP")
    response = client.post(
        "/images/",
        data={"category": "cat"},
        files=_files(("small.png", distinct_images(3)[2]), ("big.bmp", big)),
        headers=tokens["device"],
    )
    assert response.status_code == 413
    assert response.json() == {"detail": f"big.bmp: the file is {len(big) / 2**20:.1f} MB; the limit is 0.0 MB"}
    assert len(session.exec(select(TrainingImage)).all()) == 1


def test_upload_on_a_full_disk_is_507_with_a_message_and_stores_nothing(client, session, tokens, full_images_disk):
    review.add_category("cat", session=session, actor=as_actor())
    session.commit()
    first, second = distinct_images(2, size=(48, 48))
    response = client.post(
        "/images/",
        data={"category": "cat"},
        files=_files(("a.png", first), ("b.png", second)),
        headers=tokens["device"],
    )
    assert response.status_code == 507
    assert "disk is full" in response.json()["detail"] and "nothing was stored" in response.json()["detail"]
    assert session.exec(select(TrainingImage)).all() == []
    assert [p.name for p in full_images_disk.rglob("*") if p.is_file()] == ["filler"]


def test_a_device_id_longer_than_its_bound_is_refused_and_nothing_is_stored(client, session, tokens):
    add_images(session, {"cat": 1})
    response = client.post(
        "/images/",
        data={"category": "cat", "device_id": "x" * 200_000},
        files=[("images", ("a.png", image_bytes((1, 2, 3)), "image/png"))],
        headers=tokens["device"],
    )
    assert response.status_code == 400
    assert response.json()["detail"] == "device_id can be at most 100 characters (got 200000)"
    with read_session() as reader:
        assert len(reader.exec(select(TrainingImage)).all()) == 1


def test_upload_without_files_or_category_says_which_field_is_missing(client, tokens):
    response = client.post("/images/", data={"device_id": "x"}, headers=tokens["device"])
    assert response.status_code == 422
    assert response.json() == {"detail": "images: Field required; category: Field required"}


def test_categories_list_names_and_validated_counts(client, session, tokens):
    add_images(session, {"cat": 2, "dog": 1})
    review.add_category("bird", session=session, actor=as_actor())
    session.commit()
    response = client.get("/categories/", headers=tokens["device"])
    assert response.json() == {
        "categories": [
            {"name": "bird", "validated_images": 0},
            {"name": "cat", "validated_images": 2},
            {"name": "dog", "validated_images": 1},
        ]
    }


def test_openapi_document_lists_every_route_with_bearer_auth(client):
    document = client.get("/openapi.json").json()
    assert set(document["paths"]) == {
        "/models/train/",
        "/models/training-status/{job_id}/",
        "/models/training/{job_id}/cancel/",
        "/models/training/{job_id}/stop/",
        "/models/latest/",
        "/models/download/",
        "/images/",
        "/categories/",
        "/health/",
        "/federated/plan/",
        "/federated/plans/{plan_id}/files/{name}",
        "/federated/updates/",
    }
    assert document["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    train = document["components"]["schemas"]["TrainRequest"]["properties"]
    assert (train["epochs"]["default"], train["batch_size"]["default"]) == (20, 32)
    assert "between 1 and 500" in train["epochs"]["description"]
    status = document["components"]["schemas"]["TrainingStatus"]
    assert "celery_status" in status["required"]
    assert "kept for apps written for the original pipeline" in status["properties"]["celery_status"]["description"]


def test_api_docs_false_turns_off_the_docs_and_the_openapi_document(data_dir, monkeypatch):
    from fastapi.testclient import TestClient

    from api.app import create_app
    from core.config import get_settings

    monkeypatch.setenv("API_DOCS", "false")
    get_settings.cache_clear()
    with TestClient(create_app()) as client:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 404, path
        assert client.get("/health/").status_code == 200


# --- the combined app: dashboard and API on one port ------------------------------


def test_combined_app_serves_the_dashboard_and_the_api_under_api(data_dir, session):
    from starlette.testclient import TestClient

    from server import app

    headers = add_token(session, "viewer")
    # Streamlit's runtime is a process-wide singleton: start the combined app once per test process.
    with TestClient(app) as combined:
        assert combined.get("/api/health/").json()["status"] == "ok"
        assert combined.get("/api/categories/", headers=headers).json() == {"categories": []}
        assert combined.get("/api/categories/").status_code == 401
        redirect = combined.get("/api/health", follow_redirects=False)
        assert redirect.status_code == 307 and redirect.headers["location"].endswith("/api/health/")
        assert "/api/openapi.json" in combined.get("/api/docs").text
        assert combined.get("/api/openapi.json").json()["info"]["title"] == "Training dashboard API"
        dashboard = combined.get("/")
        assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
        add_fake_version(session)
        url = combined.get("/api/models/latest/", headers=headers).json()["artifacts"][0]["url"]
        assert url == "/api/models/download/?version=1.0.0&format=ptl"
        assert combined.get(url, headers=headers).content == b"stand-in ptl of 1.0.0"


# --- the server as `make run` starts it ---------------------------------------------


def test_make_run_serves_dashboard_and_api_on_one_port(data_dir, tmp_path):
    created = run_cli("token", "create", "--role", "viewer", "--label", "ci phone").stdout
    assert "Token 1 for 'ci phone' (role viewer)" in created
    secret = created.strip().splitlines()[-1]
    assert secret.startswith("tdb_")
    listed = run_cli("token", "list").stdout
    assert "ci phone" in listed and secret not in listed

    server = start_app(data_dir, tmp_path / "serve.log")
    base = server.url
    port = base.rpartition(":")[2]
    try:
        assert httpx.get(f"{base}/api/health/").json()["database"] == "ok"
        auth = {"Authorization": f"Bearer {secret}"}
        response = httpx.get(f"{base}/api/categories/", headers=auth)
        assert response.status_code == 200 and response.json() == {"categories": []}
        assert httpx.get(f"{base}/api/categories/").status_code == 401
        assert httpx.get(f"{base}/api/models/latest/", headers=auth).status_code == 404
        assert httpx.post(f"{base}/api/models/train/", headers=auth).status_code == 403
        assert httpx.get(f"{base}/api/openapi.json").json()["info"]["title"] == "Training dashboard API"
        docs = httpx.get(f"{base}/api/docs").text
        assert "/api/openapi.json" in docs
        # The docs' scripts and styles come from this server, not a CDN.
        assets = re.findall(r'(?:src|href)="([^"]+)"', docs)
        assert assets and all(a.startswith("/api/") for a in assets), assets
        assert all(httpx.get(f"{base}{a}").status_code == 200 for a in assets)
        dashboard = httpx.get(f"{base}/")
        assert dashboard.status_code == 200 and "<html" in dashboard.text.lower()
        assert httpx.get(f"{base}/_stcore/health").text == "ok"
        assert httpx.get(f"{base}/_stcore/metrics").status_code == 404
        for answer in (dashboard, httpx.get(f"{base}/api/health/"), response):
            assert answer.headers["x-frame-options"] == "DENY"
            assert answer.headers["x-content-type-options"] == "nosniff"
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"]
            assert "img-src 'self' data: blob: https://fonts.gstatic.com;" in answer.headers["content-security-policy"]

        run_cli("token", "revoke", "1")
        assert httpx.get(f"{base}/api/categories/", headers=auth).status_code == 401
    finally:
        server.stop()
    output = (tmp_path / "serve.log").read_text()
    assert f"Training dashboard: open http://localhost:{port} in your browser" in output
    assert "worker consuming" in output
    # The first admin's password: in a file only the owner may read, its path printed, never the password.
    saved = data_dir / "first_admin_password.txt"
    assert f"with the password in {saved}" in output
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    password = saved.read_text().strip()
    assert len(password) >= 12 and password not in output
    with read_session() as reader:
        from core import users

        assert users.sign_in("admin", password, session=reader).role == "admin"


# --- limits before the body: a real server on loopback, bodies streamed ----------


@pytest.fixture
def api_server(data_dir, tmp_path, monkeypatch):
    """`uvicorn api.app:app` on a free loopback port, with MAX_REQUEST_BYTES of 1 MB."""
    server = start_api(data_dir, tmp_path / "api.log", MAX_REQUEST_BYTES=str(2**20), MAX_UPLOAD_FILES="3")
    try:
        yield server.url
    finally:
        server.stop()


class Endless:
    """A request body streamed in 64 KB chunks up to `total` bytes, counting what was taken."""

    def __init__(self, total: int, prefix: bytes = b""):
        self.total, self.prefix, self.sent = total, prefix, 0

    def __iter__(self):
        yield self.prefix
        self.sent += len(self.prefix)
        while self.sent < self.total:
            self.sent += 65536
            yield b" " * 65536


def test_a_body_without_a_token_is_refused_before_it_is_read(api_server):
    body = Endless(200 * 2**20, prefix=b'{"epochs": 1, "pad": "')
    response = httpx.post(
        f"{api_server}/models/train/", content=body, headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 401
    assert response.json() == {"detail": "Missing API token: send the header 'Authorization: Bearer <token>'"}
    # Only what the sockets buffered before the answer left the client: not 200 MB.
    assert body.sent < 32 * 2**20, body.sent


def test_a_json_body_streamed_past_its_limit_is_413_without_reading_the_rest(api_server, session, tokens):
    body = Endless(200 * 2**20, prefix=b'{"epochs": 1, "pad": "')
    response = httpx.post(
        f"{api_server}/models/train/",
        content=body,
        headers={**tokens["operator"], "Content-Type": "application/json"},
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {
        "detail": "The request body is over the limit of 16 KB (this route takes a few fields of JSON)"
    }
    assert body.sent < 32 * 2**20, body.sent
    assert session.exec(select(TrainingRound)).all() == []


def test_an_upload_over_max_request_bytes_is_413_by_its_length_or_as_it_streams(api_server, session, tokens):
    add_images(session, {"cat": 1})
    declared = httpx.post(
        f"{api_server}/images/",
        data={"category": "cat"},
        files=_files(("big.bmp", bytes(2 * 2**20))),
        headers=tokens["device"],
        timeout=60,
    )
    assert declared.status_code == 413
    assert declared.json()["detail"].startswith("The request body (2.0 MB) is over the limit of 1.0 MB")
    assert "MAX_REQUEST_BYTES: send the files in several requests" in declared.json()["detail"]
    boundary = b"xyzzy"
    head = b'--xyzzy\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
    streamed_body = Endless(200 * 2**20, prefix=head)
    streamed = httpx.post(
        f"{api_server}/images/",
        content=streamed_body,
        headers={**tokens["device"], "Content-Type": f"multipart/form-data; boundary={boundary.decode()}"},
        timeout=60,
    )
    assert streamed.status_code == 413 and "over the limit of 1.0 MB" in streamed.json()["detail"]
    assert streamed_body.sent < 32 * 2**20
    assert len(session.exec(select(TrainingImage)).all()) == 1


def test_an_upload_with_more_files_than_max_upload_files_is_413(api_server, session, tokens):
    add_images(session, {"cat": 1})
    response = httpx.post(
        f"{api_server}/images/",
        data={"category": "cat"},
        files=_files(*[(f"{i}.png", image) for i, image in enumerate(distinct_images(4))]),
        headers=tokens["device"],
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {
        "detail": "4 files in one request; the limit is 3 (MAX_UPLOAD_FILES): send them in several requests"
    }
    assert len(session.exec(select(TrainingImage)).all()) == 1


# --- cached answers (api/cached.py) -------------------------------------------


def _get_until_cached(client, url: str, headers: dict) -> dict:
    """A token's first request writes its `last_used_at`, the second caches
    the token, the third the answer."""
    for _ in range(3):
        answer = client.get(url, headers=headers).json()
    return answer


def _behind_the_orms_back(session, sql: str) -> None:
    """A change no session event sees (so no change stamp moves): what a
    cached answer keeps showing until a real change invalidates it."""
    session.connection().exec_driver_sql(sql)
    session.commit()


def test_latest_is_cached_until_a_promotion_or_a_rollback(client, session, tokens):
    from core import registry

    add_fake_version(session, "1.0.0", production=True)
    add_fake_version(session, "1.1.0", production=False)
    assert _get_until_cached(client, "/models/latest/", tokens["device"])["version"] == "1.0.0"
    _behind_the_orms_back(session, "UPDATE modelversion SET architecture = 'unseen'")
    assert client.get("/models/latest/", headers=tokens["device"]).json()["architecture"] == "mobilenet_v3_small"

    registry.promote("1.1.0", session=session, actor=as_actor())
    session.commit()
    manifest = client.get("/models/latest/", headers=tokens["device"]).json()
    assert (manifest["version"], manifest["architecture"]) == ("1.1.0", "unseen")

    registry.rollback(session=session, actor=as_actor())
    session.commit()
    assert client.get("/models/latest/", headers=tokens["device"]).json()["version"] == "1.0.0"


def test_a_new_version_invalidates_the_cached_manifest(client, session, tokens):
    add_fake_version(session, "1.0.0", production=True)
    assert _get_until_cached(client, "/models/latest/", tokens["device"])["version"] == "1.0.0"
    _behind_the_orms_back(session, "UPDATE modelversion SET architecture = 'unseen'")
    add_fake_version(session, "1.1.0", production=False)
    assert client.get("/models/latest/", headers=tokens["device"]).json()["architecture"] == "unseen"


def test_status_of_a_finished_job_is_cached_until_its_round_changes(client, session, tokens):
    version = add_fake_version(session)
    done = TrainingRound(status=RoundStatus.completed, parameters={"epochs": 2}, model_version_id=version.id)
    running = TrainingRound(status=RoundStatus.in_progress, parameters={"epochs": 2}, progress=0.25)
    session.add_all([done, running])
    session.commit()
    status = _get_until_cached(client, f"/models/training-status/{done.job_id}/", tokens["viewer"])
    assert (status["status"], status["error"]) == ("completed", None)
    _get_until_cached(client, f"/models/training-status/{running.job_id}/", tokens["viewer"])
    _behind_the_orms_back(session, "UPDATE traininground SET error = 'unseen', progress = 0.5")
    assert client.get(f"/models/training-status/{done.job_id}/", headers=tokens["viewer"]).json()["error"] is None
    # A running job's answer changes with every batch: never cached.
    assert client.get(f"/models/training-status/{running.job_id}/", headers=tokens["viewer"]).json()["progress"] == 0.5

    done.attempts = 2  # any change to a round, through any session
    session.add(done)
    session.commit()
    status = client.get(f"/models/training-status/{done.job_id}/", headers=tokens["viewer"]).json()
    assert (status["error"], status["attempts"]) == ("unseen", 2)


def test_cached_answers_still_check_the_callers_token(client, session, tokens):
    from core.tokens import revoke_token

    add_fake_version(session, "1.0.0", production=True)
    device = add_token(session, "device", label="soon revoked")
    for _ in range(3):
        assert client.get("/models/latest/", headers=device).status_code == 200
    assert client.get("/models/latest/").status_code == 401
    assert client.get("/models/latest/", headers={"Authorization": "Bearer tdb_wrong"}).status_code == 401
    token = session.exec(select(ApiToken).where(ApiToken.label == "soon revoked")).one()
    revoke_token(token.id, session=session, actor=as_actor())
    session.commit()
    response = client.get("/models/latest/", headers=device)
    assert response.status_code == 401
    assert response.json() == {"detail": "This API token is revoked or expired: ask for a new one"}


def test_manifest_lists_only_files_that_passed_their_parity_check(client, session, tokens):
    version = add_fake_version(session, "1.0.0", production=True)
    failed = {"passed": False, "top1_agreement": 0.5}
    version.artifacts = [a if a["format"] == "ptl" else a | {"parity": failed} for a in version.artifacts]
    session.add(version)
    session.commit()
    manifest = client.get("/models/latest/", headers=tokens["device"]).json()
    assert [a["format"] for a in manifest["artifacts"]] == ["ptl"]
    refused = client.get("/models/download/", params={"format": "pte"}, headers=tokens["device"])
    assert refused.status_code == 404
    assert refused.json() == {"detail": "Model 1.0.0 has no 'pte' file; its formats: ptl"}
    assert client.get("/models/download/", params={"format": "ptl"}, headers=tokens["device"]).status_code == 200
