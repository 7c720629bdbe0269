"""A job's parameters: `TrainingConfig`, the allowed values and ranges, and
the checks the API, the Train page and the CLI share.

Imports no torch, so the pages and the API can read the ranges cheaply."""

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace

from sqlmodel import Session, col, select

from core.config import get_settings
from core.errors import UserError, check_number
from core.models import TrainingRound

ARCHITECTURES = ("mobilenet_v3_small", "resnet18", "efficientnet_b0")
# `image_size` "auto": chosen from the snapshot's pictures (`choose_image_size`).
AUTO = "auto"
# `full` trains every layer; `head` freezes a pretrained backbone, computes its
# features once per image and trains only the classifier (a quick retrain);
# `auto` searches architecture, learning rate and image size within
# `budget_minutes`, then trains the winner as `full` (core/training/auto.py);
# `federated`: phones train the production model's head on their own pictures
# and the server averages their updates (core/federated.py).
FEDERATED = "federated"
TRAINING_MODES = ("full", "head", AUTO, FEDERATED)
# A federated round's own parameters and their defaults (other modes take none).
FEDERATED_DEFAULTS = {
    "rounds": 1,
    "local_epochs": 1,
    "min_clients": 2,
    "deadline_minutes": 60.0,
    "fedprox_mu": 0.0,
}
# A federated round's learning rate when none is given: the phones run plain
# SGD on a linear head, for which the seed contract's 0.001 (an AdamW rate)
# barely moves it (bench/federated_deals.py: 53.4 -> 55.3 % after 10 rounds
# on the demo shapes, 74.0 -> 74.4 % on digits; 0.05: 62.1 and 82.7 %).
FEDERATED_LEARNING_RATE = 0.05
# Auto mode's time budget when none is given.
AUTO_BUDGET_MINUTES = 10.0
# What "auto" may choose: a multiple of 32 between these (224 is what the
# architectures were designed for; more costs compute and adds no information).
AUTO_IMAGE_SIZE_RANGE = (32, 224)


@dataclass(frozen=True)
class TrainingConfig:
    """A job's parameters; checkpoints carry it so a model can be rebuilt."""

    epochs: int = 20
    batch_size: int = 32
    learning_rate: float = 0.001
    use_existing_model: bool = True
    architecture: str = "mobilenet_v3_small"
    # "auto": the pictures' median short side (`choose_image_size`), resolved
    # to a number when the round is queued; a number always wins.
    image_size: int | str = AUTO
    val_split: float = 0.2
    seed: int = 42
    # `full` by default: it works on a fresh install (no pretrained backbone
    # needed) and adapts every layer to the images; `head` is the quick retrain.
    training_mode: str = "full"
    # Processes (DDP ranks) that train the job together; at most MAX_TRAINING_PROCESSES.
    processes: int = 1
    # training_mode "auto" only: minutes for the search and the winner's training.
    budget_minutes: float | None = None
    # training_mode "federated" only (FEDERATED_DEFAULTS): aggregation rounds
    # in sequence, the phones' passes over their pictures per round, updates
    # needed before the deadline (minutes after each plan is published), and
    # FedProx's proximal weight mu (0: plain FedAvg). `learning_rate` and
    # `batch_size` are the phones' (plain SGD on the head).
    rounds: int | None = None
    local_epochs: int | None = None
    min_clients: int | None = None
    deadline_minutes: float | None = None
    fedprox_mu: float | None = None

    def to_dict(self) -> dict:
        # Rounds of other modes keep the parameters they always had.
        values = asdict(self)
        if self.training_mode != FEDERATED:
            values = {k: v for k, v in values.items() if k not in FEDERATED_DEFAULTS}
        return values

    @classmethod
    def from_params(cls, params: Mapping | None) -> "TrainingConfig":
        """Validate user-supplied parameters; unknown, missing-typed or
        out-of-range values raise UserError naming the field and the range."""
        params = dict(params or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise UserError(f"Unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        values = {}
        for name, value in params.items():
            if value is None:
                continue
            values[name] = _check_param(name, value)
        config = cls(**values)
        if config.budget_minutes is not None and config.training_mode != AUTO:
            raise UserError(
                f"A time budget applies to training mode auto only (got training mode {config.training_mode}): "
                "leave the budget out, or choose training mode auto"
            )
        federated = sorted(k for k in FEDERATED_DEFAULTS if getattr(config, k) is not None)
        if config.training_mode == FEDERATED:
            config = replace(config, **{k: v for k, v in FEDERATED_DEFAULTS.items() if getattr(config, k) is None})
            if params.get("learning_rate") is None:
                config = replace(config, learning_rate=FEDERATED_LEARNING_RATE)
            if config.processes > 1:
                raise UserError(
                    f"Training mode federated trains on the phones; the server runs it in one process. "
                    f"Set processes to 1 (got {config.processes})"
                )
        elif federated:
            raise UserError(
                f"{', '.join(federated)} apply to training mode federated only (got training mode "
                f"{config.training_mode}): leave them out, or choose training mode federated"
            )
        if config.training_mode == AUTO and config.budget_minutes is None:
            config = replace(config, budget_minutes=AUTO_BUDGET_MINUTES)
        if config.training_mode == "head" and config.processes > 1:
            raise UserError(
                "Training mode head runs in one process: it trains one linear layer on cached features, "
                f"which several processes cannot speed up. Set processes to 1 (got {config.processes}) "
                "or use training mode full"
            )
        return config


# name -> (type, minimum, maximum)
PARAM_RANGES: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 500),
    "batch_size": (int, 2, 1024),
    "learning_rate": (float, 1e-6, 1.0),
    "image_size": (int, 32, 512),
    "val_split": (float, 0.05, 0.5),
    "seed": (int, 0, 2**31 - 1),
    # The maximum is MAX_TRAINING_PROCESSES (see `param_range`).
    "processes": (int, 1, 1),
    # Fractions allowed: a tenth of a minute lets tests run Auto mode in seconds.
    "budget_minutes": (float, 0.1, 24 * 60),
    "rounds": (int, 1, 1000),
    "local_epochs": (int, 1, 100),
    "min_clients": (int, 1, 100_000),
    # Fractions allowed: tests wait seconds, not minutes.
    "deadline_minutes": (float, 0.01, 7 * 24 * 60),
    "fedprox_mu": (float, 0.0, 10.0),
}


