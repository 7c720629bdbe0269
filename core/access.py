"""Who may do what: the one table of roles and their permissions.

Every edge (API tokens now, dashboard users later) asks `check_permission`;
no other module compares role names.
"""

from enum import StrEnum

from core.errors import PermissionDeniedError, UserError


class Permission(StrEnum):
    # categories, training status, model manifests and downloads
    read = "read"
    upload_images = "upload_images"
    # start and cancel training jobs
    train = "train"


class Role(StrEnum):
    device = "device"
    viewer = "viewer"
    operator = "operator"
    admin = "admin"


ROLE_PERMISSIONS: dict[Role, frozenset[Permission]] = {
    Role.device: frozenset({Permission.read, Permission.upload_images}),
    Role.viewer: frozenset({Permission.read}),
    Role.operator: frozenset({Permission.read, Permission.train}),
    Role.admin: frozenset(Permission),
}


def parse_role(name: str) -> Role:
    """The role called `name`, or a UserError listing the roles."""
    try:
        return Role(name)
    except ValueError:
        raise UserError(f"Unknown role '{name}': use one of {', '.join(Role)}") from None


def allows(role: str, permission: Permission) -> bool:
    return permission in ROLE_PERMISSIONS.get(Role(role), frozenset())


def check_permission(role: str, permission: Permission) -> None:
    """Raise PermissionDeniedError unless `role` has `permission`."""
    if not allows(role, permission):
        able = ", ".join(r for r, perms in ROLE_PERMISSIONS.items() if permission in perms)
        raise PermissionDeniedError(
            f"The role '{role}' may not {permission.value.replace('_', ' ')}; roles that may: {able}"
        )
