"""One ASGI app on one port: the Streamlit dashboard, with the HTTP API at
/api and the session-cookie routes at /session (api/browser.py); `/media/*`
answers signed-in browsers only.

`python -m cli serve` (what `make run` does) runs `streamlit run server.py`;
`uvicorn server:app` serves it too.
"""

import streamlit as st
from starlette.middleware import Middleware
from starlette.routing import Mount

from api import browser
from api.app import app as api_app
from api.security import SecurityHeaders

app = st.App(
    "dashboard.py",
    routes=[Mount("/api", app=api_app), *browser.routes],
    middleware=[Middleware(SecurityHeaders), Middleware(browser.MediaNeedsSession)],
)
