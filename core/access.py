"""Who may do what: the one table of roles and their permissions.

Every edge (API tokens, dashboard users, the command line) acts as an `Actor`
and every core function that changes something calls `require` first; no
other module compares role names.
"""

from dataclasses import dataclass
from enum import StrEnum

from core.errors import PermissionDeniedError, UserError


class Permission(StrEnum):
    # overview, categories, training status, metrics, model manifests and downloads
    read = "read"
    upload_images = "upload_images"
    # validate, reject, relabel
    review_images = "review_images"
    # add and rename categories
    manage_categories = "manage_categories"
    # start and cancel training jobs
    train = "train"
    # promote a version to production, roll back
    promote = "promote"
    # the audit trail
    read_audit = "read_audit"
    # dashboard users and API tokens
    manage_users = "manage_users"


class Role(StrEnum):
    # a phone: uploads pictures, downloads models (API tokens only)
    device = "device"
    viewer = "viewer"
    curator = "curator"
    operator = "operator"
    admin = "admin"


# People sign in with one of these; `device` is for API tokens only.
USER_ROLES = (Role.viewer, Role.curator, Role.operator, Role.admin)

_CURATOR = frozenset(
    {Permission.read, Permission.upload_images, Permission.review_images, Permission.manage_categories}
)

ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.device: frozenset({Permission.read, Permission.upload_images}),
    Role.viewer: frozenset({Permission.read}),
    Role.curator: _CURATOR,
    Role.operator: _CURATOR | {Permission.train, Permission.promote, Permission.read_audit},
    Role.admin: frozenset(Permission),
}


@dataclass(frozen=True)
class Actor:
    """Who is acting: a signed-in person, an API token or the command line."""

    # As recorded in `reviewed_by`, `requested_by`, histories and the audit trail.
    name: str
    role: str


# The command line runs on the server with access to the database: a local admin.
CLI_ACTOR = Actor("cli", Role.admin)
# Promotions the system makes by itself (AUTO_PROMOTE).
SYSTEM_ACTOR = Actor("auto", Role.admin)


def parse_role(name: str, allowed: tuple[Role, ...] = tuple(Role)) -> Role:
    """The role called `name`, or a UserError listing the `allowed` roles."""
    try:
        role = Role(name)
    except ValueError:
        role = None
    if role not in allowed:
        raise UserError(f"Unknown role '{name}': use one of {', '.join(allowed)}")
    return role


def allows(role: str, permission: Permission) -> bool:
    try:
        return permission in ROLE_PERMISSIONS[Role(role)]
    except ValueError:
        return False


def check_permission(role: str, permission: Permission) -> None:
    """Raise PermissionDeniedError unless `role` has `permission`."""
    if not allows(role, permission):
        able = ", ".join(r for r, perms in ROLE_PERMISSIONS.items() if permission in perms)
        raise PermissionDeniedError(
            f"The role '{role}' may not {permission.value.replace('_', ' ')}; roles that may: {able}"
        )


def require(actor: Actor, permission: Permission) -> None:
    """Raise PermissionDeniedError unless `actor`'s role has `permission` (the
    first line of every core function that changes something)."""
    check_permission(actor.role, permission)
