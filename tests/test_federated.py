"""Federated rounds: the trainable head matches PyTorch, phones take part over
the HTTP API with the reference client, bad updates are refused, a round
without enough phones fails, and a worker killed while aggregating resumes."""

import io
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import requests
import torch
from sqlmodel import select
from torch import nn

from clients.federated import train_head
from core import registry
from core.access import Actor
from core.errors import UserError
from core.models import (
    AuditEvent,
    Category,
    FederatedFetch,
    FederatedPlan,
    FederatedUpdate,
    ModelVersion,
    RoundStatus,
    TrainingImage,
    TrainingRound,
)
from core.training import federated
from core.training.config import TrainingConfig
from core.training.networks import build_model
from core.training.rounds import get_round, run_training_round, start_training
from tests.conftest import ROOT, wait_for
from tests.factories import add_demo, add_token, version_row
from tests.servers import start_app

ARCH = "mobilenet_v3_small"
QUICK = {"training_mode": "federated", "batch_size": 8, "learning_rate": 0.05, "val_split": 0.2}


@pytest.fixture
def production(session, monkeypatch):
    """Demo pictures (32 px) and a production model that was never trained
    (random weights): federated rounds need one, and what it knows does not
    matter to these tests. New versions go to production (AUTO_PROMOTE)."""
    from core.config import get_settings

    monkeypatch.setenv("AUTO_PROMOTE", "always")
    monkeypatch.setenv("HEARTBEAT_INTERVAL", "0.5")
    get_settings.cache_clear()
    add_demo(session, per_category=12, size=32)
    classes = sorted({c for c in federated_classes(session)})
    torch.manual_seed(0)
    model = build_model(ARCH, len(classes))
    checkpoint = registry.checkpoint_path("1.0.0")
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    config = TrainingConfig(architecture=ARCH, image_size=32)
    torch.save({"config": config.to_dict(), "classes": classes, "state_dict": model.state_dict()}, checkpoint)
    row = version_row("1.0.0", classes, is_production=True, metrics={"val_accuracy": 20.0}, artifacts=[])
    row.checkpoint_path = checkpoint.relative_to(get_settings().data_dir).as_posix()
    session.add(row)
    session.commit()
    return row


def federated_classes(session) -> list[str]:
    from core.training.preflight import validated_images

    return [label for _, label in validated_images(session=session)]


def test_federated_parameters_are_checked_and_belong_to_federated_mode_only():
    config = TrainingConfig.from_params({"training_mode": "federated"})
    assert (config.rounds, config.local_epochs, config.min_clients, config.fedprox_mu) == (1, 1, 2, 0.0)
    # The phones' plain SGD gets its own default learning rate; a given one wins, other modes keep 0.001.
    assert config.learning_rate == 0.05
    assert TrainingConfig.from_params({"training_mode": "federated", "learning_rate": 0.2}).learning_rate == 0.2
    assert TrainingConfig.from_params({"training_mode": "head"}).learning_rate == 0.001
    assert "rounds" not in TrainingConfig().to_dict()  # other modes keep their parameters
    with pytest.raises(UserError, match="min_clients must be between 1 and 100,000 \\(got 0\\)"):
        TrainingConfig.from_params({"training_mode": "federated", "min_clients": 0})
    with pytest.raises(UserError, match="rounds apply to training mode federated only"):
        TrainingConfig.from_params({"rounds": 3})


def test_a_federated_round_without_a_production_model_is_refused_saying_why(session):
    add_demo(session, per_category=12, size=32)
    with pytest.raises(UserError, match="no model is in production yet: train one in training mode full or head"):
        start_training({"training_mode": "federated"}, session=session)
    assert session.exec(select(TrainingRound)).first() is None


def test_one_local_step_of_the_trainable_head_matches_pytorch():
    torch.manual_seed(1)
    linear = nn.Linear(1024, 5)
    features, labels = torch.randn(12, 1024), torch.randint(0, 5, (12,))
    for mu in (0.0, 0.5):
        program = federated.head_program(linear, mu)
        gap = federated.step_differences(program, linear, mu, features, labels)
        assert gap["loss"] < 1e-5 and gap["gradients"] < 1e-5, gap

        # Two SGD steps in the reference client's runtime against torch.optim.SGD.
        weights, metrics = train_head(program, features, labels, epochs=1, learning_rate=0.1, batch_size=6, seed=3)
        reference = federated.HeadLoss(linear, mu)
        optimizer = torch.optim.SGD(reference.head.parameters(), lr=0.1)
        order = torch.randperm(12, generator=torch.Generator().manual_seed(3)).split(6)
        for idx in order:
            optimizer.zero_grad()
            reference(features[idx], labels[idx])[0].backward()
            optimizer.step()
        for name in ("weight", "bias"):
            assert np.abs(weights[name] - getattr(reference.head, name).detach().numpy()).max() < 1e-5
        assert metrics["loss"] > 0


