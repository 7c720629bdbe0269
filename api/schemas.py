"""Request and response bodies. Ranges are not repeated here: the training
parameters are checked by `core.training.config.TrainingConfig.from_params`."""

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, WrapValidator
from pydantic_core import PydanticCustomError

from core.models import EpochMetricBase, as_utc
from core.training.config import (
    ARCHITECTURES,
    AUTO,
    AUTO_BUDGET_MINUTES,
    PARAM_RANGES,
    TRAINING_MODES,
    TrainingConfig,
    param_range,
)

# Datetimes come back from SQLite without a zone; they are UTC.
UtcDatetime = Annotated[datetime, AfterValidator(as_utc)]

_DEFAULTS = TrainingConfig()


def _one_image_size_error(value: Any, handler) -> Any:
    # One message for the field, not one per member of the union.
    try:
        return handler(value)
    except ValidationError:
        raise PydanticCustomError("image_size", "Input should be a whole number of pixels or 'auto'") from None


ImageSize = Annotated[int | Literal[AUTO], WrapValidator(_one_image_size_error)]


def allowed_range(name: str) -> str | None:
    """'between 1 and 500' for a training parameter, None for other fields."""
    if name not in PARAM_RANGES:
        return None
    _, low, high = param_range(name)
    return f"between {low:g} and {high:g}"


def _param(name: str, text: str) -> Any:
    extra = allowed_range(name)
    return Field(getattr(_DEFAULTS, name), description=f"{text}; {extra}" if extra else text)


# POST /models/train/: the original four fields and the dashboard's advanced ones.
class TrainRequest(BaseModel):
    # Unknown fields reach TrainingConfig.from_params, which names them in its error.
    # Strict: JSON types as written (`true` is not 1, "5" is not 5).
    model_config = ConfigDict(extra="allow", strict=True)

    epochs: int = _param("epochs", "Passes over the training images")
    batch_size: int = _param("batch_size", "Images per optimisation step")
    learning_rate: float = _param(
        "learning_rate",
        "Base learning rate: AdamW warms up to 3x it, then a cosine to zero (README, How training works); "
        "training_mode `federated`: the phones' SGD step, 0.05 when not given",
    )
    use_existing_model: bool = _param(
        "use_existing_model", "Fine-tune the production model when its classes and architecture match"
    )
    architecture: str = _param("architecture", f"One of {', '.join(ARCHITECTURES)}")
    image_size: ImageSize = _param(
        "image_size",
        "Input size in pixels (square), or `auto`: the validated images' median short side, "
        "rounded to a multiple of 32 between 32 and 224 (recorded on the round)",
    )
    val_split: float = _param("val_split", "Fraction of each category held out for validation")
    seed: int = _param("seed", "Random seed for the split and the initialisation")
    training_mode: str = _param(
        "training_mode",
        f"One of {', '.join(TRAINING_MODES)}: `head` trains only the classifier on a frozen pretrained backbone "
        "(ImageNet weights, else the production model's), a quick retrain; `auto` searches architecture, "
        "learning rate and image size within `budget_minutes`, then trains the best to the end",
    )
    processes: int = _param(
        "processes",
        "Processes that train the job together (PyTorch DDP: gloo on the CPU, NCCL with one GPU each); "
        "at most MAX_TRAINING_PROCESSES; `full` mode only",
    )
    budget_minutes: float | None = _param(
        "budget_minutes",
        f"training_mode `auto` only: minutes for the search and the winner's training (default "
        f"{AUTO_BUDGET_MINUTES:g}; fractions allowed)",
    )


class TrainResponse(BaseModel):
    job_id: str
    training_round_id: int
    status: str
    message: str
    parameters: dict[str, Any]
    warnings: list[str]


# An epoch's figures in a status answer: the table's fields without its keys.
class EpochRow(EpochMetricBase):
    pass


# The original shapes: `metrics` holds the dataset while running, and the
# model's accuracies (percent) too once completed.
class TrainingStatus(BaseModel):
    job_id: str
    training_round_id: int
    status: str
    queue_status: str = Field(
        description="The queue's view of the job, in Celery's words: PENDING, STARTED, SUCCESS, FAILURE, REVOKED"
    )
    celery_status: str = Field(
        description="The same value as `queue_status`, kept for apps written for the original pipeline "
        "(Django + Celery); new apps read `queue_status`"
    )
    start_time: UtcDatetime | None = Field(description="When a worker started the job (ISO 8601, UTC)")
    finished_time: UtcDatetime | None
    attempts: int
    current_epoch: int
    total_epochs: int
    current_batch: int
    total_batches: int
    progress: float = Field(description="Fraction of the whole job done, 0..1")
    epoch_metrics: list[EpochRow]
    metrics: dict[str, Any]
    warnings: list[str]
    cancel_requested: bool
    error: str | None = None
    trials: list[dict[str, Any]] = Field(
        default_factory=list,
        description="training_mode `auto`: the search's trials as they run (architecture, learning_rate, "
        "image_size, epochs, val_accuracy, state running/kept/pruned/failed, seconds, note, chosen)",
    )
    model_version: str | None = None
    model_version_id: int | None = None
    accuracy: float | None = Field(None, description="Validation accuracy in percent, as `metrics.val_accuracy`")
    duration_minutes: float | None = Field(None, description="From start to finish, in minutes")


class CancelResponse(BaseModel):
    job_id: str
    training_round_id: int
    status: str
    queue_status: str
    message: str


class ModelInput(BaseModel):
    shape: list[int]
    layout: str
    dtype: str
    color: str
    resize: str
    scale: float
    mean: list[float]
    std: list[float]


class ArtifactEntry(BaseModel):
    format: str
    filename: str
    url: str
    sha256: str
    size_bytes: int
    runtime: str


class ModelManifest(BaseModel):
    version: str
    model_version_id: int
    created: UtcDatetime
    is_production: bool
    architecture: str
    classes: list[str] = Field(description="Class names in the model's output order")
    num_classes: int
    input: ModelInput
    metrics: dict[str, bool | int | float | None] = Field(
        description="Accuracies in percent, each with its images, right answers and 95% Wilson interval; "
        "near_chance: test accuracy not clearly above always answering the commonest category"
    )
    artifacts: list[ArtifactEntry]


class FileOutcome(BaseModel):
    filename: str
    outcome: str = Field(description="stored, duplicate or refused")
    image_id: int | None = Field(None, description="The new image, or the one it duplicates")
    reason: str | None = None


class UploadResponse(BaseModel):
    category: str
    device_id: str | None
    stored: int
    duplicates: int
    refused: int
    message: str
    results: list[FileOutcome]


class CategoryEntry(BaseModel):
    name: str
    validated_images: int


class CategoryList(BaseModel):
    categories: list[CategoryEntry]


class Health(BaseModel):
    # ok, degraded (serving, but something needs the operator) or unavailable (503)
    status: str
    database: str
    queue: str
    # Training tasks in the queue, and queued rounds it does not hold (the
    # worker's sweep enqueues those).
    queued_jobs: int | None = None
    missing_from_queue: int | None = None
    disk: str
    free_disk_bytes: int | None = None
    detail: str | None = None
