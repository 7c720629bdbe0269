"""The automation settings row: the retraining triggers, the promotion gate's
margins and the automatic jobs' parameters (one row, edited through
core/automation.py).

Reading it lives here, below both `core.automation` (which imports training
to check parameters) and `core.gate` (which training imports), so the gate
reads its rules through the one accessor without an import cycle.
"""

from sqlmodel import Session

from core.models import Automation

AUTOMATION_ID = 1


def get_automation(*, session: Session) -> Automation:
    """The saved settings, or the defaults (not saved) when nobody set them yet."""
    return session.get(Automation, AUTOMATION_ID) or Automation(id=AUTOMATION_ID)
