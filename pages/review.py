"""Review images (data curators): filter, validate, reject, relabel; suspected
mislabels and near-duplicates; upload; categories.

One page with five tabs (review, suspects, look-alikes, upload, categories),
which is why it is longer than the other pages: the tabs share the page's
counts, its pending-decision state (`_picked`, `_apply`, `_resolve`, the
confirm dialog) and its messages, and every rule they apply lives in core
(`core.review`, `core.suspects`, `core.duplicates`, `core.uploads`). Split
into modules, each tab would take that shared session state along with it,
for no rule less here."""

import pandas as pd
import plotly.express as px
import streamlit as st

from core import audit, duplicates, image_views, registry, review, suspects
from core.access import Permission
from core.config import get_settings
from core.db import read_session, session_scope
from core.errors import NotFoundError, UserError
from core.ingest import IMAGE_SUFFIXES
from core.models import ImageStatus
from core.uploads import ingest_uploads
from pages._common import md, pick_page, require_page, show_thumbnail, when

PAGE_SIZE = 48
SUSPECTS_PAGE_SIZE = 24
CLUSTERS_PAGE_SIZE = 10
COLUMNS = 6
ALL = "All"

actor = require_page(Permission.review_images)
st.title("Review images")

with read_session() as session:
    counts = review.status_counts(session=session)
    options = image_views.filter_options(session=session)
    validated = review.validated_counts(session=session)
categories = options["categories"]

# Suspects and Duplicates are computed only while their tab is open.
review_tab, suspects_tab, duplicates_tab, upload_tab, categories_tab = st.tabs(
    ["Review", "Suspects", "Duplicates", "Upload", "Categories"], key="review_tabs", on_change="rerun"
)


# The ticked images, kept apart from the checkboxes: Streamlit forgets a
# checkbox's state when a filter or page hides it, and the ticks must last.
PICKED = "picked_ids"


def _picked() -> list[int]:
    return sorted(st.session_state.setdefault(PICKED, set()))


def _tick(image_id: int) -> None:
    """A checkbox's callback: its tick joins or leaves the kept set."""
    picked = st.session_state.setdefault(PICKED, set())
    (picked.add if st.session_state[f"pick_{image_id}"] else picked.discard)(image_id)


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
                done = f"moved to '{target}'"
            else:
                status = ImageStatus.validated if action == "validate" else ImageStatus.rejected
                n = review.set_status(ids, status, session=session, actor=actor)
                done = status.value
    except UserError as exc:
        st.session_state[f"{where}_error"] = str(exc)  # escaped where it is shown
        return
    st.session_state[f"{where}_message"] = f"{n} image(s) {done}."
    if picked:
        _pick_all(ids, False)


def _cluster_action(action: str, ids: list[int]) -> None:
    """Button callback: act on a cluster at once, or, above a handful of
    images, ask first (the question states the count)."""
    if review.confirmation(action, len(ids)) is None:
        _apply(action, ids, "clusters")
    else:
        st.session_state["cluster_confirm"] = (action, ids)


def _confirmed(answer: bool) -> None:
    action, ids = st.session_state.pop("cluster_confirm")
    if answer:
        _apply(action, ids, "clusters")


def _resolve(image_ids: list[int], action: str) -> None:
    """Button callback: one decision about suspected mislabels (one card, or
    the ticked ones: all or, on an error, none)."""
    try:
        with session_scope() as session:
            rows = [suspects.resolve(i, action, session=session, actor=actor) for i in image_ids]
    except UserError as exc:
        st.session_state["suspects_error"] = str(exc)  # escaped where it is shown
        return
    if not rows:
        st.session_state["suspects_error"] = "Tick at least one suspect first."
        return
    for row in rows:
        st.session_state[f"suspect_pick_{row.image_id}"] = False
    if len(rows) > 1:
        st.session_state["suspects_message"] = f"{len(rows)} suspects {suspects.ACTIONS[action]}."
    else:
        st.session_state["suspects_message"] = f"#{rows[0].image_id}: " + _decision(rows[0]) + "."


