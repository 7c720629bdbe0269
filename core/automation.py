"""Automatic retraining triggers and the promotion gate's settings (one row)."""

from sqlmodel import Session

from core.models import Automation

AUTOMATION_ID = 1


def get_automation(*, session: Session) -> Automation:
    """The saved settings, or the defaults (not saved) when nobody set them yet."""
    return session.get(Automation, AUTOMATION_ID) or Automation(id=AUTOMATION_ID)
