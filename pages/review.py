"""Review images (data curators): filter, validate, reject, relabel, upload, categories."""

import pandas as pd
import plotly.express as px
import streamlit as st

from core import audit, review, stats
from core.access import Permission
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import UserError
from core.ingest import IMAGE_SUFFIXES
from core.models import ImageStatus
from core.uploads import ingest_uploads
from pages._common import require_page, show_thumbnail

PAGE_SIZE = 48
COLUMNS = 6
ALL = "All"

actor = require_page(Permission.review_images)
st.title("Review images")

with read_session() as session:
    counts = review.status_counts(session=session)
    options = stats.filter_options(session=session)
    validated = review.validated_counts(session=session)
categories = options["categories"]

review_tab, upload_tab, categories_tab = st.tabs(["Review", "Upload", "Categories"])


def _picked() -> list[int]:
    return [int(key.removeprefix("pick_")) for key, on in st.session_state.items() if key.startswith("pick_") and on]


def _apply(action: str) -> None:
    """Button callback: runs before the rerun, so the grid shows the change."""
    ids = _picked()
    try:
        with session_scope() as session:
            if action == "relabel":
                target = st.session_state.get("relabel_to")
                n = review.relabel_images(ids, target or "", session=session, actor=actor)
                done = f"moved to '{target}'"
            else:
                status = ImageStatus.validated if action == "validate" else ImageStatus.rejected
                n = review.set_status(ids, status, session=session, actor=actor)
                done = status.value
    except UserError as exc:
        st.session_state["review_error"] = str(exc)
        return
    st.session_state["review_message"] = f"{n} image(s) {done}."
    for image_id in ids:
        st.session_state[f"pick_{image_id}"] = False


def _pick_all(ids: list[int], on: bool) -> None:
    for image_id in ids:
        st.session_state[f"pick_{image_id}"] = on


