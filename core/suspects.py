"""Probably mislabelled images: where the newest model confidently disagrees.

After every completed round each validated image of its snapshot is scored
with the new model. An image is a suspect when the model's top category is
not the image's label; its score is the margin between the top category's
probability and the label's (0..1, higher: more confident disagreement).
"""

from collections.abc import Sequence

import torch
from sqlmodel import Session, col, select

from core.models import SuspectScore, utcnow


def record_scores(
    version: str,
    image_ids: Sequence[int],
    labels: Sequence[str],
    probabilities: torch.Tensor,
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