def test_a_deadline_with_too_few_phones_fails_the_round_and_registers_nothing(session, production):
    round_ = start_training(
        {**QUICK, "min_clients": 2, "deadline_minutes": 0.05}, session=session, requested_by="tester"
    )
    session.commit()
    assert run_training_round(round_.id, session=session) is None
    session.refresh(round_)
    assert round_.status == RoundStatus.failed
    assert "0 of the 2 phones needed sent an accepted update by the deadline" in round_.error
    assert "no model was made" in round_.error
    assert session.exec(select(ModelVersion)).all() == [production]
    plan = session.exec(select(FederatedPlan)).one()
    assert plan.status == "failed" and {f["name"] for f in plan.files} == {"backbone", "head"}
    actions = [e.action for e in session.exec(select(AuditEvent))]
    assert "federated.plan" in actions and "federated.aggregate" in actions


def client_pictures(session, data_dir, tmp_path, clients: int) -> list:
    """The demo pictures dealt out to `clients` folders, one per category each."""
    from core.ingest import image_path

    folders = [tmp_path / f"phone{i}" for i in range(clients)]
    images = session.exec(select(TrainingImage).order_by(TrainingImage.id)).all()
    names = {c.id: c.name for c in session.exec(select(Category))}
    for n, image in enumerate(images):
        target = folders[n % clients] / names[image.category_id]
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(image_path(image), target / f"{image.sha256[:12]}.png")
    return folders