def param_range(name: str) -> tuple[type, float, float]:
    """(type, minimum, maximum) of a numeric parameter, with today's settings."""
    kind, low, high = PARAM_RANGES[name]
    if name == "processes":
        high = get_settings().max_training_processes
    return kind, low, high


def _check_param(name: str, value, label: str | None = None):
    """`value` as the parameter's type, or UserError naming it by `label`
    (the field's name in the API; the dashboard passes the form's labels)."""
    label = label or name
    if name == "use_existing_model":
        if not isinstance(value, bool):
            raise UserError(f"{label} must be true or false (got {value!r})")
        return value
    if name == "architecture":
        if value not in ARCHITECTURES:
            raise UserError(f"{label} must be one of {', '.join(ARCHITECTURES)} (got {value!r})")
        return value
    if name == "image_size" and value == AUTO:
        return value
    if name == "training_mode":
        if value not in TRAINING_MODES:
            raise UserError(f"{label} must be one of {', '.join(TRAINING_MODES)} (got {value!r})")
        return value
    kind, low, high = param_range(name)
    top = f"MAX_TRAINING_PROCESSES={high:g}" if name == "processes" else None
    also = f" or {AUTO!r}" if name == "image_size" else ""
    return check_number(label, value, kind, low, high, top=top, also=also)


def param_problems(params: Mapping, labels: Mapping[str, str]) -> dict[str, str]:
    """What is wrong with each field of a parameter form, by field name, in
    the words of `from_params` but naming each field by its label; empty when
    `from_params` accepts them all."""
    problems = {}
    for name, value in params.items():
        try:
            _check_param(name, value, labels.get(name))
        except UserError as exc:
            problems[name] = str(exc)
    if not problems:
        try:
            TrainingConfig.from_params(params)
        except UserError as exc:  # a rule across fields (head mode in one process)
            problems["processes"] = str(exc)
    return problems


def last_parameters(requested_by: str, *, session: Session) -> dict | None:
    """The parameters of the last job `requested_by` asked for (the Train
    form starts from them) as they asked (see `asked_parameters`), or None
    when they never asked for one."""
    query = (
        select(TrainingRound)
        .where(TrainingRound.requested_by == requested_by, col(TrainingRound.trigger).is_(None))
        .order_by(col(TrainingRound.id).desc())
        .limit(1)
    )
    found = session.exec(query).first()
    return None if found is None else asked_parameters(found)


def asked_parameters(round_: TrainingRound) -> dict:
    """The parameters as the operator chose them ("auto" image size, Auto
    mode and its budget), for "train again"; `parameters` holds what the
    round trains with (the chosen size, the search's winner). Rounds from
    before the two were kept apart have only `parameters`."""
    return round_.requested_parameters or round_.parameters
