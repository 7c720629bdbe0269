"""What a phone does, end to end over HTTP, with a real queue consumer training the model."""

import hashlib

import numpy as np
import torch
from PIL import Image
from sqlmodel import col, select
from torch.jit.mobile import _load_for_lite_interpreter

from core import registry, review
from core.db import read_session
from core.demo import DEMO_CATEGORIES, generate_demo_folder
from core.models import ImageStatus, TrainingImage
from tests.conftest import wait_for
from tests.factories import add_token, as_actor


def test_phone_uploads_operator_trains_phone_downloads_and_classifies(data_dir, session, tmp_path, worker_factory):
    from fastapi.testclient import TestClient

    from api.app import app

    for name in DEMO_CATEGORIES:
        review.add_category(name, session=session, actor=as_actor())
    session.commit()
    phone = add_token(session, "device", label="pixel-7")
    operator = add_token(session, "operator", label="ana")
    photos = generate_demo_folder(tmp_path / "camera", per_category=10, size=32)
    client = TestClient(app)

    # 1. The phone uploads its pictures, one request per category.
    uploaded = []
    for category in DEMO_CATEGORIES:
        files = [("images", (p.name, p.read_bytes(), "image/png")) for p in sorted((photos / category).iterdir())]
        response = client.post(
            "/images/", data={"category": category, "device_id": "pixel-7"}, files=files, headers=phone
        )
        assert response.status_code == 200, response.text
        assert response.json()["stored"] == 10
        uploaded += [r["image_id"] for r in response.json()["results"]]

    # 2. A curator validates them (the dashboard does this through core.review).
    with read_session() as reader:
        stored = reader.exec(select(TrainingImage).where(col(TrainingImage.id).in_(uploaded))).all()
    assert len(stored) == 50 and {img.status for img in stored} == {ImageStatus.pending}
    review.set_status(uploaded, ImageStatus.validated, session=session, actor=as_actor("curator", "curator"))
    session.commit()

    # 3. An operator starts a (tiny) training; a real consumer runs it.
    response = client.post("/models/train/", json={"epochs": 1, "batch_size": 16, "image_size": 32}, headers=operator)
    assert response.status_code == 202, response.text
    assert response.json()["message"] == "Training job started with 50 images"
    job_id = response.json()["job_id"]
    worker_factory()

    def finished():
        status = client.get(f"/models/training-status/{job_id}/", headers=phone).json()
        return status if status["status"] in ("completed", "failed", "cancelled") else None

    status = wait_for(finished, timeout=300, interval=0.5, message="the training job to finish")
    assert status["status"] == "completed", status
    assert status["queue_status"] == "SUCCESS" and status["model_version"] == "1.0.0"
    assert [m["epoch"] for m in status["epoch_metrics"]] == [1]
    assert status["progress"] == 1.0 and status["accuracy"] == status["metrics"]["val_accuracy"]
    assert status["metrics"]["test_images"] > 0 and status["metrics"]["test_accuracy_ci95_low"] is not None
    # One epoch on 50 pictures is no evidence for the gate: the version stays a
    # candidate until the operator promotes it, with a reason (the Models page).
    registry.promote("1.0.0", session=session, actor=as_actor("ops", "operator"), reason="tried on a phone first")
    session.commit()

    # 4. The phone reads the manifest and downloads the lite-interpreter file.
    manifest = client.get("/models/latest/", headers=phone).json()
    assert manifest["version"] == "1.0.0" and manifest["classes"] == sorted(DEMO_CATEGORIES)
    ptl = next(a for a in manifest["artifacts"] if a["format"] == "ptl")
    download = client.get(ptl["url"], headers=phone)
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == ptl["sha256"]
    assert download.headers["etag"] == f'"{ptl["sha256"]}"'
    again = client.get(ptl["url"], headers={**phone, "If-None-Match": download.headers["etag"]})
    assert again.status_code == 304

    # 5. ... loads it in the lite interpreter and classifies a picture as the manifest says.
    model_file = tmp_path / ptl["filename"]
    model_file.write_bytes(download.content)
    model = _load_for_lite_interpreter(str(model_file))
    spec = manifest["input"]
    size = spec["shape"][-1]
    picture = Image.open(next((photos / "circle").iterdir())).convert("RGB").resize((size, size))
    pixels = torch.from_numpy(np.asarray(picture, dtype=np.float32)).permute(2, 0, 1) * spec["scale"]
    x = ((pixels - torch.tensor(spec["mean"]).view(3, 1, 1)) / torch.tensor(spec["std"]).view(3, 1, 1)).unsqueeze(0)
    logits = model(x)
    assert logits.shape == (1, manifest["num_classes"])
    assert torch.isfinite(logits).all()
    label = manifest["classes"][int(logits.argmax())]
    assert label in DEMO_CATEGORIES


def test_a_phone_downloads_the_new_version_as_ptl_while_its_pte_is_made_and_never_sees_the_unverified_pte(
    data_dir, session, monkeypatch
):
    import threading

    from fastapi.testclient import TestClient
    from sqlmodel import Session

    from api.app import app
    from core import export
    from core.config import get_settings
    from core.db import get_engine
    from core.training.rounds import run_training_round, start_training
    from tests.factories import add_demo

    monkeypatch.setenv("AUTO_PROMOTE", "always")
    get_settings.cache_clear()
    add_demo(session, per_category=10, size=32)
    phone = add_token(session, "device", label="pixel-7")
    round_ = start_training({"epochs": 1, "batch_size": 16, "image_size": 32}, session=session)
    session.commit()
    written, release = threading.Event(), threading.Event()
    write_pte = export._write_pte

    def pte_written_then_held(model, example, path):
        write_pte(model, example, path)  # whole, under its temporary name, not yet checked
        written.set()
        assert release.wait(120)

    monkeypatch.setattr(export, "_write_pte", pte_written_then_held)

    def job():
        with Session(get_engine(), expire_on_commit=False) as own:
            run_training_round(round_.id, session=own)

    worker = threading.Thread(target=job)
    worker.start()
    try:
        assert written.wait(300)
        client = TestClient(app)
        assert client.get(f"/models/training-status/{round_.job_id}/", headers=phone).json()["status"] == "completed"
        manifest = client.get("/models/latest/", headers=phone).json()
        assert [a["format"] for a in manifest["artifacts"]] == ["ptl"]
        ptl = client.get(manifest["artifacts"][0]["url"], headers=phone)
        assert hashlib.sha256(ptl.content).hexdigest() == manifest["artifacts"][0]["sha256"]
        assert any(p.suffix == ".tmp" for p in (data_dir / "mobile_models").iterdir())  # the .pte being made
        refused = client.get(f"/models/download/?version={manifest['version']}&format=pte", headers=phone)
        assert refused.status_code == 404 and "has no 'pte' file; its formats: ptl" in refused.json()["detail"]
    finally:
        release.set()
        worker.join(300)
    manifest = client.get("/models/latest/", headers=phone).json()
    assert [a["format"] for a in manifest["artifacts"]] == ["ptl", "pte"]
    pte = client.get(manifest["artifacts"][1]["url"], headers=phone)
    assert hashlib.sha256(pte.content).hexdigest() == manifest["artifacts"][1]["sha256"]
    version = registry.get_version(manifest["version"], session=session)
    assert all(a["parity"]["passed"] for a in version.artifacts)