with review_tab:
    cols = st.columns(3)
    for col, status in zip(cols, ImageStatus, strict=True):
        col.metric(status.value.capitalize(), counts[status.value], border=True)

    f1, f2, f3, f4, f5 = st.columns(5)
    status = f1.selectbox("Status", [ALL, *(s.value for s in ImageStatus)], key="filter_status")
    category = f2.selectbox("Category", [ALL, *categories], key="filter_category")
    source = f3.selectbox("Source", [ALL, *options["sources"]], key="filter_source")
    device = f4.selectbox("Device", [ALL, *options["devices"]], key="filter_device")
    days = f5.date_input("Uploaded between", value=(), key="filter_days")
    start, end = (*days, None, None)[:2]
    filters = {
        "status": None if status == ALL else status,
        "category": None if category == ALL else category,
        "source": None if source == ALL else source,
        "device": None if device == ALL else device,
        "uploaded_from": start,
        "uploaded_to": end or start,
    }
    with read_session() as session:
        total = stats.find_images(session=session, limit=0, **filters).total
    pages = max(1, -(-total // PAGE_SIZE))
    page = st.pagination(pages, key="review_page") if pages > 1 else 1
    with read_session() as session:
        found = stats.find_images(session=session, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, **filters)
    page_ids = [image.id for image, _ in found.rows]

    if message := st.session_state.pop("review_message", None):
        st.success(message)
    if error := st.session_state.pop("review_error", None):
        st.error(error)

    picked = _picked()
    a1, a2, a3, a4, a5, a6 = st.columns([1, 1, 1, 1, 2, 1], vertical_alignment="bottom")
    a1.button("Select page", key="select_page", on_click=_pick_all, args=(page_ids, True))
    a2.button("Clear", key="clear_selection", on_click=_pick_all, args=(page_ids, False))
    a3.button(
        f"Validate ({len(picked)})",
        key="validate",
        type="primary",
        disabled=not picked,
        on_click=_apply,
        args=("validate",),
    )
    a4.button(f"Reject ({len(picked)})", key="reject", disabled=not picked, on_click=_apply, args=("reject",))
    a5.selectbox("Relabel to", categories, key="relabel_to")
    a6.button("Relabel", key="relabel", disabled=not picked or not categories, on_click=_apply, args=("relabel",))

    st.caption(f"{total} image(s) match; page {page} of {pages}. Tick images, then act on all ticked at once.")
    for start_index in range(0, len(found.rows), COLUMNS):
        row = st.columns(COLUMNS)
        for col, (image, name) in zip(row, found.rows[start_index : start_index + COLUMNS], strict=False):
            with col.container(border=True):
                show_thumbnail(image)
                st.checkbox(f"#{image.id} {name}", key=f"pick_{image.id}")
                who = f" by {image.reviewed_by}" if image.reviewed_by else ""
                st.caption(f"{image.status.value}{who} · {image.source.value} · {image.uploaded_at:%Y-%m-%d}")

    if page_ids:
        with st.expander("History of an image"):
            choices = [*picked, *(i for i in page_ids if i not in picked)]
            shown = st.selectbox("Image", choices, key="history_image", format_func=lambda i: f"#{i}")
            with read_session() as session:
                events = audit.image_history(shown, session=session)
            if events:
                history = pd.DataFrame(audit.as_rows(events)).drop(columns=["target"])
                st.dataframe(history, hide_index=True, key="image_history")
            else:
                st.caption("Nothing recorded for this image (it came in before the audit trail existed).")

with upload_tab:
    st.write(
        "Upload images of one category, or a `.zip` with a folder per category "
        "(`circle/a.png`, `square/b.png`, …; loose files get the category chosen here)."
    )
    files = st.file_uploader(
        "Images or .zip",
        type=[s.lstrip(".") for s in sorted(IMAGE_SUFFIXES)] + ["zip"],
        accept_multiple_files=True,
        key="upload_files",
    )
    upload_category = st.selectbox(
        "Category", categories, index=None, accept_new_options=True, key="upload_category",
        placeholder="Choose or type a new category",
    )  # fmt: skip
    as_validated = st.checkbox("Mark as validated (I have checked these images)", key="upload_validated")
    if st.button("Upload", key="upload", type="primary", disabled=not files):
        try:
            with session_scope() as session:
                report = ingest_uploads(
                    [(file.name, file.getvalue()) for file in files],
                    session=session,
                    category=upload_category,
                    status=ImageStatus.validated if as_validated else ImageStatus.pending,
                    actor=actor,
                )
        except UserError as exc:
            st.error(str(exc))
        else:
            st.success(f"Upload: {report.summary()}.")
            if report.refused:
                st.warning("These files were refused:")
                st.dataframe(
                    pd.DataFrame([{"file": r.filename, "reason": r.reason} for r in report.refused]),
                    hide_index=True,
                    key="refused_table",
                )

with categories_tab:
    left, right = st.columns(2)
    with left, st.form("add_category", clear_on_submit=True):
        new_name = st.text_input("New category", key="new_category")
        if st.form_submit_button("Add category"):
            try:
                with session_scope() as session:
                    review.add_category(new_name, session=session, actor=actor)
            except UserError as exc:
                st.error(str(exc))
            else:
                st.rerun()
    with right, st.form("rename_category"):
        old_name = st.selectbox("Category to rename", categories, key="rename_from")
        renamed = st.text_input("New name", key="rename_to")
        if st.form_submit_button("Rename"):
            try:
                with session_scope() as session:
                    review.rename_category(old_name or "", renamed, session=session, actor=actor)
            except UserError as exc:
                st.error(str(exc))
            else:
                st.rerun()

    st.subheader("Validated images per category")
    minimum = get_settings().min_images_per_category
    for warning in stats.category_warnings(validated, minimum=minimum):
        st.warning(warning)
    if validated:
        chart = px.bar(
            pd.DataFrame({"category": list(validated), "validated": list(validated.values())}),
            x="category",
            y="validated",
            labels={"validated": "validated images"},
        )
        chart.add_hline(y=minimum, line_dash="dot", annotation_text=f"minimum {minimum}")
        st.plotly_chart(chart, key="validated_chart")
    else:
        st.info("No categories yet: add one above, or upload images with a category.")
