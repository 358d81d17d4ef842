"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""


class UserError(Exception):
    """A mistake the user can fix (bad path, bad parameter, mismatched cache)."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)
