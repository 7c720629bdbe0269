"""One settings object, read from the environment (and an optional `.env`)."""

import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    """Everything configurable. Each field maps to an upper-case variable."""

    model_config = SettingsConfigDict(env_file=".env", extra="ignore")

    # Everything the product writes lives under this folder.
    data_dir: Path = REPO_ROOT
    # Default: the SQLite file `data.db` inside DATA_DIR. PostgreSQL:
    # postgresql://user:password@host/dbname (driver: psycopg 3).
    database_url: str = ""
    # Default: Huey's SQLite storage, `queue.db` in DATA_DIR (one machine).
    # redis://host:6379/0 shares one queue between consumers on many machines.
    queue_url: str = ""
    min_training_images: int = Field(50, ge=2)
    # Each category needs one image to train on and one to validate with.
    min_images_per_category: int = Field(2, ge=2)
    # Share of images held out as the test set, never trained on (core/splits.py).
    # Changing it moves images between test and training: set it once.
    test_split: float = Field(0.15, ge=0.0, le=0.5)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    # One API upload request (POST /api/images/): its whole body, and its files.
    max_request_bytes: int = Field(100 * 1024 * 1024, ge=1024)
    max_upload_files: int = Field(100, ge=1)
    # A .zip is refused before anything in it is decompressed when its entries
    # add up to more than this (uncompressed) or it holds more entries than
    # this. Photos barely compress, so the web server's 200 MB upload limit
    # stays well under it; a zip bomb does not.
    max_archive_bytes: int = Field(512 * 1024 * 1024, ge=1024)
    max_archive_entries: int = Field(5000, ge=1)
    # Larger images are refused as decompression bombs (default 50 megapixels).
    max_image_pixels: int = Field(50_000_000, ge=1024)
    # Below this much free space in DATA_DIR, /api/health/ says `degraded`.
    min_free_disk_bytes: int = Field(1024**3, ge=0)
    # Image files that no row refers to (a server killed mid-upload leaves
    # them) are removed by the worker once they are this old (seconds): long
    # enough for any upload still in progress to commit its rows.
    orphan_grace_seconds: float = Field(600.0, ge=0)
    # SQLite waits this long for a lock before reporting "database is locked".
    sqlite_busy_timeout_ms: int = Field(30_000, ge=0)
    # How often an idle consumer looks for new work (seconds).
    queue_poll_interval: float = Field(0.1, gt=0, le=5)
    training_retries: int = Field(2, ge=0)
    # A running job writes a heartbeat this often (seconds); a job whose last
    # heartbeat is older than the timeout lost its worker and is re-enqueued.
    heartbeat_interval: float = Field(5.0, gt=0)
    heartbeat_timeout: float = Field(60.0, gt=0)
    # Whether a finished model becomes production by itself: a first version
    # clearly better than chance, then versions that pass the promotion gate
    # (`gate`, see core/gate.py), only such a first version (`first`), every
    # time (`always`) or never (`never`).
    auto_promote: Literal["gate", "first", "always", "never"] = "gate"
    # Folder for torchvision's ImageNet weight files (default DATA_DIR/weights;
    # the torch hub cache is searched too). Missing files are downloaded into it
    # once, checked against the hash in their published name.
    weights_dir: Path | None = None
    # Off for air-gapped installs: training then uses only files already on disk.
    weights_download: bool = True
    # A mirror to download from instead of torchvision's own server
    # (https://download.pytorch.org/models): the base URL the file names are added to.
    weights_url: str = ""
    # Seconds a weights download may wait for the server before giving up.
    weights_timeout: float = Field(15.0, gt=0)
    # CPU threads for training; 0: all cores (see `training_threads`).
    torch_threads: int = Field(0, ge=0)
    # Decoded images and backbone features kept in memory by a worker process
    # (least recently used dropped first); the rest is read from DATA_DIR/cache.
    cache_max_bytes: int = Field(1024**3, ge=0)
    # A round whose decoded images (3 x size x size bytes each) add up to more
    # than this trains from one file of them in its round folder, read batch
    # by batch, so a worker's memory does not grow with the dataset; smaller
    # rounds hold them in memory. 0: always from the file.
    training_images_max_bytes: int = Field(2 * 1024**3, ge=0)
    # `auto`: a CUDA GPU when there is one (with mixed precision), else the CPU.
    training_device: Literal["auto", "cpu", "cuda"] = "auto"
    # On a CPU with native bfloat16 (AVX-512 BF16, AMX), train the
    # architectures that it speeds up (resnet18) in bfloat16 autocast;
    # evaluation and the recorded accuracies stay float32. false: always float32.
    training_cpu_bf16: bool = True
    # The most processes (DDP ranks) one job may ask for; on CUDA each needs its own GPU.
    max_training_processes: int = Field(4, ge=1)

    # A federated update (core/training/federated.py) may move the head's
    # weights this far (L2 norm of the change) in one round; larger ones are
    # refused as broken or hostile. A few local epochs of SGD at the plan's
    # learning rate move a head by well under 10.
    federated_max_update_norm: float = Field(50.0, gt=0)

    # Reverse proxies whose X-Forwarded-For is believed (comma-separated
    # addresses or networks, `*` for any): sign-in throttling then counts the
    # visitor's address, not the proxy's. The same variable uvicorn reads;
    # `python -m cli serve` hands it to the web server.
    forwarded_allow_ips: str = "127.0.0.1,::1"
    # A dashboard sign-in lasts this long (hours), then the browser asks again.
    session_hours: float = Field(12.0, gt=0, le=24 * 30)
    # Send the session cookie only over HTTPS: set it true behind TLS (docs/deploy.md).
    session_cookie_secure: bool = False
    # The address people and phones use to reach the server, e.g.
    # https://train.example.com (behind a reverse proxy: the proxy's address).
    # Links the API hands out (the manifest's downloads) start with it; when
    # empty they are relative (/api/...), never built from the request's Host
    # header, which any client can set.
    public_url: str = ""
    # Whether /api/docs and /api/redoc serve the interactive API documentation
    # (its scripts are served by this server, nothing from a CDN).
    api_docs: bool = True

    # Which files each version is exported to, in order: `ptl` (PyTorch's lite
    # interpreter) and/or `pte` (ExecuTorch). Phones fetch the one they run.
    export_formats: str = "ptl,pte"

    @field_validator("export_formats")
    @classmethod
    def _known_formats(cls, value: str) -> str:
        names = list(dict.fromkeys(n.strip() for n in value.split(",") if n.strip()))
        if not names or set(names) - {"ptl", "pte"}:
            raise ValueError(f"EXPORT_FORMATS must list ptl and/or pte, comma-separated (got {value!r})")
        return ",".join(names)

    @property
    def formats(self) -> tuple[str, ...]:
        return tuple(self.export_formats.split(","))

    @field_validator("public_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if value and (not value.startswith(("http://", "https://")) or "?" in value or "#" in value):
            raise ValueError(
                f"PUBLIC_URL must be empty or an http(s):// address, e.g. https://train.example.com (got {value!r})"
            )
        return value

    @field_validator("data_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("queue_url")
    @classmethod
    def _known_queue(cls, value: str) -> str:
        if value and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("QUEUE_URL must be empty (SQLite in DATA_DIR) or a redis:// URL")
        return value

    @property
    def db_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.data_dir / 'data.db'}"
        # Plain postgresql:// means psycopg 3 here (the driver we install).
        for prefix in ("postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url

    @property
    def queue_path(self) -> Path:
        return self.data_dir / "queue.db"

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def thumbnails_dir(self) -> Path:
        return self.data_dir / "thumbnails"

    @property
    def rounds_dir(self) -> Path:
        return self.data_dir / "rounds"

    @property
    def training_threads(self) -> int:
        # All cores by default: on an idle 2-core machine two threads train
        # 1.2-1.8x faster than one (mobilenet_v3_small 64 px 660 -> 796,
        # resnet18 64 px 146 -> 268 images/s). PyTorch's threads wait for each
        # other at every operation, so on a machine busy with other heavy work
        # one thread can be many times faster (BENCHMARKS.md): set
        # TORCH_THREADS=1 there.
        return self.torch_threads or max(1, os.cpu_count() or 1)

    @property
    def weights_folder(self) -> Path:
        return self.weights_dir or self.data_dir / "weights"

    @property
    def cache_dir(self) -> Path:
        return self.data_dir / "cache"

    @property
    def checkpoints_dir(self) -> Path:
        return self.data_dir / "checkpoints"

    @property
    def mobile_models_dir(self) -> Path:
        return self.data_dir / "mobile_models"


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings; tests clear the cache after changing the env."""
    return Settings()
