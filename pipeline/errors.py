"""User-facing errors: the CLI prints these as one line and exits non-zero, without a traceback."""

import sys


class UserError(Exception):
    """A mistake the user can fix (bad path, bad parameter, mismatched cache)."""


class SaidByAnother(UserError):
    """A refusal another process of the job prints (rank 0's, or the first to meet a full disk): this
    process keeps quiet and exits with the same status."""


def require(condition: bool, message: str) -> None:
    if not condition:
        raise UserError(message)


MAX_LISTED = 20  # problems `list_problems` prints one per line; the rest are counted


def list_problems(echo, where: str, problems: list) -> None:
    """What `pipeline verify` found, one line each (`where: problem`) on stderr, at most MAX_LISTED."""
    for problem in problems[:MAX_LISTED]:
        echo(f"{where}: {problem}", err=True)
    if len(problems) > MAX_LISTED:
        echo(f"... and {len(problems) - MAX_LISTED} more problems", err=True)


def say_to_stderr(line: str) -> None:
    """Print a note for the user (not a result) on stderr: the library's default way to say something."""
    print(line, file=sys.stderr, flush=True)
