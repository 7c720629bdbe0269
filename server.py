"""One ASGI app on one port: the Streamlit dashboard, with the HTTP API at
/api and the session-cookie routes at /session (api/browser.py); `/media/*`
answers signed-in browsers only.

`python -m cli serve` (what `make run` does) runs `streamlit run server.py`;
`uvicorn server:app` serves it too.
"""

import streamlit as st
from starlette.middleware import Middleware
from starlette.routing import Mount
from streamlit.runtime.pages_manager import PagesManager

from api import browser
from api.app import app as api_app
from api.security import SecurityHeaders

# dashboard.py's pages are its st.navigation, never the files in pages/.
# Streamlit decides at its first session whether to run a page file directly,
# by whether a pages/ folder sits beside the main script, and only a call to
# st.navigation turns that off: so after a restart, a first visitor opening a
# link (/review) got pages/review.py on its own, without the sign-in form or
# the sidebar, until someone opened "/". (Streamlit has no setting for it.)
PagesManager.uses_pages_directory = False

app = st.App(
    "dashboard.py",
    routes=[Mount("/api", app=api_app), *browser.routes],
    middleware=[Middleware(SecurityHeaders), Middleware(browser.MediaNeedsSession)],
)