def test_three_phones_train_two_rounds_over_http_and_the_aggregate_becomes_a_version(
    session, production, data_dir, tmp_path, ptl_only
):
    operator = add_token(session, "operator", label="ops")
    devices = [add_token(session, "device", label=f"phone {i}") for i in range(4)]
    folders = client_pictures(session, data_dir, tmp_path, 3)
    session.rollback()  # the server's start migrates the database: no read may be open
    server = start_app(data_dir, tmp_path / "server.log", HEARTBEAT_INTERVAL="0.5")
    clients = []
    try:
        api = f"{server.url}/api"
        answer = requests.post(
            f"{api}/models/train/", json={**QUICK, "rounds": 2, "min_clients": 3, "deadline_minutes": 5},
            headers=operator, timeout=30,
        )  # fmt: skip
        assert answer.status_code == 202, answer.text
        job = answer.json()["job_id"]
        plan = wait_for(
            lambda: (r := requests.get(f"{api}/federated/plan/", headers=devices[3], timeout=10)).ok and r,
            timeout=300, interval=1, message="the first plan",
        ).json()  # fmt: skip
        assert plan["round"] == 1 and plan["rounds"] == 2 and plan["image_size"] == 32
        assert plan["update"]["arrays"] == {"weight": [5, 1024], "bias": [5]}
        again = requests.get(f"{api}/federated/plan/", headers={**devices[3], "If-None-Match": '"x", "*"'}, timeout=10)
        assert again.status_code == 304
        head = requests.get(api.removesuffix("/api") + plan["files"][1]["url"], headers=devices[3], timeout=10)
        assert head.ok and len(head.content) == plan["files"][1]["size_bytes"]

        def send(token, **body):
            return requests.post(f"{api}/federated/updates/", json={"plan_id": plan["plan_id"], "num_examples": 10,
                                 **body}, headers=token, timeout=30)  # fmt: skip

        small = {"weight": np.full((5, 1024), 1e-3).tolist(), "bias": [0.0] * 5}
        wrong = send(devices[3], delta={"weight": np.zeros((4, 1024)).tolist(), "bias": [0.0] * 5})
        assert wrong.status_code == 400 and "weight has shape [4, 1024]; the plan's head needs [5, 1024]" in wrong.text
        nan = requests.post(
            f"{api}/federated/updates/", headers={**devices[3], "Content-Type": "application/json"}, timeout=30,
            data=json.dumps({"plan_id": plan["plan_id"], "num_examples": 3, "delta": {**small, "bias": [float("nan")] * 5}}),
        )  # fmt: skip
        assert nan.status_code == 400 and "bias holds 5 value(s) that are not finite" in nan.text
        huge = send(devices[3], delta={**small, "weight": np.full((5, 1024), 10.0).tolist()})
        assert huge.status_code == 400 and "more than the 50 allowed (FEDERATED_MAX_UPDATE_NORM)" in huge.text
        npz = io.BytesIO()
        np.savez(npz, weight=np.zeros((5, 1024), np.float32), bias=np.array([0, np.nan, 0, 0, 0], np.float32))
        nan_npz = requests.post(
            f"{api}/federated/updates/", headers=devices[3], timeout=30,
            data={"plan_id": plan["plan_id"], "num_examples": 3, "kind": "delta"},
            files={"update": ("u.npz", npz.getvalue())},
        )  # fmt: skip
        assert nan_npz.status_code == 400 and "bias holds 1 value(s) that are not finite" in nan_npz.text
        first = send(devices[0], delta=small, metrics={"loss": 1.2})
        assert first.status_code == 201, first.text
        twice = send(devices[0], delta=small)
        assert twice.status_code == 409 and "already sent an update for federated round 1" in twice.text

        def client(i, rounds):
            command = [sys.executable, "-m", "clients.federated", "--server", server.url, "--token",
                       devices[i]["Authorization"].split()[1], "--pictures", str(folders[i]), "--rounds", str(rounds),
                       "--cache", str(tmp_path / f"cache{i}"), "--wait", "300"]  # fmt: skip
            return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        # Round 1: phone 0's update above and phones 1 and 2; round 2: phones 1, 2 and then 0.
        clients = [client(1, 2), client(2, 2)]
        wait_for(
            lambda: requests.get(f"{api}/federated/plan/", headers=devices[3], timeout=10).json().get("round") == 2,
            timeout=300, interval=1, message="the second plan",
        )  # fmt: skip
        clients.append(client(0, 1))
        for proc in clients:
            output = proc.communicate(timeout=300)[0]
            assert proc.returncode == 0, output
        status = wait_for(
            lambda: (s := requests.get(f"{api}/models/training-status/{job}/", headers=operator, timeout=10).json())[
                "status"] in ("completed", "failed") and s,
            timeout=300, interval=1, message="the round's end",
        )  # fmt: skip
        assert status["status"] == "completed", (status, server.proc.pid, (tmp_path / "server.log").read_text()[-3000:])
        assert status["model_version"] == "1.1.0"
        late = send(devices[3], delta=small)
        assert late.status_code == 409 and "is closed (closed" in late.text
    finally:
        for proc in clients:
            proc.kill()
        server.stop()

    session.expire_all()
    round_ = get_round(job, session=session)
    plans = session.exec(select(FederatedPlan).order_by(FederatedPlan.number)).all()
    assert [(p.number, p.status, p.clients) for p in plans] == [(1, "closed", 3), (2, "closed", 3)]
    assert all(p.test_accuracy is not None for p in plans)
    updates = session.exec(select(FederatedUpdate)).all()
    assert sum(u.status == "accepted" for u in updates) == 6
    refused = [u.reason for u in updates if u.status == "refused"]
    assert len(refused) == 6 and any("already sent" in r for r in refused) and any("too late" in r for r in refused)
    version = session.get(ModelVersion, round_.model_version_id)
    assert {a["format"] for a in version.artifacts} == {"ptl"} and all(a["parity"]["passed"] for a in version.artifacts)
    assert version.gate is not None and version.metrics["test_accuracy"] is not None
    actions = [e.action for e in session.exec(select(AuditEvent))]
    assert actions.count("federated.plan") == 2 and actions.count("federated.aggregate") == 2
    assert actions.count("federated.update") == 6 + 6


