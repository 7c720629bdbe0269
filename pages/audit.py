"""Audit trail (operators read it, admins too): who did what, when, before and after."""

import pandas as pd
import streamlit as st

from core import audit
from core.access import Permission
from core.db import read_session
from pages._common import pick_page, require_page, when

ALL = "All"
PAGE_SIZE = 100

require_page(Permission.read_audit)
st.title("Audit trail")

with read_session() as session:
    people = audit.actors(session=session)

f1, f2, f3 = st.columns(3)
person = f1.selectbox("Person", [ALL, *people], key="audit_person")
action = f2.selectbox("Action", [ALL, *audit.ACTIONS], key="audit_action")
days = f3.date_input("Between", value=(), key="audit_days")
since, until = (*days, None, None)[:2]

filters = {"actor": None if person == ALL else person, "action": None if action == ALL else action}
filters |= {"since": since, "until": until or since}
with read_session() as session:
    total = audit.count_events(session=session, **filters)
page, pages = pick_page(total, PAGE_SIZE, "audit_page")
with read_session() as session:
    events = audit.find_events(session=session, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, **filters)
st.caption(f"{total} event(s), newest first; page {page} of {pages}.")
if events:
    st.dataframe(
        pd.DataFrame(audit.as_rows(events)),
        hide_index=True,
        key="audit_table",
        column_config=when("when"),
    )
