"""Federated against central `head` training over many non-IID deals.

    python -m bench.federated_deals --kind demo|digits|glyphs [--deals 8] [--full-epochs 2]

`python -m bench.federated` runs one deal of the pictures among the phones
through the real server, API and ExecuTorch runtime: minutes per deal, and
one deal's result moves by several points with the deal and the shuffles (a
73-image test set resolves 1.4 points per image). This script does the same
arithmetic in PyTorch (the head program's loss and plain SGD, which the
runtime matches within 1e-7: tests/test_federated.py) on the same data,
production model and phones, for `--deals` Dirichlet deals, so the
federated-minus-central difference comes with its spread, and for several
learning rates (the default's evidence: core/training/config.py).
"""

import argparse
import os
import random
import statistics

from bench.common import fresh_data_dir, load_average


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("demo", "digits", "glyphs"), default="demo")
    parser.add_argument("--deals", type=int, default=8)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rates", default="0.001,0.01,0.02,0.05,0.1")
    parser.add_argument("--per-category", type=int, default=60, help="the phones' pictures per category, in all")
    parser.add_argument("--server-per-category", type=int, default=100, help="the server's own pictures")
    parser.add_argument("--full-epochs", type=int, default=2, help="the production model's training")
    args = parser.parse_args()
    data_dir = fresh_data_dir(f"federated-deals-{args.kind}")
    os.environ["AUTO_PROMOTE"] = "always"
    os.environ["WEIGHTS_DOWNLOAD"] = "false"

    import numpy as np
    import torch
    from torch import nn

    from bench.federated import deal_non_iid
    from core import registry
    from core.dataset import normalize
    from core.db import session_scope
    from core.demo import DEMO_CATEGORIES, draw_demo_image, load_demo_dataset
    from core.models import TrainingRound
    from core.training import federated
    from core.training.config import TrainingConfig
    from core.training.networks import build_model, head
    from core.training.progress import SilentReporter
    from core.training.rounds import run_training_round, start_training
    from core.training.trainers import load_split

    print(f"load average {load_average():.2f}; data in {data_dir}")
    if args.kind == "demo":
        with session_scope() as session:
            load_demo_dataset(session=session, per_category=args.server_per_category, size=64, seed=0)
        rng = random.Random(1)
        names = [c for c in DEMO_CATEGORIES for _ in range(args.per_category)]
        phone_pictures = [draw_demo_image(name, rng, 64) for name in names]
    else:
        from bench.auto_mode import pictures, store

        real = pictures(args.kind, 10 * (args.server_per_category + args.per_category))
        store(real[: 10 * args.server_per_category])
        names = [label for _, label in real[10 * args.server_per_category :]]
        phone_pictures = [image.convert("RGB") for image, _ in real[10 * args.server_per_category :]]
    with session_scope() as session:
        production = start_training({"epochs": args.full_epochs, "image_size": 64, "batch_size": 32}, session=session)
    with session_scope() as session:
        version = run_training_round(production.id, session=session)
        round_ = session.get(TrainingRound, production.id)
        config = TrainingConfig(**round_.parameters)
        classes = list(round_.classes)
        data = load_split(round_, config, classes, SilentReporter(round_), session=session)
    model = build_model(config.architecture, len(classes))
    model.load_state_dict(registry.load_checkpoint(version)["state_dict"])
    model.eval()
    backbone = federated.backbone_of(model)

    def pixels(image):
        return torch.from_numpy(np.asarray(image.resize((64, 64)), dtype=np.uint8).copy()).permute(2, 0, 1)

    with torch.no_grad():
        f_phones = backbone(normalize(torch.stack([pixels(p) for p in phone_pictures])))
        f_test = backbone(normalize(data.x_test))
    y_phones = torch.tensor([classes.index(n) for n in names])
    start_weight, start_bias = head(model).weight.detach().clone(), head(model).bias.detach().clone()

    def sgd(weight, bias, features, labels, epochs, lr, seed):
        weight, bias = weight.clone().requires_grad_(), bias.clone().requires_grad_()
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs):
            for idx in torch.randperm(len(labels), generator=generator).split(args.batch_size):
                loss = nn.functional.cross_entropy(features[idx] @ weight.T + bias, labels[idx])
                grad_w, grad_b = torch.autograd.grad(loss, (weight, bias))
                with torch.no_grad():
                    weight -= lr * grad_w
                    bias -= lr * grad_b
        return weight.detach(), bias.detach()

    def accuracy(weight, bias) -> float:
        return 100.0 * float(((f_test @ weight.T + bias).argmax(1) == data.y_test).float().mean())

    def fedavg(shares, lr, rounds) -> float:
        weight, bias = start_weight.clone(), start_bias.clone()
        for number in range(1, rounds + 1):
            updates = []
            for i, share in enumerate(shares):
                if share:  # as a phone loads them: by category, then by file name
                    share = sorted(share, key=lambda k: (classes.index(names[k]), f"{k}.png"))
                    seed = number * 100 + i
                    updates.append((*sgd(weight, bias, f_phones[share], y_phones[share], 1, lr, seed), len(share)))
            total = sum(n for *_, n in updates)
            weight = sum(w * n / total for w, _, n in updates)
            bias = sum(b * n / total for _, b, n in updates)
        return accuracy(weight, bias)

    print(f"production {version.version}: {accuracy(start_weight, start_bias):.1f} % on {len(data.y_test)} test "
          f"images; {len(names)} phone pictures, {args.clients} phones, Dirichlet alpha {args.alpha}, "
          f"{args.rounds} rounds, {args.deals} deals")  # fmt: skip
    print("| learning rate | after 1 round | federated after R rounds (sd) | central, R epochs | difference (sd) |")
    print("|---|---|---|---|---|")
    for lr in (float(x) for x in args.learning_rates.split(",")):
        one, fed, central, diff = [], [], [], []
        for deal in range(1, args.deals + 1):
            shares = deal_non_iid(names, args.clients, args.alpha, seed=deal)
            one.append(fedavg(shares, lr, 1))
            fed.append(fedavg(shares, lr, args.rounds))
            central.append(accuracy(*sgd(start_weight, start_bias, f_phones, y_phones, args.rounds, lr, deal)))
            diff.append(fed[-1] - central[-1])
        print(f"| {lr:g} | {statistics.mean(one):.1f} | {statistics.mean(fed):.1f} ({statistics.stdev(fed):.1f}) | "
              f"{statistics.mean(central):.1f} | {statistics.mean(diff):+.1f} ({statistics.stdev(diff):.1f}) |")  # fmt: skip
    print(f"load average {load_average():.2f}")


if __name__ == "__main__":
    main()
