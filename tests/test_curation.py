"""Suspected mislabels (core/suspects.py) and near-duplicates (core/duplicates.py):
the core functions, the review page's Suspects and Duplicates tabs, the command line."""

import io
import random

import pytest
import torch
from PIL import Image, ImageDraw
from scipy.stats import binomtest
from sqlmodel import select

from cli import main
from core import duplicates, review, suspects
from core.audit import find_events
from core.config import get_settings
from core.db import read_session
from core.demo import DEMO_CATEGORIES, load_demo_dataset
from core.errors import NotFoundError, PermissionDeniedError, UserError
from core.ingest import ingest_bytes
from core.models import Category, ImageStatus, SuspectScore, TrainingImage
from core.splits import assign_splits, split_of
from tests.factories import add_images, as_actor
from tests.servers import run_cli
from tests.test_pages import app, ok

CLASSES = ["cat", "dog"]


def add_suspects(session) -> list[int]:
    """Three validated cats the model (crafted, no training) takes for dogs, with
    scores 0.8, 0.4 and 0.6, and a dog it agrees with; returns the four ids."""
    ids = add_images(session, {"cat": 3, "dog": 1})
    probabilities = torch.tensor([[0.1, 0.9], [0.3, 0.7], [0.2, 0.8], [0.1, 0.9]])
    assert suspects.record_scores("1.0.0", ids, ["cat"] * 3 + ["dog"], probabilities, CLASSES, session=session) == 3
    session.commit()
    return ids


def label_of(session, image_id: int) -> str:
    image = session.get(TrainingImage, image_id)
    return session.get(Category, image.category_id).name


def picture() -> Image.Image:
    """A 96 px drawing with a gradient and three shapes, clear of noise (the
    demo's grain would make its look-alike distances depend on the seed)."""
    image = Image.new("RGB", (96, 96))
    draw = ImageDraw.Draw(image)
    for x in range(96):
        draw.line([(x, 0), (x, 95)], fill=(x * 2, 60, 200 - x * 2))
    draw.ellipse([10, 14, 50, 54], fill=(250, 220, 40))
    draw.rectangle([58, 40, 88, 86], fill=(20, 20, 20))
    draw.polygon([(12, 90), (40, 60), (52, 90)], fill=(240, 240, 240))
    return image


