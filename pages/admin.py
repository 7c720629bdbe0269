"""Users and tokens (admins): people who sign in, and API tokens for phones and scripts."""

import streamlit as st

from core import tokens, users
from core.access import USER_ROLES, Permission, Role
from core.db import read_session, session_scope
from core.errors import UserError
from pages._common import frame_of, md, require_page, when

actor = require_page(Permission.manage_users)
st.title("Users and tokens")


def act(key: str, change) -> None:
    """Run `change(session) -> message or (message, secret)` as one unit of
    work; the message (or the error) is shown after the rerun, once: a secret
    in it is then gone."""
    try:
        with session_scope() as session:
            done = change(session)
        text, secret = done if isinstance(done, tuple) else (done, None)
        st.session_state[key] = ("success", text, secret)
    except UserError as exc:
        st.session_state[key] = ("error", md(exc), None)
    st.rerun()


def show_result(key: str) -> None:
    if done := st.session_state.pop(key, None):
        kind, text, secret = done
        getattr(st, kind)(text)
        if secret:
            # st.code has a copy button; the secret is not shown again.
            st.code(secret, language=None)


def create_user(session) -> tuple[str, str]:
    made = users.create_user(
        st.session_state["new_user_name"], st.session_state["new_user_role"], session=session, actor=actor
    )
    return (
        f"User '{md(made.user.name)}' ({made.user.role}) created. Their password, shown once (copy it):",
        made.password,
    )


def change_role(session) -> str:
    user = users.set_role(
        st.session_state["manage_user"], st.session_state["manage_role"], session=session, actor=actor
    )
    return f"'{md(user.name)}' is now {user.role}."


def reset_password(session) -> tuple[str, str]:
    made = users.reset_password(st.session_state["manage_user"], session=session, actor=actor)
    return f"New password for '{md(made.user.name)}', shown once (copy it):", made.password


def toggle_active(session) -> str:
    name = st.session_state["manage_user"]
    user = users.set_active(name, not users.get_user(name, session=session).active, session=session, actor=actor)
    return f"'{md(user.name)}' is {'active again' if user.active else 'deactivated: they can no longer sign in'}."


def create_token(session) -> tuple[str, str]:
    made = tokens.create_token(
        session=session,
        actor=actor,
        role=st.session_state["token_role"],
        label=st.session_state["token_label"],
        expires_days=st.session_state["token_days"] or None,
    )
    return (
        f"Token {made.token.id} for '{md(made.token.label)}' ({made.token.role}). Copy it now, it is not shown again:",
        made.secret,
    )


def revoke_token(session) -> str:
    token = tokens.revoke_token(st.session_state["revoke_token"], session=session, actor=actor)
    return f"Token {token.id} ('{md(token.label)}') is revoked."


users_tab, tokens_tab = st.tabs(["Users", "API tokens"])

with users_tab:
    with read_session() as session:
        people = users.list_users(session=session)
    show_result("users_message")
    listed = [
        {"name": u.name, "role": u.role, "active": u.active, "created": u.created_at, "last sign-in": u.last_sign_in_at}
        for u in people
    ]
    st.dataframe(frame_of(listed), hide_index=True, key="users_table", column_config=when("created", "last sign-in"))
    roles = [r.value for r in USER_ROLES]
    left, right = st.columns(2)
    with left, st.form("create_user", clear_on_submit=True):
        st.markdown("**New user** (a password is generated and shown once)")
        st.text_input("Name", key="new_user_name")
        st.selectbox("Role", roles, key="new_user_role")
        if st.form_submit_button("Create user", type="primary"):
            act("users_message", create_user)
    with right:
        st.markdown("**Change a user**")
        chosen = st.selectbox("User", [u.name for u in people], key="manage_user")
        person = next(u for u in people if u.name == chosen)
        st.selectbox("Role", roles, index=roles.index(person.role), key="manage_role")
        b1, b2, b3 = st.columns(3)
        if b1.button("Change role", key="change_role"):
            act("users_message", change_role)
        if b2.button("Reset password", key="reset_password"):
            act("users_message", reset_password)
        if b3.button("Deactivate" if person.active else "Activate", key="toggle_active"):
            act("users_message", toggle_active)

with tokens_tab:
    with read_session() as session:
        rows = tokens.list_tokens(session=session)
    show_result("tokens_message")
    with st.form("create_token", clear_on_submit=True):
        st.markdown("**New API token** (the secret is shown once)")
        c1, c2, c3 = st.columns(3)
        c1.text_input("Label", key="token_label", placeholder="pixel-7 of Ana")
        c2.selectbox("Role", [r.value for r in Role], key="token_role")
        c3.number_input("Expires after (days, 0 = never)", min_value=0, value=0, step=30, key="token_days")
        if st.form_submit_button("Create token", type="primary"):
            act("tokens_message", create_token)
    if not rows:
        st.caption("No API tokens yet.")
    else:
        listed = [
            {"id": t.id, "label": t.label, "role": t.role, "state": tokens.token_state(t), "created": t.created_at,
             "last used": t.last_used_at, "expires": t.expires_at}
            for t in rows
        ]  # fmt: skip
        st.dataframe(
            frame_of(listed), hide_index=True, key="tokens_table", column_config=when("created", "last used", "expires")
        )
        live = {t.id: f"{t.id} · {t.label} ({t.role})" for t in rows if tokens.token_state(t) == "active"}
        left, right = st.columns([3, 1], vertical_alignment="bottom")
        left.selectbox("Token to revoke", list(live), format_func=live.get, key="revoke_token")
        if right.button("Revoke", key="revoke", disabled=not live):
            act("tokens_message", revoke_token)
