"""ImageNet weights downloaded once, from a local server standing in for
torchvision's (WEIGHTS_URL): kept when the hash in their name matches,
refused when not, and a plain notice when the server cannot be reached."""

import hashlib
import http.server
import threading

import pytest
import torch
import torchvision

from core.config import get_settings
from core.db import read_session
from core.models import RoundStatus, TrainingRound
from core.training.networks import build_model, find_pretrained_weights
from jobs import submit_training
from tests.factories import add_demo, as_actor
from tests.servers import free_port

JOB = {"epochs": 1, "batch_size": 16, "image_size": 32, "use_existing_model": False}
PUBLISHED = torchvision.models.get_model_weights("mobilenet_v3_small").DEFAULT.value


class WeightsServer:
    """Serves `files` (name -> bytes) under /models/ on loopback and counts the requests."""

    def __init__(self, files: dict[str, bytes]):
        requests = self.requests = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                data = files.get(self.path.removeprefix("/models/"))
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/models"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def download_from(monkeypatch, immediate_huey, ptl_only, session):
    """Downloads on, from the given base URL; a small validated dataset."""
    monkeypatch.setenv("MIN_TRAINING_IMAGES", "20")
    add_demo(session, per_category=4, size=32)
    servers = []

    def use(url: str):
        monkeypatch.setenv("WEIGHTS_DOWNLOAD", "true")
        monkeypatch.setenv("WEIGHTS_URL", url)
        get_settings.cache_clear()

    def serve(files: dict[str, bytes]) -> WeightsServer:
        server = WeightsServer(files)
        servers.append(server)
        use(server.url)
        return server

    use.serve = serve
    yield use
    for server in servers:
        server.close()


def train() -> TrainingRound:
    round_ = submit_training(JOB, actor=as_actor("test"))
    with read_session() as reader:
        return reader.get(TrainingRound, round_.id)


def test_weights_are_downloaded_once_verified_and_trained_from(download_from, monkeypatch, tmp_path):
    # torchvision's real file cannot be fetched here, so the test publishes its
    # own: ImageNet-shaped weights whose name carries their hash, as torchvision's do.
    path = tmp_path / "weights.pth"
    torch.save(build_model("mobilenet_v3_small", 1000).state_dict(), path)
    data = path.read_bytes()
    name = f"mobilenet_v3_small-{hashlib.sha256(data).hexdigest()[:8]}.pth"
    monkeypatch.setattr(PUBLISHED, "url", f"https://download.pytorch.org/models/{name}")
    server = download_from.serve({name: data})

    round_ = train()

    assert round_.status == RoundStatus.completed
    kept = get_settings().weights_folder / name
    assert kept.read_bytes() == data and sorted(p.name for p in kept.parent.iterdir()) == [name]
    history = "\n".join(round_.history)
    assert f"downloading ImageNet weights for mobilenet_v3_small from {server.url}/{name}" in history
    assert f"downloaded {len(data) / 1e6:.1f} of {len(data) / 1e6:.1f} MB of {name}" in history
    assert f"verified {name}" in history and f"starting from ImageNet weights ({name})" in history
    assert not any("random initialisation" in w for w in round_.warnings)
    # Once: the next round finds the file and asks the server nothing.
    assert find_pretrained_weights("mobilenet_v3_small") == kept
    assert train().status == RoundStatus.completed
    assert server.requests == [f"/models/{name}"]


def test_a_file_whose_hash_differs_from_its_name_is_refused_and_nothing_is_kept(download_from):
    name = PUBLISHED.url.rsplit("/", 1)[-1]
    server = download_from.serve({name: b"not the weights torchvision published"})

    round_ = train()

    assert server.requests == [f"/models/{name}"]
    assert round_.status == RoundStatus.completed
    (warning,) = [w for w in round_.warnings if "ImageNet" in w]
    assert "not the published 047dcff4" in warning and "refused" in warning
    assert "trains from random initialisation" in warning
    folder = get_settings().weights_folder
    assert not folder.exists() or list(folder.iterdir()) == []


@pytest.mark.parametrize("why", ["server down", "downloads off"])
def test_without_weights_the_round_says_it_trains_from_random_initialisation_and_how_to_add_them(
    download_from, monkeypatch, why
):
    download_from(f"http://127.0.0.1:{free_port()}/models")  # nothing listens there any more
    if why == "downloads off":
        monkeypatch.setenv("WEIGHTS_DOWNLOAD", "false")
        get_settings.cache_clear()

    round_ = train()

    assert round_.status == RoundStatus.completed
    (warning,) = [w for w in round_.warnings if "ImageNet" in w]
    expected = "the download failed (" if why == "server down" else "downloading them is off (WEIGHTS_DOWNLOAD=false)"
    assert expected in warning
    assert "the model trains from random initialisation" in warning
    assert f"put mobilenet_v3_small-047dcff4.pth (from {PUBLISHED.url}) into {get_settings().weights_folder}" in warning
