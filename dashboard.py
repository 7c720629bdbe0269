"""The dashboard frame (placeholder until the dashboard issue lands)."""

import streamlit as st

st.set_page_config(page_title="Training dashboard", layout="wide")
st.title("Training dashboard")
st.info("The dashboard pages are on their way. Meanwhile use the command line: `python -m core --help`.")