def encoded(image: Image.Image, size: int | None = None, fmt: str = "PNG", **save) -> bytes:
    if size:
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def add_look_alikes(session) -> tuple[list[int], int]:
    """A picture stored three times (as drawn, resized to 64 px, re-encoded as
    JPEG; the last labelled differently) and its mirror image, a different
    picture; all pending. Returns the three ids and the mirror's."""
    copies = [encoded(picture()), encoded(picture(), 64), encoded(picture(), fmt="JPEG", quality=70)]
    ids = [
        ingest_bytes(data, f"copy{n}.png", session=session, category=label).image_id
        for n, (data, label) in enumerate(zip(copies, ["star", "star", "cross"], strict=True))
    ]
    mirror = encoded(picture().transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    other = ingest_bytes(mirror, "mirror.png", session=session, category="circle").image_id
    session.commit()
    return ids, other


# --- suspects: core -------------------------------------------------------------


def test_suspects_are_listed_by_score_and_accept_keep_reject_change_image_and_row(session):
    ids = add_suspects(session)
    listed = suspects.list_suspects(session=session)
    assert [s.image.id for s in listed] == [ids[0], ids[2], ids[1]]
    top = listed[0].row
    assert (top.given_label, top.suggested_label, top.given_probability, top.margin) == ("cat", "dog", 0.1, 0.8)
    assert suspects.count_suspects(session=session) == 3

    curator = as_actor("ana", "curator")
    accepted = suspects.resolve(ids[0], "accept", session=session, actor=curator)
    kept = suspects.resolve(ids[2], "keep", session=session, actor=curator)
    rejected = suspects.resolve(ids[1], "reject", session=session, actor=curator)
    session.commit()
    assert label_of(session, ids[0]) == "dog"
    assert label_of(session, ids[2]) == "cat" and session.get(TrainingImage, ids[2]).status == ImageStatus.validated
    assert session.get(TrainingImage, ids[1]).status == ImageStatus.rejected
    assert [r.resolution for r in (accepted, kept, rejected)] == ["accepted", "kept", "rejected"]
    assert all(r.resolved_by == "ana" and r.resolved_at for r in (accepted, kept, rejected))
    actions = {e.target: e.action for e in find_events(session=session, actor="ana")}
    assert actions == {
        f"image:{ids[0]}": "image.relabel",
        f"image:{ids[2]}": "image.keep_label",
        f"image:{ids[1]}": "image.reject",
    }
    assert suspects.list_suspects(session=session) == []
    assert len(suspects.list_suspects(session=session, include_resolved=True)) == 3


def test_a_bad_action_an_unknown_image_or_a_decided_suspect_changes_nothing(session):
    ids = add_suspects(session)
    suspects.resolve(ids[1], "keep", session=session, actor=as_actor())
    session.commit()
    events = len(find_events(session=session))
    with pytest.raises(UserError, match="Unknown action 'delete': use accept, keep, reject"):
        suspects.resolve(ids[0], "delete", session=session, actor=as_actor())
    with pytest.raises(NotFoundError, match="No image with id 999"):
        suspects.resolve(999, "accept", session=session, actor=as_actor())
    for not_open in (ids[3], ids[1]):  # never suspected; already kept
        with pytest.raises(NotFoundError, match=f"Image {not_open} is not an open suspect"):
            suspects.resolve(not_open, "accept", session=session, actor=as_actor())
    with pytest.raises(PermissionDeniedError):
        suspects.resolve(ids[0], "accept", session=session, actor=as_actor("vic", "viewer"))
    session.rollback()
    assert label_of(session, ids[0]) == label_of(session, ids[1]) == "cat"
    assert session.exec(select(SuspectScore).where(SuspectScore.image_id == ids[0])).one().resolution is None
    assert len(find_events(session=session)) == events


def test_a_kept_label_stays_kept_after_rescoring_until_the_label_changes(session):
    ids = add_suspects(session)
    suspects.resolve(ids[0], "keep", session=session, actor=as_actor())
    # A later round: the same label, the model still disagrees.
    suspects.record_scores("1.1.0", ids[:1], ["cat"], torch.tensor([[0.05, 0.95]]), CLASSES, session=session)
    assert ids[0] not in [s.image.id for s in suspects.list_suspects(session=session)]
    row = session.exec(select(SuspectScore).where(SuspectScore.image_id == ids[0])).one()
    assert (row.resolution, row.model_version, row.margin) == ("kept", "1.1.0", 0.9)
    # Once someone relabels it, a round that disagrees again opens it again.
    review.relabel_images(ids[:1], "dog", session=session, actor=as_actor())
    suspects.record_scores("1.2.0", ids[:1], ["dog"], torch.tensor([[0.9, 0.1]]), CLASSES, session=session)
    assert suspects.list_suspects(session=session)[0].image.id == ids[0]


def test_a_suspect_relabelled_or_rejected_elsewhere_is_no_longer_listed(session):
    ids = add_suspects(session)
    review.relabel_images([ids[0]], "dog", session=session, actor=as_actor())
    review.reject_images([ids[2]], session=session, actor=as_actor())
    assert [s.image.id for s in suspects.list_suspects(session=session)] == [ids[1]]


# --- near-duplicates and splits: core -------------------------------------------


def test_a_resized_or_reencoded_copy_is_a_near_duplicate_in_the_same_split_and_another_picture_is_not(session):
    ids, other = add_look_alikes(session)
    original = session.get(TrainingImage, ids[0])
    assert {img.id for img, _, _ in duplicates.look_alikes(original, session=session)} == set(ids[1:])
    assert {session.get(TrainingImage, i).split_key for i in ids} == {original.split_key}
    assert session.get(TrainingImage, other).split_key != original.split_key
    found = duplicates.look_alikes(original, session=session)
    assert all(bits <= duplicates.MAX_DISTANCE for _, _, bits in found)
    assert {name for _, name, _ in found} == {"star", "cross"}
    images = [session.get(TrainingImage, i) for i in [*ids, other]]
    assert duplicates.look_alike_counts(images, session=session) == {ids[0]: 2, ids[1]: 2, ids[2]: 2, other: 0}


def test_a_cluster_is_validated_then_rejected_as_one(session):
    ids, other = add_look_alikes(session)
    assert duplicates.clusters(session=session) == [sorted(ids)]
    assert review.set_status(ids, ImageStatus.validated, session=session, actor=as_actor("ana", "curator")) == 3
    assert {session.get(TrainingImage, i).status for i in ids} == {ImageStatus.validated}
    review.set_status(ids, ImageStatus.rejected, session=session, actor=as_actor("ana", "curator"))
    assert {session.get(TrainingImage, i).status for i in ids} == {ImageStatus.rejected}
    assert session.get(TrainingImage, other).status == ImageStatus.pending
    assert duplicates.clusters(session=session) == []  # rejected images are left out


def test_split_keys_stay_the_same_when_images_are_added_and_removed(session):
    first = [r.image_id for r in load_demo_dataset(session=session, per_category=4, size=32, seed=0).results]
    session.commit()
    keys = {img.id: img.split_key for img in session.exec(select(TrainingImage))}
    assert None not in keys.values() and len(set(keys.values())) > 10
    load_demo_dataset(session=session, per_category=4, size=32, seed=1)
    for image_id in first[::4]:
        session.delete(session.get(TrainingImage, image_id))
    session.flush()
    assign_splits(session=session)
    session.commit()
    now = {img.id: img.split_key for img in session.exec(select(TrainingImage))}
    assert len(now) == 35 and None not in now.values()
    assert {i: now[i] for i in now if i in keys} == {i: keys[i] for i in keys if i in now}


# --- the review page --------------------------------------------------------------


def open_tab(name: str):
    at = ok(app("pages/review.py", "curator", "Ada"))
    at.session_state["review_tabs"] = name
    return ok(at)


def test_suspects_tab_lists_rows_by_score_and_accept_relabels_the_image(session):
    ids = add_suspects(session)
    at = open_tab("Suspects")
    tab = at.tabs[1]
    assert [b.key for b in tab.button if b.key.startswith("accept_")] == [
        f"accept_{i}" for i in (ids[0], ids[2], ids[1])
    ]
    assert len(tab.image) == 3
    assert at.button(key=f"accept_{ids[2]}").label == "Accept 'dog'"
    assert at.button(key=f"keep_{ids[2]}").label == "Keep 'cat'"
    assert any("p(cat) 0.20 · margin 0.60 · model 1.0.0" in c.value for c in tab.caption)

    ok(at.button(key=f"accept_{ids[2]}").click())
    with read_session() as reader:
        assert label_of(reader, ids[2]) == "dog"
        assert reader.get(TrainingImage, ids[2]).reviewed_by == "Ada"
    assert f"#{ids[2]}: moved from 'cat' to 'dog'." in at.success[0].value
    # The decided card stays where it was, greyed, until the page changes.
    accept = {b.key: b.disabled for b in at.tabs[1].button if b.key.startswith("accept_")}
    assert accept == {f"accept_{ids[0]}": False, f"accept_{ids[2]}": True, f"accept_{ids[1]}": False}
    assert list(accept) == [f"accept_{i}" for i in (ids[0], ids[2], ids[1])]
    ok(at.button(key="suspects_refresh").click())
    assert [b.key for b in at.tabs[1].button if b.key.startswith("accept_")] == [f"accept_{ids[0]}", f"accept_{ids[1]}"]


def test_suspects_keep_comes_first_ticked_cards_are_kept_in_bulk_and_the_scorer_is_rated(session):
    from tests.factories import add_fake_version

    ids = add_suspects(session)
    version = add_fake_version(session, "1.0.0", classes=CLASSES)
    version.metrics = {**version.metrics, "test_accuracy": 87.5, "test_images": 40}
    session.add(version)
    session.commit()
    at = open_tab("Suspects")
    tab = at.tabs[1]
    assert any("from model 1.0.0: 87.5% right on its 40 held-out test images" in c.value for c in tab.caption)
    card = [b for b in tab.button if b.key.endswith(f"_{ids[0]}")]
    assert [b.key for b in card] == [f"keep_{ids[0]}", f"accept_{ids[0]}", f"reject_{ids[0]}"]
    assert all(b.type != "primary" for b in card)

    at.checkbox(key=f"suspect_pick_{ids[0]}").check()
    ok(at.checkbox(key=f"suspect_pick_{ids[1]}").check())
    assert at.button(key="suspects_keep_ticked").label == "Keep ticked (2)"
    ok(at.button(key="suspects_keep_ticked").click())
    assert "2 suspects kept." in at.success[0].value
    with read_session() as reader:
        assert [label_of(reader, i) for i in ids[:3]] == ["cat", "cat", "cat"]
        assert suspects.count_suspects(session=reader) == 1
    assert at.button(key=f"keep_{ids[0]}").disabled and not at.button(key=f"keep_{ids[2]}").disabled


def test_suspects_tab_says_when_nothing_has_been_scored_yet(session):
    add_images(session, {"cat": 2})
    at = open_tab("Suspects")
    assert "No training round has completed yet" in at.tabs[1].info[0].value


def test_duplicates_tab_shows_a_cluster_and_reject_all_rejects_its_images(session):
    ids, other = add_look_alikes(session)
    at = open_tab("Duplicates")
    tab = at.tabs[2]
    assert any("**3 look-alikes** · cross, star" in m.value for m in tab.markdown)
    assert len(tab.image) == 3
    # The review grid marks each copy; the different picture gets no mark.
    captions = [c.value for c in at.tabs[0].caption]
    assert sum("2 look-alike(s)" in c for c in captions) == 3

    ok(at.button(key=f"cluster_reject_{min(ids)}").click())
    with read_session() as reader:
        assert [reader.get(TrainingImage, i).status for i in ids] == [ImageStatus.rejected] * 3
        assert reader.get(TrainingImage, other).status == ImageStatus.pending
    assert "3 image(s) rejected." in at.success[0].value
    assert "No near-duplicates" in at.tabs[2].info[0].value


def add_copies(session, n: int) -> list[int]:
    """`picture()` stored `n` times, each a genuine copy (re-encoded, resized)."""
    files = [
        encoded(picture(), 40 + 8 * i) if i % 2 else encoded(picture(), fmt="JPEG", quality=60 + i) for i in range(n)
    ]
    ids = [ingest_bytes(data, f"c{i}.png", session=session, category="star").image_id for i, data in enumerate(files)]
    session.commit()
    return ids


def test_acting_on_a_cluster_of_more_than_a_handful_asks_first_stating_the_count(session):
    ids = add_copies(session, 7)
    assert duplicates.clusters(session=session) == [ids]
    session.rollback()  # the page writes (signing in): end this read
    at = open_tab("Duplicates")
    assert any("**7 look-alikes** · star" in m.value for m in at.tabs[2].markdown)

    ok(at.button(key=f"cluster_reject_{min(ids)}").click())
    assert any("Reject all 7 images?" in w.value for w in at.warning)
    with read_session() as reader:  # nothing changes before the confirmation
        assert {reader.get(TrainingImage, i).status for i in ids} == {ImageStatus.pending}
    ok(at.button(key="cluster_confirm_no").click())
    assert not any("Reject all 7 images?" in w.value for w in at.warning)
    ok(at.button(key=f"cluster_reject_{min(ids)}").click())
    ok(at.button(key="cluster_confirm_yes").click())
    with read_session() as reader:
        assert {reader.get(TrainingImage, i).status for i in ids} == {ImageStatus.rejected}
    assert "7 image(s) rejected." in at.success[0].value


def test_cli_acts_on_a_cluster_only_when_its_count_is_confirmed(session, capsys, monkeypatch):
    ids = add_copies(session, 7)
    monkeypatch.setattr("builtins.input", lambda prompt: print(prompt) or "6")
    assert main(["duplicates", "--validate", "1"]) == 1
    out = capsys.readouterr().out
    assert "Validate all 7 images?" in out and "Nothing changed (cluster 1 has 7 images" in out
    assert main(["duplicates", "--validate", "1", "--yes", "7"]) == 0
    assert "7 image(s) of cluster 1 validated." in capsys.readouterr().out
    with read_session() as reader:
        assert {reader.get(TrainingImage, i).status for i in ids} == {ImageStatus.validated}
    assert main(["duplicates", "--reject", "2", "--yes", "7"]) == 2
    assert "There is no cluster 2" in capsys.readouterr().err


# --- the command line ---------------------------------------------------------------


def test_cli_lists_and_resolves_suspects_and_lists_duplicate_clusters(session, capsys):
    ids = add_suspects(session)
    add_look_alikes(session)
    listing = run_cli("suspects").stdout  # the real command, once; the rest through its main()
    lines = [line for line in listing.splitlines() if "cat -> dog" in line]
    assert [int(line.split()[0]) for line in lines] == [ids[0], ids[2], ids[1]]
    assert "0.100   0.800  1.0.0" in lines[0]
    assert main(["suspects", "accept", str(ids[0])]) == 0
    assert f"image {ids[0]}: accepted (cat -> dog)" in capsys.readouterr().out
    assert main(["suspects", "keep", str(ids[0]), str(ids[1])]) == 2
    assert f"Image {ids[0]} is not an open suspect" in capsys.readouterr().err
    with read_session() as reader:  # all or nothing: ids[1] was not kept either
        assert suspects.count_suspects(session=reader) == 2
    assert main(["duplicates"]) == 0
    clusters = capsys.readouterr().out
    # add_images draws flat colours: featureless pictures match nothing, so one cluster.
    assert "cluster 1: 3 images" in clusters and "cluster 2" not in clusters and "copy0.png" in clusters
    assert "1 cluster(s) of 3 images" in clusters


# --- the measured recall ----------------------------------------------------------------


def stand_in_export(model, version, images, on_step=None, formats=None):
    """Export is tested elsewhere (test_training, test_model_quality); here it
    would be most of the runtime."""
    return [{"format": "ptl", "path": f"mobile_models/model_{version}.ptl", "sha256": "", "size_bytes": 1}]


@pytest.mark.slow
def test_most_deliberately_swapped_labels_are_at_the_top_of_the_suspects_after_one_round(session, monkeypatch):
    from core.training import register
    from core.training.rounds import run_training_round, start_training

    monkeypatch.setattr(register, "export_model", stand_in_export)
    # One thread: on a machine shared with other test runs, two are several times slower.
    monkeypatch.setenv("TORCH_THREADS", "1")
    get_settings.cache_clear()
    ids = [r.image_id for r in load_demo_dataset(session=session, per_category=40, size=40).results]
    rng = random.Random(1)
    swapped = rng.sample(ids, 20)
    for n, image_id in enumerate(swapped):
        label = label_of(session, image_id)
        wrong = [c for c in DEMO_CATEGORIES if c != label][n % 4]
        review.relabel_images([image_id], wrong, session=session, actor=as_actor())
    session.commit()
    params = {"epochs": 8, "batch_size": 16, "image_size": 40, "use_existing_model": False}  # the default rate
    round_ = start_training(params, session=session)
    session.commit()
    assert run_training_round(round_.id, session=session) is not None, round_.error

    top = {s.image.id for s in suspects.list_suspects(session=session, limit=2 * len(swapped))}
    found = [i for i in swapped if i in top]
    held_out = [i for i in swapped if split_of(session.get(TrainingImage, i).split_key, 0.2) != "train"]
    held_out_found = sum(i in top for i in held_out)
    # A ranking blind to the labels puts each swap in the top 40 of 200 with
    # chance 0.2: 9 or more of 20 happens once in a hundred rounds that way.
    chance = binomtest(len(found), len(swapped), 2 * len(swapped) / len(ids), alternative="greater").pvalue
    print(
        f"found {len(found)} of {len(swapped)} in the top {2 * len(swapped)} (p {chance:.1g} against a blind "
        f"ranking); held-out swaps found: {held_out_found}/{len(held_out)}"
    )
    # A from-scratch model on 160 training pictures is unsteady: which swaps it
    # learns with their wrong label changes with the float rounding of its
    # optimizer. Over 16 choices of swaps, each trained with the default and
    # with the fused AdamW, 10 - 19 of 20 were found (median 15), and at least
    # 3 of 5 held-out ones (BENCHMARKS.md, session 9). The earlier form of
    # this test (10 swaps, three times the default rate, a bar of 5) failed
    # for 8 of 33 choices with the default AdamW and 15 of 33 with the fused
    # one. The product trains with the fused one (session 10). The misses are
    # training images the model learnt with their wrong label.
    assert chance < 0.01
    assert held_out_found >= len(held_out) / 2


def test_featureless_pictures_do_not_share_a_split_though_their_hashes_match(session):
    from core.duplicates import featureless

    add_images(session, {"cat": 6})
    images = list(session.exec(select(TrainingImage)))
    assert all(featureless(image.phash) for image in images)  # flat colours: every hash alike
    assert len({image.split_key for image in images}) == len(images)


def test_a_round_split_follows_the_keys_and_says_what_had_to_give_way(data_dir):
    from core.splits import split_snapshot

    # TEST_SPLIT 0.15, val_split 0.2: below 0.15 test, then 0.15-0.32 validation, above training.
    keys = [0.05, 0.2, 0.5, 0.9, 0.25, 0.26, 0.1]
    labels = [0, 0, 0, 0, 1, 1, 2]  # cat: all three splits; dog: validation only; bird: test only
    split = split_snapshot(keys, labels, ["cat", "dog", "bird"], 0.2, seed=0)
    assert (split.train, split.val, split.test) == ([2, 3, 4, 5], [1], [0, 6])
    assert "'dog' had no training image outside the validation set" in split.notes[0]
    assert "'bird' has only test images" in split.notes[1]

    nothing_in_val = split_snapshot([0.5, 0.6, 0.7, 0.8], [0, 0, 1, 1], ["cat", "dog"], 0.2, seed=0)
    assert len(nothing_in_val.val) == 2 and len(nothing_in_val.train) == 2
    assert "validation images were drawn from the training images" in nothing_in_val.notes[-1]


def _groups(session, sizes: list[int]) -> list[list[int]]:
    """Look-alike groups of these sizes, made by setting representatives
    (what the look-alike search leaves behind), and one image alone."""
    ids = add_images(session, {"star": sum(sizes) + 1}, status=ImageStatus.pending)
    groups, start = [], 0
    for size in sizes:
        groups.append(ids[start : start + size])
        start += size
    for members in [*groups, ids[-1:]]:
        for image_id in members:
            session.get(TrainingImage, image_id).representative_id = members[0]
    session.commit()
    return groups


def test_clusters_are_paged_in_sql_largest_first(session):
    assert duplicates.clusters(session=session, limit=10) == []
    assert duplicates.count_clusters(session=session) == 0
    big, small, same = _groups(session, [4, 2, 2])
    assert duplicates.count_clusters(session=session) == 3
    assert duplicates.clusters(session=session) == [big, small, same]
    assert duplicates.clusters(session=session, offset=1, limit=1) == [small]
    assert duplicates.clusters(session=session, offset=2, limit=5) == [same]  # the last page
    assert duplicates.clusters(session=session, offset=3, limit=5) == []
    review.reject_images(small[:1], session=session, actor=as_actor())
    session.commit()
    assert duplicates.count_clusters(session=session) == 2  # one left: no group
    assert duplicates.clusters(session=session, exclude_rejected=False, offset=1, limit=1) == [small]


def test_duplicates_tab_pages_through_the_groups(session):
    groups = _groups(session, [3] + [2] * 10)
    at = open_tab("Duplicates")
    assert at.get("pagination")[0].num_pages == 2
    assert any("**3 look-alikes**" in m.value for m in at.tabs[2].markdown)
    ok(at.get("pagination")[0].select(2))
    heads = [m.value for m in at.tabs[2].markdown if "look-alikes**" in m.value]
    assert heads == ["**2 look-alikes** · star"]
    assert at.button(key=f"cluster_validate_{groups[-1][0]}")