def test_a_worker_killed_while_aggregating_resumes_from_the_stored_updates(
    session, production, worker_factory, ptl_only
):
    import jobs

    round_ = jobs.submit_training({**QUICK, "min_clients": 1, "deadline_minutes": 5}, actor=Actor("tester", "operator"))
    crashing = worker_factory(CRASH_AT="federated_aggregation", HEARTBEAT_TIMEOUT="2", HEARTBEAT_INTERVAL="0.5")
    plan = wait_for(
        lambda: session.exec(select(FederatedPlan)).first() or session.rollback(), timeout=300, message="the plan"
    )
    delta = {"weight": np.full((5, 1024), 1e-3), "bias": np.zeros(5)}
    receipt = federated.receive_update(
        plan.id, session=session, actor=Actor("api:phone", "device"), token_id=1, kind="delta", arrays=delta,
        num_examples=4, metrics={},
    )  # fmt: skip
    session.commit()
    assert receipt.error is None
    crashing.proc.wait(timeout=120)  # killed itself on reaching the aggregation
    session.expire_all()
    assert session.get(FederatedPlan, plan.id).status == "aggregating"

    worker_factory(HEARTBEAT_TIMEOUT="2", HEARTBEAT_INTERVAL="0.5")
    done = wait_for(
        lambda: ((r := get_round(round_.job_id, session=session)).status in (RoundStatus.completed, RoundStatus.failed)
        and r) or session.rollback(),
        timeout=300, interval=0.5, message="the resumed round",
    )  # fmt: skip
    assert done.status == RoundStatus.completed, done.history
    assert any("worker lost during attempt 1" in line for line in done.history)
    plan = session.get(FederatedPlan, plan.id)
    assert (plan.status, plan.clients) == ("closed", 1)
    stored = session.exec(select(FederatedUpdate)).one()
    assert stored.status == "accepted"
    version = registry.load_checkpoint(session.get(ModelVersion, done.model_version_id))["state_dict"]
    start = production_state()
    assert torch.allclose(version["classifier.3.weight"], start["classifier.3.weight"] + 1e-3, atol=1e-6)


def production_state() -> dict:
    from core.db import read_session

    with read_session() as session:
        return registry.load_checkpoint(
            session.exec(select(ModelVersion).where(ModelVersion.version == "1.0.0")).one()
        )["state_dict"]


def test_live_metrics_show_a_federated_rounds_phones_refusals_and_accuracy(session):
    from datetime import timedelta

    from core.models import utcnow
    from tests.test_pages import app, ok, table

    params = {**TrainingConfig.from_params({**QUICK, "rounds": 2, "min_clients": 3}).to_dict(), "image_size": 32}
    round_ = TrainingRound(parameters=params, status=RoundStatus.in_progress, started_at=utcnow(), classes=["a", "b"])
    session.add(round_)
    session.flush()
    soon = utcnow() + timedelta(minutes=5)
    closed = FederatedPlan(round_id=round_.id, number=1, status="closed", deadline_at=soon, head_path="h1.pt",
                           clients=3, test_accuracy=81.25, test_images=16)  # fmt: skip
    open_ = FederatedPlan(round_id=round_.id, number=2, deadline_at=soon, head_path="h2.pt")
    session.add_all([closed, open_])
    session.flush()
    session.add_all([
        FederatedUpdate(plan_id=open_.id, token_id=1, device="api:<b>pixel</b>", status="accepted", num_examples=12,
                        accepted_token_id=1, metrics={"loss": 0.5, "accuracy": 75.0}),
        FederatedUpdate(plan_id=open_.id, token_id=2, device="api:iphone", status="refused", num_examples=3,
                        reason="Update array bias holds 1 value(s) that are not finite (NaN or infinity)"),
        FederatedFetch(plan_id=open_.id, token_id=1, device="api:<b>pixel</b>"),
        FederatedFetch(plan_id=open_.id, token_id=3, device="api:galaxy"),
    ])  # fmt: skip
    session.commit()

    at = ok(app("pages/metrics.py"))
    rounds = table(at, "reported")
    assert rounds["status"].tolist() == ["closed", "open"] and rounds["pending"].tolist() == [0, 2]
    # The phone that fetched the head and has not answered yet, by name.
    assert rounds["working"].tolist() == ["", "api:galaxy"]
    assert rounds["test_accuracy"].tolist()[0] == 81.25
    # The accuracy with the images behind it and its 95 % interval (13 of 16).
    assert rounds["test_images"].tolist()[0] == 16 and rounds["test_interval"].tolist()[0] == "57.0–93.4%"
    updates = table(at, "device")
    assert updates["device"].tolist() == ["api:<b>pixel</b>", "api:iphone"]
    assert "not finite" in updates["reason"].tolist()[1] and updates["pictures"].tolist() == [12, 3]
    assert any("Federated: 2 of 2 rounds published" in m.value for m in at.markdown)


