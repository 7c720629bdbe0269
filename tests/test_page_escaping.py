"""User text on the pages is shown as typed: a category name, a user name or
an error quoting them never becomes a link, an image or formatting."""

from markdown_it import MarkdownIt
from streamlit.testing.v1 import AppTest

from core.models import Category, ImageStatus
from pages._common import md
from tests.conftest import ROOT
from tests.factories import add_images, add_user, sign_in

EVIL = "[x](http://evil.example) ![p](http://127.0.0.1:9/t.png)"
# CommonMark, as Streamlit's renderer reads it; tables and strikethrough as in GFM.
RENDER = MarkdownIt("commonmark").enable(["table", "strikethrough"])


def shown(at: AppTest) -> list[str]:
    """Everything the page (and its sidebar) put through markdown: texts,
    captions, alerts and widget labels."""
    texts = []
    for root in (at, at.sidebar):
        for kind in ("markdown", "caption", "error", "warning", "success", "info"):
            texts += [element.value for element in getattr(root, kind)]
        texts += [widget.label for widget in (*root.checkbox, *root.button)]
    return texts


def assert_inert(at: AppTest) -> list[str]:
    """No shown text renders a link or an image; returns the rendered HTML."""
    assert not at.exception, [e.value for e in at.exception]
    html = [RENDER.render(text) for text in shown(at)]
    assert not [h for h in html if "<a " in h or "<img" in h], html
    return html


def test_a_markdown_link_as_category_name_is_shown_as_typed_not_as_a_link(session):
    # New names may not hold "/" any more (core.ingest.check_category_name), but
    # a category named before that rule keeps its name.
    session.add(Category(name=EVIL))
    session.commit()
    ids = add_images(session, {EVIL: 2, "cats": 1}, status=ImageStatus.pending)
    curator = add_user(session, "curator", "curator")
    at = AppTest.from_file(str(ROOT / "pages/review.py"), default_timeout=60)
    sign_in(at, curator)
    html = assert_inert(at.run())
    # The name is on the grid, literally, brackets and all.
    assert any("[x](http://evil.example)" in h for h in html)

    # Relabelling to it: the success message quotes the name.
    at.checkbox(key=f"pick_{ids[2]}").check().run()
    at.selectbox(key="relabel_to").select(EVIL).run()
    at.button(key="relabel").click().run()
    assert "moved to '" + md(EVIL) + "'" in at.success[0].value
    assert_inert(at)

    # Looking an image up by a name nothing has: the answer quotes what was typed.
    at.text_input(key="history_search").input(EVIL).run()
    assert any(f"file name with '{md(EVIL)}'" in c.value for c in at.caption)
    assert_inert(at)

    # Adding it again: the naming rule refuses it, quoting it.
    at.text_input(key="new_category").input(EVIL)
    at.get("form_submit_button")[0].click().run()
    assert "must be printable text" in at.error[0].value and md(EVIL) in at.error[0].value
    assert_inert(at)


def test_a_markdown_user_name_in_the_sidebar_is_shown_as_typed(session):
    at = AppTest.from_file(str(ROOT / "dashboard.py"), default_timeout=60)
    sign_in(at, add_user(session, "<b>ana</b> [me](http://evil.example)", "viewer"))
    html = assert_inert(at.run())
    assert any("&lt;b&gt;ana&lt;/b&gt; [me](http://evil.example)" in h for h in html)


def test_escaping_keeps_plain_text_and_breaks_every_kind_of_markup():
    assert md("2 image(s) validated: 'cats'.") == "2 image(s) validated: 'cats'."
    for text in (EVIL, "<img src=x>", "www.evil.example", "http://evil.example", "*bold* _it_ `code` ~~s~~"):
        html = RENDER.render(md(text))
        assert "<a " not in html and "<img" not in html and "<em>" not in html and "<code>" not in html
    # Block markers at the start lose their meaning too.
    for text in ("# title", "> quote", "- item", "1. item"):
        assert RENDER.render(md(text)).startswith("<p>"), text
