"""The tables (see ARCHITECTURE.md, "Data model")."""

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column, ForeignKey, Index, Integer, UniqueConstraint
from sqlmodel import Field, SQLModel


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(moment: datetime | None) -> datetime | None:
    """`moment` with its UTC zone (SQLite hands datetimes back without it)."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


class ImageStatus(StrEnum):
    pending = "pending"
    validated = "validated"
    rejected = "rejected"


class ImageSource(StrEnum):
    upload = "upload"
    mobile = "mobile"
    import_ = "import"


class RoundStatus(StrEnum):
    queued = "queued"
    in_progress = "in_progress"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


FINISHED_STATUSES = (RoundStatus.completed, RoundStatus.failed, RoundStatus.cancelled)
# A job's steps, in order (TrainingRound.phases; the Live metrics page shows each).
PHASES = ("preparing", "training", "exporting", "checking the phone files", "scoring", "registering")


def _json(default_factory: Any) -> Any:
    return Field(default_factory=default_factory, sa_column=Column(JSON, nullable=False))


# A class label.
class Category(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    created_at: datetime = Field(default_factory=utcnow)


# A content-addressed image file and its review state.
class TrainingImage(SQLModel, table=True):
    # For 200,000 images (migration 0010): validated counts per category, the
    # dataset per upload day and the look-alike groups read these indexes
    # alone, without visiting the rows.
    __table_args__ = (
        Index("ix_trainingimage_category_status", "category_id", "status"),
        Index("ix_trainingimage_day_category_status", "uploaded_at", "category_id", "status"),
        Index("ix_trainingimage_representative_status", "representative_id", "status"),
    )

    id: int | None = Field(default=None, primary_key=True)
    sha256: str = Field(unique=True, index=True, max_length=64)
    # Relative to the data folder.
    path: str
    original_filename: str = ""
    category_id: int = Field(foreign_key="category.id", index=True)
    status: ImageStatus = Field(default=ImageStatus.pending, index=True)
    source: ImageSource = Field(default=ImageSource.upload, index=True)
    device_id: str | None = Field(default=None, index=True)
    width: int
    height: int
    size_bytes: int
    uploaded_at: datetime = Field(default_factory=utcnow, index=True)
    uploaded_by: str | None = None
    reviewed_by: str | None = None
    reviewed_at: datetime | None = None
    # 256-bit perceptual hash (64 hex digits) for look-alike search (core/duplicates.py).
    phash: str | None = Field(default=None, index=True, max_length=64)
    # The image whose look-alike this is (its own id: it matched no earlier
    # image); a cluster is a representative and the images that matched it.
    representative_id: int | None = Field(default=None, index=True)
    # In [0, 1), fixed once per image (shared by its look-alikes): decides
    # test, validation or training (core/splits.py).
    split_key: float | None = Field(default=None, index=True)


# An image as a 64 x 64 grey thumbnail (4,096 bytes, row by row), for the
# look-alike check that confirms a hash match (core/duplicates.py). Its own
# table, so that loading images does not load these; deleted with its image.
class LookAlikeThumb(SQLModel, table=True):
    image_id: int = Field(
        sa_column=Column(Integer, ForeignKey("trainingimage.id", ondelete="CASCADE"), primary_key=True)
    )
    pixels: bytes


# One training job: parameters, life cycle and the exact dataset it saw.
class TrainingRound(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    job_id: str = Field(default_factory=lambda: str(uuid.uuid4()), unique=True, index=True)
    # What it trains with: image size "auto" resolved, Auto mode's winner.
    parameters: dict = _json(dict)
    # What the operator asked for ("train again" offers these); {}: as `parameters`.
    requested_parameters: dict = _json(dict)
    # Auto mode's search, one row per trial as it runs (core/training/auto.py):
    # {"number", "architecture", "learning_rate", "image_size", "epochs",
    #  "val_accuracy", "state", "seconds", "started_at", "note", "chosen"}.
    trials: list = _json(list)
    status: RoundStatus = Field(default=RoundStatus.queued, index=True)
    queue_task_id: str | None = None
    attempts: int = 0
    requested_by: str | None = None
    heartbeat_at: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    cancel_requested: bool = False
    # "Stop and keep the best so far": training ends after its current batch
    # and the best epoch is exported and registered like a finished job's.
    stop_requested: bool = False
    # [{"id", "sha256", "label"}, ...] in a stable order, and its hash.
    snapshot: list = _json(list)
    snapshot_hash: str = ""
    total_images: int = 0
    category_distribution: dict = _json(dict)
    classes: list = _json(list)
    warnings: list = _json(list)
    # Timestamped lines: attempts, resumes, fallbacks, the outcome.
    history: list = _json(list)
    # The steps of the job as they happen (PHASES above):
    # [{"name", "started_at", "ended_at"}, ...], ISO times, ended_at None while running.
    phases: list = _json(list)
    # What started it automatically (`new_images`, `schedule`); None: a person.
    trigger: str | None = Field(default=None, index=True)
    # Where it trained, e.g. "cpu" or "cuda:0 NVIDIA H100 (bf16)".
    device: str | None = None
    current_epoch: int = 0
    current_batch: int = 0
    total_batches: int = 0
    # Fraction of the whole job done, 0..1, updated while training.
    progress: float = 0.0
    # ModelVersion refers back to its round: this side of the cycle is added last.
    model_version_id: int | None = Field(
        default=None,
        sa_column=Column(
            Integer, ForeignKey("modelversion.id", use_alter=True, name="fk_traininground_model_version_id")
        ),
    )

    def elapsed_seconds(self, now: datetime | None = None) -> float | None:
        """Seconds from its start to its end (to `now`, default the present, while
        it runs); None before it starts."""
        if self.started_at is None:
            return None
        end = as_utc(self.finished_at) or as_utc(now) or utcnow()
        return max(0.0, (end - as_utc(self.started_at)).total_seconds())


# One epoch's figures, as the API shows them (api.schemas.EpochRow).
class EpochMetricBase(SQLModel):
    epoch: int
    train_loss: float
    train_accuracy: float
    val_loss: float
    val_accuracy: float
    learning_rate: float
    seconds: float


# The figures stored per round and epoch, written while training runs.
class EpochMetric(EpochMetricBase, table=True):
    __table_args__ = (UniqueConstraint("round_id", "epoch"),)

    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(foreign_key="traininground.id", index=True)
    created_at: datetime = Field(default_factory=utcnow)


# A trained, exported model: MAJOR.MINOR.PATCH.
class ModelVersion(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("major", "minor", "patch"),)

    id: int | None = Field(default=None, primary_key=True)
    version: str = Field(unique=True, index=True)
    major: int
    minor: int
    patch: int
    round_id: int | None = Field(default=None, foreign_key="traininground.id")
    classes: list = _json(list)
    architecture: str
    image_size: int
    # Weights and config, relative to the data folder.
    checkpoint_path: str
    # train/val accuracy (percent), per-class accuracy, confusion matrix, ...
    metrics: dict = _json(dict)
    # [{"format", "path", "sha256", "size_bytes", "runtime", "parity"}, ...]
    artifacts: list = _json(list)
    is_production: bool = Field(default=False, index=True)
    created_at: datetime = Field(default_factory=utcnow)
    promoted_at: datetime | None = None
    # The promotion gate's decision when the version was made (core/gate.py).
    gate: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))


# A version's prediction for one test image, recorded when the version was made (core/gate.py).
class TestPrediction(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("version_id", "image_id"),)

    id: int | None = Field(default=None, primary_key=True)
    version_id: int = Field(foreign_key="modelversion.id", index=True)
    image_id: int = Field(index=True)
    predicted: str


# Who moved production from one version to another, and when.
class PromotionEvent(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    from_version: str | None = None
    to_version: str | None = Field(default=None, index=True)
    action: str  # promote | rollback | auto
    by: str | None = None
    at: datetime = Field(default_factory=utcnow)
    # A person promoting a version the gate held back says why.
    reason: str | None = None
    override: bool = False


# An image the newest model thinks is probably mislabelled, and what a curator decided.
class SuspectScore(SQLModel, table=True):
    # The open suspects, most likely first, straight from the index (migration 0010).
    __table_args__ = (Index("ix_suspectscore_resolution_score", "resolution", "score"),)

    id: int | None = Field(default=None, primary_key=True)
    image_id: int = Field(foreign_key="trainingimage.id", unique=True, index=True)
    model_version: str
    given_label: str
    suggested_label: str
    # The model's probability of the given label, and how far the top class is above it.
    given_probability: float
    margin: float
    # Higher: more likely mislabelled (core/suspects.py).
    score: float = Field(index=True)
    scored_at: datetime = Field(default_factory=utcnow)
    # None: open; accepted | kept | rejected
    resolution: str | None = Field(default=None, index=True)
    resolved_by: str | None = None
    resolved_at: datetime | None = None


# Automatic retraining triggers and the promotion gate (one row, id 1), set on the Train page.
class Automation(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    new_images_enabled: bool = False
    new_images_threshold: int = 100
    schedule_enabled: bool = False
    schedule_hours: float = 24.0
    # Training parameters for automatic jobs (TrainingConfig fields); {}: the defaults.
    parameters: dict = _json(dict)
    # A new version goes to production by itself only when its test accuracy is
    # at least this many points above production's, on the same test images ...
    gate_min_improvement: float = 1.0
    # ... and no category's test accuracy fell by more than this many points ...
    gate_max_category_drop: float = 5.0
    # ... judged on at least this many test images both versions were scored on.
    gate_min_test_images: int = 30
    last_check_at: datetime | None = None
    last_check_result: str | None = None
    last_scheduled_at: datetime | None = None
    updated_by: str | None = None
    updated_at: datetime | None = None


# A bearer token for the HTTP API. Only the SHA-256 of the secret is stored.
class ApiToken(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    label: str
    # device | viewer | operator | admin (see core/access.py)
    role: str = Field(index=True)
    token_hash: str = Field(unique=True, index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    last_used_at: datetime | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None


# A person who signs in to the dashboard. The password is stored as a salted scrypt hash.
class User(SQLModel, table=True):
    # "user" is a reserved word in PostgreSQL.
    __tablename__ = "appuser"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, index=True)
    # viewer | curator | operator | admin (see core/access.py)
    role: str
    # "scrypt$n$r$p$salt_hex$hash_hex" (see core/users.py)
    password_hash: str
    active: bool = True
    created_at: datetime = Field(default_factory=utcnow)
    last_sign_in_at: datetime | None = None


# Failed sign-ins per user name or client address, for the growing wait between tries.
class SignInThrottle(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    # "name:<user name>" or "client:<address>"
    key: str = Field(unique=True, index=True)
    failures: int = 0
    last_failure_at: datetime | None = None
    blocked_until: datetime | None = None


# One consequential action: who, when, what, on what, and the state before and after.
class AuditEvent(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    at: datetime = Field(default_factory=utcnow, index=True)
    # A user name, `api:<token label>`, `cli` or `auto`.
    actor: str = Field(index=True)
    actor_role: str
    # e.g. image.validate, training.start, model.promote, user.create (see core/audit.py)
    action: str = Field(index=True)
    # e.g. image:12, job:<uuid>, model:1.1.0, user:ana, token:3
    target: str = Field(default="", index=True)
    before: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    after: dict | None = Field(default=None, sa_column=Column(JSON, nullable=True))


# A signed-in browser. Its cookie carries a random secret; only the secret's
# SHA-256 is stored (see core/sessions.py).
class BrowserSession(SQLModel, table=True):
    id: int | None = Field(default=None, primary_key=True)
    user_id: int = Field(foreign_key="appuser.id", index=True)
    # The one-time ticket the sign-in form hands to the browser, exchanged for
    # the cookie within a minute; cleared once used.
    ticket_hash: str | None = Field(default=None, unique=True, index=True, max_length=64)
    # Set when the ticket is exchanged: the cookie's secret.
    token_hash: str | None = Field(default=None, unique=True, index=True, max_length=64)
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime
    revoked_at: datetime | None = None


# How often each kind of row changed ("models", "rounds", "tokens"): bumped in
# the transaction that changes them (core/changes.py), so a process that
# caches answers derived from them knows, with one read, whether they still hold.
class ChangeStamp(SQLModel, table=True):
    kind: str = Field(primary_key=True, max_length=20)
    counter: int = 0


# One aggregation round of a federated training round (core/federated.py):
# the plan the phones fetch, open until its deadline or its aggregation.
class FederatedPlan(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("round_id", "number"),)
    id: int | None = Field(default=None, primary_key=True)
    round_id: int = Field(foreign_key="traininground.id", index=True)
    # 1..rounds: each starts from the aggregate of the one before.
    number: int
    # open | aggregating | closed | failed
    status: str = Field(default="open", index=True)
    deadline_at: datetime
    # [{"name": "backbone"|"head", "path", "sha256", "size_bytes"}], paths under DATA_DIR.
    files: list = _json(list)
    # The head the phones start from ({"weight", "bias"} as a .pt under DATA_DIR).
    head_path: str
    # Set at aggregation: accepted updates averaged, the head's accuracy on
    # the server's test images (percent) and how many they were, and why a
    # plan failed.
    clients: int = 0
    test_accuracy: float | None = None
    test_images: int = 0
    error: str | None = None
    created_at: datetime = Field(default_factory=utcnow)
    closed_at: datetime | None = None


# A phone that fetched a plan's trainable head: it is working on the plan
# until its update arrives (Live metrics names it among the pending ones).
class FederatedFetch(SQLModel, table=True):
    __table_args__ = (UniqueConstraint("plan_id", "token_id"),)
    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="federatedplan.id", index=True)
    token_id: int
    device: str
    fetched_at: datetime = Field(default_factory=utcnow)


# One update a phone sent for a plan, accepted (its weights kept until the
# plan is aggregated) or refused (with the reason the phone was given).
class FederatedUpdate(SQLModel, table=True):
    # At most one accepted update per device and plan, enforced by the
    # database: `accepted_token_id` is the token's id when accepted, else NULL.
    __table_args__ = (UniqueConstraint("plan_id", "accepted_token_id"),)
    id: int | None = Field(default=None, primary_key=True)
    plan_id: int = Field(foreign_key="federatedplan.id", index=True)
    token_id: int = Field(index=True)
    device: str
    accepted_token_id: int | None = None
    # accepted | refused
    status: str = Field(index=True)
    reason: str | None = None
    num_examples: int = 0
    # What the phone measured on its own pictures (loss, accuracy, seconds).
    metrics: dict = _json(dict)
    # The head's new weights as .npz bytes (`weight`, `bias`); None when refused.
    weights: bytes | None = None
    # L2 distance from the plan's starting head.
    update_norm: float | None = None
    received_at: datetime = Field(default_factory=utcnow)
