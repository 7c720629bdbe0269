"""Apps written for the original pipeline keep working: its note's own request
and response examples (`seed/000_183263191f7795ee.txt`, copied verbatim below)
against a real server (`python -m cli serve`: web server and worker).

Every field of an example must be in the answer with the same JSON type
(integers stay integers), and the values the note fixes must be equal. New
fields beside them are fine; a missing or retyped one breaks a phone."""

import json
import re
import time
from datetime import datetime

import httpx
import pytest

from tests.servers import run_cli, start_app

# --- the original note's examples, verbatim -----------------------------------------

TRAIN_REQUEST = json.loads("""
{
    "epochs": 20,
    "batch_size": 32,
    "learning_rate": 0.001,
    "use_existing_model": true
}
""")
SHORT_TRAIN_REQUEST = json.loads('{"epochs": 5, "batch_size": 16}')
TRAIN_RESPONSE = json.loads("""
{
  "job_id": "abc-123-def",
  "training_round_id": 5,
  "status": "queued",
  "message": "Training job started with 150 images",
  "parameters": {
    "epochs": 20,
    "batch_size": 32,
    "learning_rate": 0.001,
    "use_existing_model": true
  }
}
""")
STATUS_IN_PROGRESS = json.loads("""
{
  "job_id": "abc-123-def",
  "training_round_id": 5,
  "status": "in_progress",
  "celery_status": "PENDING",
  "start_time": "2025-11-07T17:00:00Z",
  "metrics": {
    "total_images": 150,
    "category_distribution": {
      "Cat": 30,
      "Dog": 30,
      "Car": 30,
      "Bicycle": 30,
      "Person": 30
    }
  }
}
""")
STATUS_COMPLETED = json.loads("""
{
  "job_id": "abc-123-def",
  "status": "completed",
  "model_version": "1.1.0",
  "model_version_id": 12,
  "accuracy": 95.5,
  "duration_minutes": 15.3,
  "metrics": {
    "train_accuracy": 98.2,
    "val_accuracy": 95.5,
    "model_size_mb": 8.1
  }
}
""")
# The parameters the note documents, with their defaults.
SEED_DEFAULTS = {"epochs": 20, "batch_size": 32, "learning_rate": 0.001, "use_existing_model": True}
# Objects whose keys are data (category names), not fields: only their values' type counts.
DATA_KEYED = {"metrics.category_distribution"}
MESSAGE = re.compile(r"Training job started with (\d+) images")
CELERY_STATES = {"PENDING", "STARTED", "SUCCESS", "FAILURE", "REVOKED"}


