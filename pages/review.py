"""Review images (data curators): filter, validate, reject, relabel; suspected
mislabels and near-duplicates; upload; categories."""

import pandas as pd
import plotly.express as px
import streamlit as st

from core import audit, duplicates, registry, review, stats, suspects
from core.access import Permission
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import UserError
from core.ingest import IMAGE_SUFFIXES
from core.models import ImageStatus
from core.uploads import ingest_uploads
from pages._common import md, require_page, show_thumbnail

PAGE_SIZE = 48
SUSPECTS_PAGE_SIZE = 24
CLUSTERS_PAGE_SIZE = 10
COLUMNS = 6
ALL = "All"

actor = require_page(Permission.review_images)
st.title("Review images")

with read_session() as session:
    counts = review.status_counts(session=session)
    options = stats.filter_options(session=session)
    validated = review.validated_counts(session=session)
categories = options["categories"]

# Suspects and Duplicates are computed only while their tab is open.
review_tab, suspects_tab, duplicates_tab, upload_tab, categories_tab = st.tabs(
    ["Review", "Suspects", "Duplicates", "Upload", "Categories"], key="review_tabs", on_change="rerun"
)


def _picked() -> list[int]:
    return [int(key.removeprefix("pick_")) for key, on in st.session_state.items() if key.startswith("pick_") and on]


def _apply(action: str, ids: list[int] | None = None, where: str = "review") -> None:
    """Button callback: runs before the rerun, so the grid shows the change.
    Acts on the ticked images, or on `ids` (a cluster of near-duplicates)."""
    picked = ids is None
    ids = _picked() if picked else ids
    try:
        with session_scope() as session:
            if action == "relabel":
                target = st.session_state.get("relabel_to")
                n = review.relabel_images(ids, target or "", session=session, actor=actor)
                done = f"moved to '{md(target)}'"
            else:
                status = ImageStatus.validated if action == "validate" else ImageStatus.rejected
                n = review.set_status(ids, status, session=session, actor=actor)
                done = status.value
    except UserError as exc:
        st.session_state[f"{where}_error"] = md(exc)
        return
    st.session_state[f"{where}_message"] = f"{n} image(s) {done}."
    for image_id in ids if picked else ():
        st.session_state[f"pick_{image_id}"] = False


def _resolve(image_id: int, action: str) -> None:
    """Button callback: one decision about a suspected mislabel."""
    try:
        with session_scope() as session:
            row = suspects.resolve(image_id, action, session=session, actor=actor)
    except UserError as exc:
        st.session_state["suspects_error"] = md(exc)
        return
    st.session_state["suspects_message"] = (
        f"#{image_id}: {row.resolution} ({md(row.given_label)} → {md(row.suggested_label)})."
    )


def _show_messages(where: str) -> None:
    if message := st.session_state.pop(f"{where}_message", None):
        st.success(message)
    if error := st.session_state.pop(f"{where}_error", None):
        st.error(error)