def _decision(row) -> str:
    if row.resolution == "accepted":
        return f"moved from '{row.given_label}' to '{row.suggested_label}'"
    if row.resolution == "kept":
        return f"kept as '{row.given_label}' (the model suggested '{row.suggested_label}')"
    return "rejected"


def _show_messages(where: str) -> None:
    if message := st.session_state.pop(f"{where}_message", None):
        st.success(md(message))
    if error := st.session_state.pop(f"{where}_error", None):
        st.error(md(error))


def _pick_all(ids: list[int], on: bool) -> None:
    picked = st.session_state.setdefault(PICKED, set())
    for image_id in ids:
        st.session_state[f"pick_{image_id}"] = on
        (picked.add if on else picked.discard)(image_id)


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
        total = image_views.find_images(session=session, limit=0, **filters).total
    page, pages = pick_page(total, PAGE_SIZE, "review_page")
    with read_session() as session:
        found = image_views.find_images(session=session, offset=(page - 1) * PAGE_SIZE, limit=PAGE_SIZE, **filters)
        alikes = duplicates.look_alike_counts([image for image, _ in found.rows], session=session)
    page_ids = [image.id for image, _ in found.rows]

    _show_messages("review")

    picked = _picked()
    a1, a2, a3, a4, a5, a6 = st.columns([1, 1, 1, 1, 2, 1], vertical_alignment="bottom")
    a1.button("Select page", key="select_page", on_click=_pick_all, args=(page_ids, True))
    a2.button("Clear", key="clear_selection", on_click=_pick_all, args=(picked, False), help="Untick every image")
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
    if hidden := [i for i in picked if i not in page_ids]:
        st.info(
            f"{len(hidden)} ticked image(s) are not shown here (another page or filter): "
            f"{', '.join(f'#{i}' for i in hidden[:10])}{' …' if len(hidden) > 10 else ''}. "
            "The buttons act on every ticked image; **Clear** unticks them all.",
            icon=":material/visibility_off:",
        )
    for start_index in range(0, len(found.rows), COLUMNS):
        row = st.columns(COLUMNS)
        for col, (image, name) in zip(row, found.rows[start_index : start_index + COLUMNS], strict=False):
            with col.container(border=True):
                show_thumbnail(image)
                st.session_state.setdefault(f"pick_{image.id}", image.id in picked)
                st.checkbox(f"#{image.id} {md(name)}", key=f"pick_{image.id}", on_change=_tick, args=(image.id,))
                who = f" by {md(image.reviewed_by)}" if image.reviewed_by else ""
                alike = f" · {alikes[image.id]} look-alike(s)" if alikes[image.id] else ""
                st.caption(f"{image.status.value}{who} · {image.source.value} · {image.uploaded_at:%Y-%m-%d}{alike}")

    with st.expander("History and look-alikes of an image"):
        wanted = st.text_input("Find an image by id or file name", key="history_search", placeholder="#12 or IMG_0042")
        if wanted:
            with read_session() as session:
                choices = [img.id for img in image_views.search_images(wanted, session=session)]
            if not choices:
                st.caption(f"No image has the id or a file name with '{md(wanted)}'.")
        else:
            choices = [*picked, *(i for i in page_ids if i not in picked)]
        shown = st.selectbox("Image", choices, key="history_image", format_func=lambda i: f"#{i}")
        if shown is not None:
            with read_session() as session:
                events = audit.image_history(shown, session=session)
                similar = duplicates.look_alikes(
                    image_views.images_by_id([shown], session=session)[shown], session=session
                )
            if events:
                history = pd.DataFrame(audit.as_rows(events)).drop(columns=["target"])
                st.dataframe(history, hide_index=True, key="image_history", column_config=when("when"))
            else:
                st.caption("Nothing recorded for this image (it came in before the audit trail existed).")
            if similar:
                st.caption("Look-alikes (same cluster; bits: how many of the 256 hash bits differ):")
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
        page, _ = pick_page(suspect_total, SUSPECTS_PAGE_SIZE, "suspects_page")
        # The cards of this page stay where they are until the page changes:
        # a decided one is greyed, so the next card's buttons never slide under the pointer.
        shown_page, shown_ids = st.session_state.get("suspects_cards", (None, []))
        with read_session() as session:
            if shown_page == page and shown_ids:
                listed = suspects.list_suspects(session=session, image_ids=shown_ids)
            else:
                listed = suspects.list_suspects(
                    session=session, offset=(page - 1) * SUSPECTS_PAGE_SIZE, limit=SUSPECTS_PAGE_SIZE
                )
                st.session_state["suspects_cards"] = (page, [s.image.id for s in listed])
            try:
                scorer = registry.get_version(listed[0].row.model_version, session=session) if listed else None
            except NotFoundError:  # the scoring version was deleted since
                scorer = None
        if scorer is not None and scorer.metrics.get("test_accuracy") is not None:
            st.caption(
                f"The suggestions come from model {scorer.version}: {scorer.metrics['test_accuracy']:.1f}% right "
                f"on its {scorer.metrics.get('test_images', 0)} held-out test images, so about one suggestion "
                "in that many is wrong too: look before you accept."
            )
        open_ids = [s.image.id for s in listed if s.row.resolution is None]
        ticked = [i for i in open_ids if st.session_state.get(f"suspect_pick_{i}")]
        if listed:
            b1, b2, b3 = st.columns([1, 1, 3])
            b1.button(
                f"Keep ticked ({len(ticked)})",
                key="suspects_keep_ticked",
                disabled=not ticked,
                on_click=_resolve,
                args=(ticked, "keep"),
            )
            b2.button(
                f"Reject ticked ({len(ticked)})",
                key="suspects_reject_ticked",
                disabled=not ticked,
                on_click=_resolve,
                args=(ticked, "reject"),
            )
            if b3.button("Show the next open suspects", key="suspects_refresh"):
                st.session_state.pop("suspects_cards", None)
                st.rerun()
        for suspect in listed:
            row, image_id = suspect.row, suspect.image.id
            decided = row.resolution is not None
            with st.container(border=True):
                picture, text, buttons = st.columns([1, 3, 2], vertical_alignment="center")
                with picture:
                    show_thumbnail(suspect.image)
                if decided:
                    text.markdown(f":gray[**#{image_id}** {md(_decision(row))} by {md(row.resolved_by)}]")
                else:
                    text.checkbox(
                        f"**#{image_id}** labelled **{md(row.given_label)}**, looks like **{md(row.suggested_label)}**",
                        key=f"suspect_pick_{image_id}",
                    )
                text.caption(
                    f"p({md(row.given_label)}) {row.given_probability:.2f} · margin {row.margin:.2f} · "
                    f"model {row.model_version}"
                )
                # Keep, the harmless choice, comes first; none is the coloured default.
                buttons.button(
                    f"Keep '{md(row.given_label)}'",
                    key=f"keep_{image_id}",
                    disabled=decided,
                    on_click=_resolve,
                    args=([image_id], "keep"),
                )
                buttons.button(
                    f"Accept '{md(row.suggested_label)}'",
                    key=f"accept_{image_id}",
                    disabled=decided,
                    on_click=_resolve,
                    args=([image_id], "accept"),
                )
                buttons.button(
                    "Reject", key=f"reject_{image_id}", disabled=decided, on_click=_resolve, args=([image_id], "reject")
                )