def test_the_train_page_starts_a_federated_round_with_its_own_fields_and_checks_them(session, monkeypatch):
    from tests.conftest import _clear_caches
    from tests.test_pages import app, ok

    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    _clear_caches()
    add_demo(session, per_category=4, size=32)
    at = ok(app("pages/train.py", "operator", "Grace"))
    ok(at.radio(key="training_mode").set_value("federated"))
    # No production model yet: the preflight says so and Train stays off.
    assert at.button(key="train").disabled
    assert any("no model is in production yet" in e.value for e in at.error)
    values = {w.key: w.value for w in at.number_input}
    assert [values[k] for k in ("rounds", "local_epochs", "min_clients", "deadline_minutes", "fedprox_mu")] == [
        1,
        1,
        2,
        60.0,
        0.0,
    ]
    assert values["learning_rate"] == 0.05  # the phones' SGD default replaces the central one ...
    ok(at.radio(key="training_mode").set_value("full"))
    assert at.number_input(key="learning_rate").value == 0.001  # ... and gives it back
    ok(at.radio(key="training_mode").set_value("federated"))

    classes = sorted(set(federated_classes(session)))
    session.add(version_row("1.0.0", classes, is_production=True, metrics={"val_accuracy": 20.0}, artifacts=[]))
    session.commit()
    at = ok(app("pages/train.py", "operator", "Grace"))
    ok(at.radio(key="training_mode").set_value("federated"))
    ok(at.number_input(key="min_clients").set_value(0))
    assert at.button(key="train").disabled
    assert any("Phones per round must be between 1 and 100,000 (got 0)" in e.value for e in at.error)
    ok(at.number_input(key="min_clients").set_value(5))
    ok(at.number_input(key="rounds").set_value(3))
    ok(at.button(key="train").click())
    job = session.exec(select(TrainingRound)).one()
    assert job.parameters["training_mode"] == "federated"
    assert (job.parameters["rounds"], job.parameters["min_clients"], job.parameters["local_epochs"]) == (3, 5, 1)
    assert job.parameters["architecture"] == "mobilenet_v3_small"  # production's, as the round keeps it
    assert job.parameters["learning_rate"] == 0.05  # left empty: the phones' default


def test_the_api_gives_a_federated_round_the_phones_learning_rate_unless_one_is_sent(session, production):
    from fastapi.testclient import TestClient

    from api.app import app

    operator = add_token(session, "operator")
    with TestClient(app) as client:
        queued = client.post("/models/train/", json={"training_mode": "federated"}, headers=operator)
        assert queued.status_code == 202, queued.text
        assert queued.json()["parameters"]["learning_rate"] == 0.05
        sent = client.post(
            "/models/train/", json={"training_mode": "federated", "learning_rate": 0.01}, headers=operator
        )
        assert sent.json()["parameters"]["learning_rate"] == 0.01
        central = client.post("/models/train/", json={}, headers=operator)
        assert central.json()["parameters"]["learning_rate"] == 0.001  # the seed contract's default


def test_a_phone_fetching_the_head_is_named_as_working_on_the_plan_until_it_answers(session, data_dir):
    from datetime import timedelta

    from fastapi.testclient import TestClient

    from api.app import app
    from core.db import read_session
    from core.models import utcnow

    params = {**TrainingConfig.from_params({**QUICK, "min_clients": 2}).to_dict(), "image_size": 32}
    round_ = TrainingRound(parameters=params, status=RoundStatus.in_progress, started_at=utcnow(), classes=["a", "b"])
    session.add(round_)
    session.flush()
    head_file = data_dir / "head.pte"
    head_file.write_bytes(b"a trainable head")
    sha = federated.file_sha256(head_file)
    plan = FederatedPlan(round_id=round_.id, number=1, deadline_at=utcnow() + timedelta(minutes=5), head_path="h.pt",
                         files=[{"name": "head", "path": "head.pte", "sha256": sha, "size_bytes": 16}])  # fmt: skip
    session.add(plan)
    session.commit()
    pixel, iphone = add_token(session, "device", label="pixel"), add_token(session, "device", label="iphone")
    with TestClient(app) as client:
        url = f"/federated/plans/{plan.id}/files/head"
        assert client.get(url, headers=pixel).content == b"a trainable head"
        assert client.get(url, headers=pixel).status_code == 200  # again: still one record
        assert client.get(url, headers={**iphone, "If-None-Match": f'"{sha}"'}).status_code == 304
    with read_session() as reader:
        view = federated.round_view(reader.get(TrainingRound, round_.id), session=reader)
        assert view["plans"][0]["working"] == "api:pixel, api:iphone"
        assert len(reader.exec(select(FederatedFetch)).all()) == 2
    session.add(FederatedUpdate(plan_id=plan.id, token_id=1, device="api:pixel", status="accepted", num_examples=5,
                                accepted_token_id=1))  # fmt: skip
    session.commit()
    with read_session() as reader:
        view = federated.round_view(reader.get(TrainingRound, round_.id), session=reader)
        assert view["plans"][0]["working"] == "api:iphone"
