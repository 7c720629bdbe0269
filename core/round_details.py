"""A training job as its status views show it: the round, its epochs so far and
the version it produced. One loader for the API's status route and the command
line's `status` and `train --wait`."""

from dataclasses import dataclass

from sqlmodel import Session

from core.models import EpochMetric, ModelVersion, TrainingRound
from core.registry import get_version_by_id
from core.training.rounds import epoch_metrics, get_round


@dataclass(frozen=True)
class RoundDetails:
    round: TrainingRound
    epochs: list[EpochMetric]
    # None until the round completes.
    version: ModelVersion | None


def load_round_details(job_id: str | int, *, session: Session) -> RoundDetails:
    """The round with public job id (or numeric id) `job_id`, its epoch metrics
    and its model version; NotFoundError when there is no such job."""
    round_ = get_round(job_id, session=session)
    version = get_version_by_id(round_.model_version_id, session=session) if round_.model_version_id else None
    return RoundDetails(round_, epoch_metrics(round_.id, session=session), version)
