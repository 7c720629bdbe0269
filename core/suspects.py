"""Probably mislabelled images: where the newest model confidently disagrees.

After every completed round each validated image of its snapshot is scored
with the new model. An image is a suspect when the model's top category is
not the image's label; its score is the margin between the top category's
probability and the label's (0..1, higher: more confident disagreement).

Curators go through the open suspects, highest score first, and `resolve`
each: accept the suggested category, keep the label (it stays kept through
later rounds while the label is unchanged) or reject the image.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import and_, or_
from sqlmodel import Session, col, func, select

from core import review
from core.access import Actor, Permission, require
from core.audit import record_audit
from core.errors import NotFoundError, UserError
from core.models import Category, ImageStatus, SuspectScore, TrainingImage, utcnow

if TYPE_CHECKING:  # the scores come from a job; the pages and the command line need no torch
    import torch

# What a curator can decide about a suspect, and the resolution it records.
ACTIONS = {"accept": "accepted", "keep": "kept", "reject": "rejected"}


def record_scores(
    version: str,
    image_ids: Sequence[int],
    labels: Sequence[str],
    probabilities: "torch.Tensor",
    classes: Sequence[str],
    *,
    session: Session,
) -> int:
    """Replace the suspect rows of these images with the new model's view;
    returns how many are suspects now. A curator's "keep the label" stays in
    force while the label is the same; other decisions start afresh. The
    caller commits."""
    existing = {
        row.image_id: row
        for row in session.exec(select(SuspectScore).where(col(SuspectScore.image_id).in_(list(image_ids))))
    }
    index = {name: i for i, name in enumerate(classes)}
    top_p, top_i = probabilities.max(dim=1)
    suspects = 0
    for n, (image_id, label) in enumerate(zip(image_ids, labels, strict=True)):
        given_p = float(probabilities[n, index[label]])
        suggested = classes[int(top_i[n])]
        row = existing.get(image_id)
        if suggested == label:
            if row is not None:
                session.delete(row)
            continue
        suspects += 1
        keep_decision = row is not None and row.resolution == "kept" and row.given_label == label
        row = row or SuspectScore(image_id=image_id, model_version=version, given_label=label, suggested_label="")
        row.model_version, row.given_label, row.suggested_label = version, label, suggested
        row.given_probability = round(given_p, 4)
        row.margin = round(float(top_p[n]) - given_p, 4)
        row.score = row.margin
        row.scored_at = utcnow()
        if not keep_decision:
            row.resolution, row.resolved_by, row.resolved_at = None, None, None
        session.add(row)
    session.flush()
    return suspects


@dataclass
class Suspect:
    """A suspect row and its image."""

    row: SuspectScore
    image: TrainingImage


def _open():
    """Still worth a look: undecided, the image validated and its label the one scored."""
    return (
        col(SuspectScore.resolution).is_(None),
        TrainingImage.status == ImageStatus.validated,
        Category.name == SuspectScore.given_label,
    )


def _suspect_query(query, include_resolved: bool):
    query = query.join(TrainingImage, TrainingImage.id == SuspectScore.image_id).join(
        Category, Category.id == TrainingImage.category_id
    )
    if include_resolved:
        return query.where(or_(and_(*_open()), col(SuspectScore.resolution).is_not(None)))
    return query.where(*_open())


def list_suspects(
    *,
    session: Session,
    limit: int = 50,
    offset: int = 0,
    include_resolved: bool = False,
    image_ids: Sequence[int] | None = None,
) -> list[Suspect]:
    """Open suspects, most likely mislabelled first (with `include_resolved`,
    the decided ones too). Given `image_ids`, those images' rows, open or
    decided (a page keeps showing the cards it showed, decided ones greyed)."""
    query = select(SuspectScore, TrainingImage).order_by(col(SuspectScore.score).desc(), SuspectScore.image_id)
    if image_ids is not None:
        query = query.join(TrainingImage, TrainingImage.id == SuspectScore.image_id).where(
            col(SuspectScore.image_id).in_(list(image_ids))
        )
        return [Suspect(row, image) for row, image in session.exec(query)]
    rows = session.exec(_suspect_query(query, include_resolved).offset(offset).limit(limit)).all()
    return [Suspect(row, image) for row, image in rows]


def count_suspects(*, session: Session, include_resolved: bool = False) -> int:
    """How many `list_suspects` would list without a limit."""
    return session.exec(_suspect_query(select(func.count(SuspectScore.id)), include_resolved)).one()


def resolve(image_id: int, action: str, *, session: Session, actor: Actor) -> SuspectScore:
    """Decide about one open suspect: `accept` moves the image to the suggested
    category, `keep` keeps its label, `reject` rejects the image (each audited).
    Returns the resolved row; the caller commits."""
    require(actor, Permission.review_images)
    if action not in ACTIONS:
        raise UserError(f"Unknown action '{action}': use {', '.join(ACTIONS)}")
    found = session.exec(_suspect_query(select(SuspectScore), False).where(SuspectScore.image_id == image_id)).first()
    if found is None:
        if session.get(TrainingImage, image_id) is None:
            raise NotFoundError(f"No image with id {image_id}")
        raise NotFoundError(
            f"Image {image_id} is not an open suspect (never suspected, already decided, relabelled or "
            "no longer validated); `python -m cli suspects` lists the open ones"
        )
    if action == "accept":
        review.relabel_images([image_id], found.suggested_label, session=session, actor=actor)
    elif action == "reject":
        review.reject_images([image_id], session=session, actor=actor)
    else:
        record_audit(
            "image.keep_label",
            session=session,
            actor=actor,
            target=f"image:{image_id}",
            before={"category": found.given_label, "suggested": found.suggested_label},
            after={"category": found.given_label},
        )
    found.resolution, found.resolved_by, found.resolved_at = ACTIONS[action], actor.name, utcnow()
    session.add(found)
    session.flush()
    return found
