"""Audit trail (operators read it, admins too): who did what, when, before and after."""

import pandas as pd
import streamlit as st

from core import audit
from core.access import Permission
from core.db import read_session
from pages._common import require_page, when

ALL = "All"

require_page(Permission.read_audit)
st.title("Audit trail")

with read_session() as session:
    people = audit.actors(session=session)

f1, f2, f3 = st.columns(3)
person = f1.selectbox("Person", [ALL, *people], key="audit_person")
action = f2.selectbox("Action", [ALL, *audit.ACTIONS], key="audit_action")
days = f3.date_input("Between", value=(), key="audit_days")
since, until = (*days, None, None)[:2]

with read_session() as session:
    events = audit.find_events(
        session=session,
        actor=None if person == ALL else person,
        action=None if action == ALL else action,
        since=since,
        until=until or since,
    )
st.caption(f"{len(events)} event(s), newest first (at most 500 shown: narrow the filters to see older ones).")
if events:
    st.dataframe(
        pd.DataFrame(audit.as_rows(events)),
        hide_index=True,
        key="audit_table",
        column_config=when("when"),
    )