with duplicates_tab:
    st.caption(
        "Groups of look-alikes (resized, re-encoded or slightly edited copies): each image matched the first "
        "of its group closely, largest group first; rejected images are left out."
    )
    _show_messages("clusters")
    pending = st.session_state.get("cluster_confirm")
    if pending:
        with st.container(border=True):
            st.warning(review.confirmation(pending[0], len(pending[1])))
            yes, no = st.columns(2)
            yes.button(
                f"Yes, {pending[0]} {len(pending[1])} images", key="cluster_confirm_yes", type="primary",
                on_click=_confirmed, args=(True,),
            )  # fmt: skip
            no.button("Cancel", key="cluster_confirm_no", on_click=_confirmed, args=(False,))
    if duplicates_tab.open:
        with read_session() as session:
            group_total = duplicates.count_clusters(session=session)
        if not group_total:
            st.info("No near-duplicates among the images that are not rejected.")
        page, _ = pick_page(group_total, CLUSTERS_PAGE_SIZE, "clusters_page")
        with read_session() as session:  # the page's groups, then their images in one query
            shown = duplicates.clusters(
                session=session, offset=(page - 1) * CLUSTERS_PAGE_SIZE, limit=CLUSTERS_PAGE_SIZE
            )
            listed = duplicates.labelled_images([i for ids in shown for i in ids], session=session)
        found = {img.id: (img, name) for img, name in listed}
        for ids in shown:
            members = [found[i] for i in ids if i in found]
            with st.container(border=True):
                labels = sorted({name for _, name in members})
                head, validate_all, reject_all = st.columns([4, 1, 1], vertical_alignment="center")
                head.markdown(f"**{len(ids)} look-alikes** · {md(', '.join(labels))}")
                validate_all.button(
                    "Validate all", key=f"cluster_validate_{ids[0]}", on_click=_cluster_action,
                    args=("validate", ids),
                )  # fmt: skip
                reject_all.button(
                    "Reject all", key=f"cluster_reject_{ids[0]}", on_click=_cluster_action, args=("reject", ids)
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


def _change_categories(change, *args, done: str) -> None:
    """Run a category change (a core.review function) and say how it went."""
    try:
        with session_scope() as session:
            change(*args, session=session, actor=actor)
    except UserError as exc:
        st.session_state["category_message"] = ("error", str(exc))
    else:
        st.session_state["category_message"] = ("success", done)


with categories_tab:
    if message := st.session_state.pop("category_message", None):
        (st.error if message[0] == "error" else st.success)(md(message[1]))
    left, right = st.columns(2)
    with left, st.form("add_category", clear_on_submit=True):
        new_name = st.text_input(
            "New category", key="new_category", help="Printable text; names are compared ignoring case."
        )
        if st.form_submit_button("Add category"):
            _change_categories(review.add_category, new_name, done=f"Category '{new_name.strip()}' added.")
            st.rerun()
    with right, st.form("rename_category"):
        old_name = st.selectbox("Category to rename", categories, key="rename_from")
        renamed = st.text_input("New name", key="rename_to")
        if st.form_submit_button("Rename"):
            _change_categories(
                review.rename_category, old_name or "", renamed, done=f"'{old_name}' renamed to '{renamed.strip()}'."
            )
            st.rerun()
    left, right = st.columns(2)
    with left, st.form("delete_category"):
        doomed = st.selectbox("Empty category to delete", categories, key="delete_name")
        if st.form_submit_button("Delete"):
            _change_categories(review.delete_category, doomed or "", done=f"Category '{doomed}' deleted.")
            st.rerun()
    with right, st.form("merge_category"):
        m1, m2 = st.columns(2)
        merged = m1.selectbox("Merge category", categories, key="merge_from")
        into = m2.selectbox("into", categories, key="merge_into")
        if st.form_submit_button("Merge", help="Moves all its images (any status) into the other, then deletes it."):
            _change_categories(
                review.merge_category, merged or "", into or "", done=f"'{merged}' merged into '{into}'."
            )
            st.rerun()

    st.subheader("Validated images per category")
    minimum = get_settings().min_images_per_category
    for warning in image_views.category_warnings(validated, minimum=minimum):
        st.warning(md(warning))
    if validated:
        chart = px.bar(
            pd.DataFrame({"category": list(validated), "validated": list(validated.values())}),
            x="category",
            y="validated",
            labels={"validated": "validated images"},
        )
        st.plotly_chart(chart, key="validated_chart")
    else:
        st.info("No categories yet: add one above, or upload images with a category.")
