"""Federated fine-tuning simulated: N phones with non-IID pictures (each
category dealt out by a Dirichlet(alpha) draw, so most phones hold mostly two
or three categories) take part in R rounds through the real server and API
with the reference client, against central training of the same head on the
union of their pictures.

    .venv/bin/python -m bench.federated [--clients 10] [--rounds 10] [--alpha 0.3] [--kind demo|digits|glyphs]

`--kind` picks the pictures: the demo shapes (default), or 10 categories of
scikit-learn's handwritten digits or of letters rendered in the installed
fonts (bench/datasets.py, as bench.auto_mode draws them), the server's
and the phones' taken apart from one shuffled set.

The server trains a `full` model on its own pictures first (production), then
runs one federated round with `rounds` R and `min_clients` N. Printed: the
test accuracy (the server's held-out test images) after each round and of the
registered version, the central baseline's (plain SGD on the same backbone's
features of the union, R x local_epochs epochs, the same learning rate and
batch size, starting from the same head), the update's size against the
model file's, and one local step of the head `.pte` against PyTorch.
"""

import argparse
import os
import random
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench.common import ROOT, fresh_data_dir, load_average, stop, wait_until


def start_server(data_dir: Path) -> tuple[subprocess.Popen, str]:
    """`python -m cli serve` (web server, API and worker) on a free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1"}
    with open(data_dir / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT, env=env, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            with urllib.request.urlopen(f"{url}/api/health/", timeout=2) as answer:
                return answer.status == 200
        except OSError:
            return False

    wait_until(up, timeout=180, interval=0.5)
    return proc, url


def deal_non_iid(labels: list[str], clients: int, alpha: float, seed: int) -> list[list[int]]:
    """Indices of the pictures each client holds: each category's pictures
    split among the clients in Dirichlet(alpha) proportions (Hsu et al. 2019)."""
    rng = np.random.default_rng(seed)
    shares: list[list[int]] = [[] for _ in range(clients)]
    for category in sorted(set(labels)):
        members = [i for i, label in enumerate(labels) if label == category]
        rng.shuffle(members)
        cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(members)).astype(int)[:-1]
        for client, part in enumerate(np.split(np.array(members), cuts)):
            shares[client].extend(part.tolist())
    return shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--local-epochs", type=int, default=1)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--fedprox-mu", type=float, default=0.0, help="FedProx's proximal weight (0: FedAvg)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--per-category", type=int, default=60, help="the phones' pictures per category, in all")
    parser.add_argument("--server-per-category", type=int, default=100, help="the server's own pictures")
    parser.add_argument(
        "--full-epochs", type=int, default=2, help="the production model's training (short: room to improve)"
    )
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--kind", choices=("demo", "digits", "glyphs"), default="demo")
    args = parser.parse_args()
    data_dir = fresh_data_dir("federated")
    os.environ["AUTO_PROMOTE"] = "always"
    os.environ["WEIGHTS_DOWNLOAD"] = "false"

    import torch
    from sqlmodel import select

    from clients.federated import Client, load_pictures, take_part, train_head
    from core import registry
    from core.access import Actor
    from core.dataset import normalize
    from core.db import session_scope
    from core.demo import DEMO_CATEGORIES, draw_demo_image, load_demo_dataset
    from core.models import FederatedPlan, ModelVersion, TrainingRound
    from core.tokens import create_token
    from core.training import federated
    from core.training.config import TrainingConfig
    from core.training.networks import build_model, head
    from core.training.progress import SilentReporter
    from core.training.rounds import run_training_round, start_training
    from core.training.trainers import load_split

    print(f"load average {load_average():.2f}; data in {data_dir}")
    started = time.perf_counter()
    if args.kind == "demo":
        with session_scope() as session:
            load_demo_dataset(session=session, per_category=args.server_per_category, size=args.image_size, seed=0)
    else:
        from bench.auto_mode import pictures, store

        real = pictures(args.kind, 10 * (args.server_per_category + args.per_category))
        server_n = 10 * args.server_per_category
        store(real[:server_n])
        phone_pairs = real[server_n:]
    with session_scope() as session:
        production = start_training(
            {"epochs": args.full_epochs, "image_size": args.image_size, "batch_size": 32}, session=session
        )
    with session_scope() as session:
        version = run_training_round(production.id, session=session)
        print(f"production {version.version}: test accuracy {version.metrics['test_accuracy']}% "
              f"({time.perf_counter() - started:.0f} s)")  # fmt: skip

    # The phones' pictures: drawn apart from the server's (another seed), dealt out non-IID.
    rng = random.Random(1)
    if args.kind == "demo":
        names = [c for c in DEMO_CATEGORIES for _ in range(args.per_category)]
    else:
        names = [label for _, label in phone_pairs]
    categories = sorted(set(names))
    shares = deal_non_iid(names, args.clients, args.alpha, seed=1)
    folders = []
    for client, share in enumerate(shares):
        folder = data_dir / "phones" / f"phone{client}"
        for i in share:
            (folder / names[i]).mkdir(parents=True, exist_ok=True)
            if args.kind == "demo":
                picture = draw_demo_image(names[i], rng, args.image_size)
            else:
                picture = phone_pairs[i][0].convert("RGB")
            picture.save(folder / names[i] / f"{i}.png")
        folders.append(folder)
        held = {c: sum(names[i] == c for i in share) for c in categories}
        print(f"phone {client}: {len(share)} pictures " + ", ".join(f"{c} {n}" for c, n in held.items() if n))

    admin = Actor("bench", "admin")
    with session_scope() as session:
        secrets = [
            create_token(session=session, actor=admin, role="device", label=f"phone {i}").secret
            for i in range(args.clients)
        ]
    server, url = start_server(data_dir)
    try:
        import jobs

        round_ = jobs.submit_training(
            {"training_mode": "federated", "rounds": args.rounds, "min_clients": args.clients,
             "deadline_minutes": 60, "local_epochs": args.local_epochs, "learning_rate": args.learning_rate,
             "batch_size": args.batch_size, "fedprox_mu": args.fedprox_mu},
            actor=admin,
        )  # fmt: skip
        round_id, job_id = round_.id, round_.job_id
        phones = [Client(url, secret, data_dir / "phone-cache" / str(i)) for i, secret in enumerate(secrets)]
        after, update_bytes, rounds_started = None, 0, time.perf_counter()
        for number in range(1, args.rounds + 1):
            plan_id = None
            for i, (phone, folder) in enumerate(zip(phones, folders, strict=True)):
                outcome = take_part(phone, folder, wait=900, after=after, seed=number * 100 + i)
                assert outcome["status"] == 201, outcome
                plan_id = outcome["plan_id"]
            after = plan_id
            print(f"round {number}: {args.clients} updates sent ({time.perf_counter() - rounds_started:.0f} s)")

        def finished():
            with session_scope() as session:
                found = session.get(TrainingRound, round_id)
                return found if found.status.value in ("completed", "failed") else None

        done = wait_until(finished, timeout=1800, interval=1)
        assert done.status.value == "completed", done.error
    finally:
        stop_group(server)

    with session_scope() as session:
        plans = session.exec(select(FederatedPlan).where(FederatedPlan.round_id == round_id)).all()
        made = session.get(ModelVersion, done.model_version_id)
        for plan in sorted(plans, key=lambda p: p.number):
            print(f"federated round {plan.number}: test accuracy {plan.test_accuracy}% ({plan.clients} phones)")
        config = TrainingConfig(**done.parameters)
        data = load_split(done, config, list(done.classes), SilentReporter(done), session=session)
        model_file = max(a["size_bytes"] for a in made.artifacts)
        fed_accuracy = made.metrics["test_accuracy"]
        print(f"federated version {made.version}: test accuracy {fed_accuracy}% "
              f"(job {job_id}, {time.perf_counter() - rounds_started:.0f} s)")  # fmt: skip

    # Central baseline: the same backbone and starting head, the union of the phones' pictures.
    with session_scope() as session:
        start = registry.load_checkpoint(
            session.exec(select(ModelVersion).where(ModelVersion.version == version.version)).one()
        )
    model = build_model(config.architecture, len(done.classes))
    model.load_state_dict(start["state_dict"])
    model.eval()
    backbone = federated.backbone_of(model)
    plan_like = {"classes": list(done.classes), "image_size": config.image_size,
                 "normalization": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}}  # fmt: skip
    union_x, union_y = zip(*(load_pictures(folder, plan_like) for folder in folders), strict=True)
    with torch.no_grad():  # the features feed autograd below (the parity check): not inference tensors
        f_union = backbone(torch.cat(union_x))
        f_test = backbone(normalize(data.x_test))
    y_union = torch.cat(union_y)
    program = federated.head_program(head(model), 0.0)
    weights, _ = train_head(program, f_union, y_union, epochs=args.rounds * args.local_epochs,
                            learning_rate=args.learning_rate, batch_size=args.batch_size)  # fmt: skip
    logits = f_test @ torch.from_numpy(weights["weight"]).T + torch.from_numpy(weights["bias"])
    central = round(100.0 * float((logits.argmax(1) == data.y_test).float().mean()), 2)
    gap = federated.step_differences(program, head(model), 0.0, f_union[:16], y_union[:16])
    update_bytes = len(federated.to_npz(weights))
    print(f"central head training on the union ({len(y_union)} pictures): test accuracy {central}%")
    print(f"difference federated - central: {fed_accuracy - central:+.2f} points on {len(data.y_test)} test images")
    print(f"update {update_bytes:,} bytes (.npz) against the model file {model_file:,} bytes: "
          f"{model_file / update_bytes:.0f}x smaller")  # fmt: skip
    print(f"one local step against PyTorch: loss {gap['loss']:.1e}, gradients {gap['gradients']:.1e}")
    print(f"total {time.perf_counter() - started:.0f} s; load average {load_average():.2f}")


def stop_group(proc: subprocess.Popen) -> None:
    """Stop the server and its worker (one process group)."""
    import signal

    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    stop(proc)


if __name__ == "__main__":
    main()