def json_type(value) -> str:
    """JSON's types, with integers apart: an app that parses 150 as an Int fails on 150.0."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    return {float: "number", str: "string", dict: "object", list: "array", type(None): "null"}[type(value)]


def assert_same_shape(example, answer, path: str = "") -> None:
    """Every field of `example` is in `answer`, with the same JSON type (a
    number where the example has a fraction may be whole)."""
    expected, got = json_type(example), json_type(answer)
    assert got == expected or (expected == "number" and got == "integer"), f"{path or 'body'}: {got}, not {expected}"
    if expected != "object":
        return
    if path in DATA_KEYED:
        kinds = {json_type(v) for v in example.values()}
        assert answer and {json_type(v) for v in answer.values()} <= kinds, f"{path}: {answer}"
        return
    for key, value in example.items():
        where = f"{path}.{key}" if path else key
        assert key in answer, f"{where} is missing from {answer}"
        assert_same_shape(value, answer[key], where)


def assert_iso_time(text: str) -> None:
    # ISO 8601 with its zone, as the note's "2025-11-07T17:00:00Z".
    assert datetime.fromisoformat(text).tzinfo is not None, text


@pytest.fixture
def original_app(data_dir, tmp_path):
    """A real server on a data folder with 50 validated images (the note's
    minimum) and an operator token, seen the way the old apps see it: a base
    URL and `Authorization: Bearer <token>`."""
    run_cli("demo", "--per-category", "10", "--size", "32")
    secret = run_cli("token", "create", "--role", "operator", "--label", "old app").stdout.strip().splitlines()[-1]
    # One thread: the machine may be shared; ptl only: the note's format, and faster.
    server = start_app(data_dir, tmp_path / "serve.log", TORCH_THREADS="1", EXPORT_FORMATS="ptl")
    try:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {secret}"}, timeout=30) as client:
            yield client
    finally:
        server.stop()


def _train(client: httpx.Client, body: dict) -> dict:
    # As the note's curl sends it: a JSON body with its content type.
    response = client.post("/api/models/train/", content=json.dumps(body), headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 201, 202), response.text
    answer = response.json()
    assert_same_shape(TRAIN_RESPONSE, answer)
    assert answer["status"] == TRAIN_RESPONSE["status"] == "queued"
    match = MESSAGE.fullmatch(answer["message"])
    assert match and int(match.group(1)) == 50, answer["message"]
    # The parameters are echoed: the ones sent, the note's defaults for the others.
    assert {key: answer["parameters"][key] for key in SEED_DEFAULTS} == SEED_DEFAULTS | body
    return answer


def _status(client: httpx.Client, job_id: str) -> dict:
    response = client.get(f"/api/models/training-status/{job_id}/")
    assert response.status_code == 200, response.text
    return response.json()


def _poll(client: httpx.Client, job_id: str, status: str, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        answer = _status(client, job_id)
        if answer["status"] == status:
            return answer
        assert answer["status"] in ("queued", "in_progress"), answer
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} not {status} after {timeout}s: {answer}")


def test_the_original_pipelines_examples_hold_against_a_real_server(original_app):
    client = original_app

    # POST /api/models/train/ with the note's "Testing the pipeline" body.
    queued = _train(client, SHORT_TRAIN_REQUEST)
    job_id = queued["job_id"]

    # GET .../training-status/{job_id}/ while it runs: the in-progress example.
    running = _poll(client, job_id, "in_progress", timeout=120)
    assert_same_shape(STATUS_IN_PROGRESS, running)
    assert running["job_id"] == job_id and running["training_round_id"] == queued["training_round_id"]
    assert running["celery_status"] == running["queue_status"] and running["celery_status"] in CELERY_STATES
    assert_iso_time(running["start_time"])
    assert running["metrics"]["total_images"] == 50
    assert sum(running["metrics"]["category_distribution"].values()) == 50

    # ... and once completed: the completed example.
    done = _poll(client, job_id, "completed", timeout=600)
    assert_same_shape(STATUS_COMPLETED, done)
    assert done["celery_status"] == done["queue_status"] == "SUCCESS"
    assert re.fullmatch(r"[0-9]+\.[0-9]+\.[0-9]+", done["model_version"])
    # `accuracy` is the validation accuracy in percent, as metrics.val_accuracy.
    assert done["accuracy"] == done["metrics"]["val_accuracy"] and 0 <= done["accuracy"] <= 100
    assert 0 <= done["metrics"]["train_accuracy"] <= 100 and done["metrics"]["model_size_mb"] > 0
    assert done["duration_minutes"] >= 0
    assert_iso_time(done["start_time"])
    # The note's "verify results": the .ptl file of the new version is there to download.
    download = client.get("/api/models/download/", params={"version": done["model_version"], "format": "ptl"})
    assert download.status_code == 200 and len(download.content) > 0

    # POST /api/models/train/ with the note's full example body; cancelled, not run.
    full = _train(client, TRAIN_REQUEST)
    assert {key: full["parameters"][key] for key in TRAIN_RESPONSE["parameters"]} == TRAIN_RESPONSE["parameters"]
    assert client.post(f"/api/models/training/{full['job_id']}/cancel/").status_code == 200


def test_the_shape_check_catches_a_missing_or_retyped_field():
    """The contract test's own check fails where an old app would."""
    assert_same_shape(STATUS_COMPLETED, STATUS_COMPLETED)
    for broken in (
        {k: v for k, v in STATUS_COMPLETED.items() if k != "accuracy"},
        STATUS_COMPLETED | {"duration_minutes": "15.3"},
        STATUS_COMPLETED | {"model_version_id": 12.0},
        STATUS_COMPLETED | {"metrics": {"train_accuracy": 98.2, "val_accuracy": 95.5}},
    ):
        with pytest.raises(AssertionError):
            assert_same_shape(STATUS_COMPLETED, broken)
    with pytest.raises(AssertionError):
        assert_same_shape(STATUS_IN_PROGRESS, {k: v for k, v in STATUS_IN_PROGRESS.items() if k != "celery_status"})
