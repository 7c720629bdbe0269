"""The reference federated client: what a phone app does to take part in a
federated round, with the same files and the ExecuTorch training runtime
(docs/federated.md puts the Kotlin and Swift calls next to these).

    python -m clients.federated --server http://127.0.0.1:8501 --token tdb_... --pictures DIR

DIR holds one folder per category (the plan's class names) of pictures; they
never leave this process. Each run fetches the open plan and its files
(checked against their SHA-256; kept by hash, so an unchanged file is not
fetched again), computes the backbone's features with the inference `.pte`,
trains the head `.pte` for the plan's local epochs with plain SGD, and sends
the head's new weights as an .npz with the number of pictures and the local
loss and accuracy. `--rounds N` takes part in N rounds in turn.
"""

import argparse
import hashlib
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


class Client:
    """One phone: a server address, a device token and a folder of files."""

    def __init__(self, server: str, token: str, cache: Path, timeout: float = 60):
        self.server, self.cache, self.timeout = server.rstrip("/"), cache, timeout
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {token}"

    def plan(self, wait: float = 0, after: int | None = None) -> dict:
        """The open plan (a later one than plan `after`), waiting up to
        `wait` seconds for one; RuntimeError with the server's reason if none."""
        deadline = time.monotonic() + wait
        while True:
            answer = self.http.get(f"{self.server}/api/federated/plan/", timeout=self.timeout)
            if answer.status_code == 200 and answer.json()["plan_id"] != after:
                return answer.json()
            if time.monotonic() >= deadline:
                raise RuntimeError(f"no federated plan: {answer.status_code} {answer.text}")
            time.sleep(0.5)

    def file(self, entry: dict) -> bytes:
        """A plan file, from the local copy when its SHA-256 still matches."""
        local = self.cache / f"{entry['sha256']}.pte"
        if local.is_file():
            return local.read_bytes()
        url = entry["url"] if entry["url"].startswith("http") else self.server + entry["url"]
        answer = self.http.get(url, timeout=self.timeout)
        answer.raise_for_status()
        if hashlib.sha256(answer.content).hexdigest() != entry["sha256"]:
            raise RuntimeError(f"{entry['name']} does not match the plan's SHA-256: refusing to run it")
        self.cache.mkdir(parents=True, exist_ok=True)
        local.write_bytes(answer.content)
        return answer.content

    def send(self, plan: dict, weights: dict[str, np.ndarray], num_examples: int, metrics: dict) -> requests.Response:
        """The update as multipart: an .npz of float32 arrays and three fields."""
        out = io.BytesIO()
        np.savez(out, **{k: np.asarray(v, dtype=np.float32) for k, v in weights.items()})
        data = {"plan_id": plan["plan_id"], "kind": "weights", "num_examples": num_examples,
                "metrics": json.dumps(metrics)}  # fmt: skip
        files = {"update": ("update.npz", out.getvalue(), "application/octet-stream")}
        return self.http.post(f"{self.server}/api/federated/updates/", data=data, files=files, timeout=self.timeout)


def load_pictures(folder: Path, plan: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The pictures under `folder/<class>/`, resized and normalised as the
    plan says, and their class indices."""
    size, norm = plan["image_size"], plan["normalization"]
    mean = torch.tensor(norm["mean"]).view(3, 1, 1)
    std = torch.tensor(norm["std"]).view(3, 1, 1)
    images, labels = [], []
    for index, name in enumerate(plan["classes"]):
        for path in sorted((folder / name).glob("*")) if (folder / name).is_dir() else []:
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
            images.append((torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255 - mean) / std)
            labels.append(index)
    if not images:
        raise RuntimeError(f"no pictures of the plan's categories ({', '.join(plan['classes'])}) under {folder}")
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)


def backbone_features(program: bytes, images: torch.Tensor) -> torch.Tensor:
    """The frozen backbone's features, one picture at a time (as on a phone)."""
    from executorch.runtime import Runtime

    method = Runtime.get().load_program(program).load_method("forward")
    return torch.cat([method.execute([images[i : i + 1].contiguous()])[0] for i in range(len(images))])


def train_head(
    program: bytes, features: torch.Tensor, labels: torch.Tensor, *, epochs: int, learning_rate: float,
    batch_size: int, seed: int = 0,
) -> tuple[dict[str, np.ndarray], dict]:  # fmt: skip
    """Train the head in ExecuTorch's training runtime: shuffled batches,
    forward and backward in the program, an SGD step after each; returns the
    head's weights and the local metrics (loss and accuracy of the last epoch)."""
    from executorch.extension.training import _load_for_executorch_for_training_from_buffer, get_sgd_optimizer

    module = _load_for_executorch_for_training_from_buffer(program)
    parameters, optimizer = None, None
    generator = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        total, correct = 0.0, 0
        for idx in torch.randperm(len(labels), generator=generator).split(batch_size):
            loss, predicted = module.forward_backward("forward", (features[idx].contiguous(), labels[idx].contiguous()))
            if optimizer is None:  # the runtime hands out its parameters only after a first pass
                parameters = module.named_parameters()
                optimizer = get_sgd_optimizer(parameters, learning_rate, 0.0, 0.0, 0.0, False)
            optimizer.step(module.named_gradients())
            total += float(loss) * len(idx)
            correct += int((predicted == labels[idx]).sum())
    weights = {name.removeprefix("head."): tensor.detach().numpy().copy() for name, tensor in parameters.items()}
    metrics = {"loss": total / len(labels), "accuracy": 100.0 * correct / len(labels),
               "seconds": time.perf_counter() - started}  # fmt: skip
    return weights, metrics


def take_part(client: Client, pictures: Path, *, wait: float, after: int | None = None, seed: int = 0) -> dict:
    """One round: plan, files, features, local training, update. Returns
    what happened (the plan id, the server's answer, the update's size)."""
    plan = client.plan(wait, after)
    files = {entry["name"]: entry for entry in plan["files"]}
    images, labels = load_pictures(pictures, plan)
    features = backbone_features(client.file(files["backbone"]), images)
    weights, metrics = train_head(
        client.file(files["head"]), features, labels, epochs=plan["local_epochs"],
        learning_rate=plan["learning_rate"], batch_size=plan["batch_size"], seed=seed,
    )  # fmt: skip
    answer = client.send(plan, weights, len(labels), metrics)
    return {"plan_id": plan["plan_id"], "round": plan["round"], "status": answer.status_code,
            "answer": answer.json(), "examples": len(labels), "metrics": metrics}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients.federated", description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", required=True, help="the server's address, e.g. http://127.0.0.1:8501")
    parser.add_argument("--token", required=True, help="a device token (python -m cli token create --role device)")
    parser.add_argument("--pictures", type=Path, required=True, help="a folder with one folder per category")
    parser.add_argument("--rounds", type=int, default=1, help="federated rounds to take part in, one after another")
    parser.add_argument("--wait", type=float, default=600, help="seconds to wait for each plan")
    parser.add_argument("--cache", type=Path, default=Path(".federated-cache"), help="where plan files are kept")
    parser.add_argument("--seed", type=int, default=0, help="the local shuffling's seed")
    args = parser.parse_args(argv)
    client = Client(args.server, args.token, args.cache)
    after = None
    for _ in range(args.rounds):
        outcome = take_part(client, args.pictures, wait=args.wait, after=after, seed=args.seed)
        print(json.dumps(outcome), flush=True)
        if outcome["status"] != 201:
            return 1
        after = outcome["plan_id"]
    return 0


if __name__ == "__main__":
    sys.exit(main())