def _page(total: int, size: int, key: str) -> tuple[int, int]:
    """The page picked (paginator shown only when there is more than one) and how many there are."""
    pages = max(1, -(-total // size))
    return (st.pagination(pages, key=key) if pages > 1 else 1), pages


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
    page, pages = _page(total, PAGE_SIZE, "review_page")
    with read_session() as session:
        found = stats.find_images(session=session, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, **filters)
        alikes = duplicates.look_alike_counts([image for image, _ in found.rows], session=session)
    page_ids = [image.id for image, _ in found.rows]

    _show_messages("review")

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
                st.checkbox(f"#{image.id} {md(name)}", key=f"pick_{image.id}")
                who = f" by {md(image.reviewed_by)}" if image.reviewed_by else ""
                alike = f" · {alikes[image.id]} look-alike(s)" if alikes[image.id] else ""
                st.caption(f"{image.status.value}{who} · {image.source.value} · {image.uploaded_at:%Y-%m-%d}{alike}")

    if page_ids:
        with st.expander("History and look-alikes of an image"):
            choices = [*picked, *(i for i in page_ids if i not in picked)]
            shown = st.selectbox("Image", choices, key="history_image", format_func=lambda i: f"#{i}")
            with read_session() as session:
                events = audit.image_history(shown, session=session)
                similar = duplicates.look_alikes(stats.images_by_id([shown], session=session)[shown], session=session)
            if events:
                history = pd.DataFrame(audit.as_rows(events)).drop(columns=["target"])
                st.dataframe(history, hide_index=True, key="image_history")
            else:
                st.caption("Nothing recorded for this image (it came in before the audit trail existed).")
            if similar:
                st.caption(f"Near-duplicates (at most {duplicates.MAX_DISTANCE} of 64 hash bits differ):")
                st.dataframe(
                    pd.DataFrame(
                        [
                            {"image": f"#{img.id}", "category": name, "status": img.status.value, "bits": bits}
                            for img, name, bits in similar
                        ]
                    ),
                    hide_index=True,
                    key="look_alikes",
                )

with suspects_tab:
    st.caption(
        "Validated images the newest model puts in another category, most confident first. "
        "Margin: how far the suggested category's probability is above the given label's."
    )
    _show_messages("suspects")
    if suspects_tab.open:
        with read_session() as session:
            suspect_total = suspects.count_suspects(session=session)
            trained = registry.latest_version(session=session) is not None
        if not suspect_total:
            st.info(
                "No open suspects: the newest model agrees with every validated label, or each was decided."
                if trained
                else "No training round has completed yet: images are scored after each completed round."
            )
        page, _ = _page(suspect_total, SUSPECTS_PAGE_SIZE, "suspects_page")
        with read_session() as session:
            listed = suspects.list_suspects(
                session=session, offset=(page - 1) * SUSPECTS_PAGE_SIZE, limit=SUSPECTS_PAGE_SIZE
            )
        for suspect in listed:
            row, image_id = suspect.row, suspect.image.id
            with st.container(border=True):
                picture, text, buttons = st.columns([1, 3, 2], vertical_alignment="center")
                with picture:
                    show_thumbnail(suspect.image)
                text.markdown(
                    f"**#{image_id}** labelled **{md(row.given_label)}**, looks like **{md(row.suggested_label)}**"
                )
                text.caption(
                    f"p({md(row.given_label)}) {row.given_probability:.2f} · margin {row.margin:.2f} · "
                    f"model {row.model_version}"
                )
                buttons.button(
                    f"Accept '{md(row.suggested_label)}'",
                    key=f"accept_{image_id}",
                    type="primary",
                    on_click=_resolve,
                    args=(image_id, "accept"),
                )
                buttons.button(
                    f"Keep '{md(row.given_label)}'", key=f"keep_{image_id}", on_click=_resolve, args=(image_id, "keep")
                )
                buttons.button("Reject", key=f"reject_{image_id}", on_click=_resolve, args=(image_id, "reject"))

with duplicates_tab:
    st.caption(
        f"Groups of pictures whose difference hashes differ in at most {duplicates.MAX_DISTANCE} of 64 bits "
        "(resized, re-encoded or slightly edited copies), largest first; rejected images are left out."
    )
    _show_messages("clusters")
    if duplicates_tab.open:
        with read_session() as session:
            groups = duplicates.clusters(session=session)
        if not groups:
            st.info("No near-duplicates among the images that are not rejected.")
        page, _ = _page(len(groups), CLUSTERS_PAGE_SIZE, "clusters_page")
        shown = groups[(page - 1) * CLUSTERS_PAGE_SIZE : page * CLUSTERS_PAGE_SIZE]
        with read_session() as session:  # the page's images in one query
            listed = duplicates.labelled_images([i for ids in shown for i in ids], session=session)
        found = {img.id: (img, name) for img, name in listed}
        for ids in shown:
            members = [found[i] for i in ids if i in found]
            with st.container(border=True):
                labels = sorted({name for _, name in members})
                head, validate_all, reject_all = st.columns([4, 1, 1], vertical_alignment="center")
                head.markdown(f"**{len(ids)} look-alikes** · {md(', '.join(labels))}")
                validate_all.button(
                    "Validate all", key=f"cluster_validate_{ids[0]}", on_click=_apply,
                    args=("validate", ids, "clusters"),
                )  # fmt: skip
                reject_all.button(
                    "Reject all", key=f"cluster_reject_{ids[0]}", on_click=_apply, args=("reject", ids, "clusters")
                )
                for start_index in range(0, len(members), COLUMNS):
                    for col, (image, name) in zip(
                        st.columns(COLUMNS), members[start_index : start_index + COLUMNS], strict=False
                    ):
                        with col:
                            show_thumbnail(image)
                            st.caption(f"#{image.id} {md(name)} · {image.status.value}")

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
            st.error(md(exc))
        else:
            st.success(md(f"Upload: {report.summary()}."))
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
                st.error(md(exc))
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
                st.error(md(exc))
            else:
                st.rerun()

    st.subheader("Validated images per category")
    minimum = get_settings().min_images_per_category
    for warning in stats.category_warnings(validated, minimum=minimum):
        st.warning(md(warning))
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
