"""The errors klvae raises for problems a user fixes, and how command-line tools report them.

A user error (bad config, unusable data, missing file, full disk, a diverged recipe) becomes one line and exit
status 2; anything else is a bug in klvae and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

__all__ = [
    "DISK_ERRNOS",
    "ConfigError",
    "DataError",
    "TrainingDivergedError",
    "is_user_error",
    "load_user_file",
    "one_line",
    "report_user_error",
    "run_cli",
    "run_tool",
]


class ConfigError(ValueError):
    """A config that cannot be turned into objects; the message names the offending key or value."""


class TrainingDivergedError(RuntimeError):
    """Training cannot go on for a reason the user fixes in the recipe (e.g. updates that keep producing
    non-finite losses); the message names the iteration and what to change."""


class DataError(ValueError):
    """Training or evaluation data that cannot be used (nothing decodes, a source is empty, ...).

    Raised inside DataLoader workers too: PyTorch re-raises it in the main process as ``DataError(text)``
    with the worker's traceback in ``text``, so the constructor takes exactly one string.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)


# Disk and permission failures of the user's file system: full disk, quota, read-only mount, no permission.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_user_error(e: BaseException) -> bool:
    """True for errors the user fixes (config, data, files, disk), False for bugs (which keep tracebacks).

    ``KeyError``/``TypeError``/``AttributeError`` are never user errors here: config problems raise
    :class:`ConfigError` where the value is read, so those only come from code.
    """
    if isinstance(e, ConfigError | DataError | TrainingDivergedError):
        return True
    if isinstance(e, FileNotFoundError | IsADirectoryError | NotADirectoryError | PermissionError):
        return True
    return isinstance(e, OSError) and e.errno in DISK_ERRNOS


def one_line(e: BaseException) -> str:
    """The error as one line; for an error re-raised from a DataLoader worker, the worker's own message."""
    text = str(e)
    if (
        "Original Traceback" in text
    ):  # "Caught DataError in DataLoader worker process 0. Original Traceback..."
        last = [line for line in text.splitlines() if line.strip()][-1]
        text = last.split(": ", 1)[1] if ": " in last and last.split(": ", 1)[0].endswith("Error") else last
    if isinstance(e, OSError) and e.errno in DISK_ERRNOS and e.filename:
        hint = {errno.ENOSPC: "free disk space", errno.EDQUOT: "free quota"}.get(
            e.errno, "choose a writable location (e.g. another --logdir / --out)"
        )
        text = f"cannot write {e.filename!s}: {e.strerror}; {hint}"
    elif isinstance(e, OSError) and e.errno in DISK_ERRNOS:
        text = f"{e}; free disk space or choose a writable location"
    return " ".join(text.split()) or type(e).__name__


def load_user_file(what: str, loader: Callable[[], Any]) -> Any:
    """Call ``loader`` (reading a user-given checkpoint or file); its ValueError becomes a ConfigError.

    Loading code rejects unreadable, truncated or wrong-format files with ValueError naming the file.
    """
    try:
        return loader()
    except ValueError as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"{what}: {e}") from e


def run_tool(prog: str, body: Callable[[], Any], traceback: bool) -> int:
    """Run a command-line tool's ``body``: user errors become one ``prog: error: ...`` line and status 2.

    With ``traceback`` (the tools' ``--traceback`` flag) they propagate with the full trace instead.
    Bugs (anything :func:`is_user_error` rejects) always keep their traceback.
    """
    try:
        body()
    except Exception as e:
        if traceback or not is_user_error(e):
            raise
        logging.getLogger(__name__).debug("user error", exc_info=True)
        return report_user_error(e, prog)
    return 0


def run_cli(
    prog: str,
    parser: argparse.ArgumentParser,
    body: Callable[[argparse.Namespace], Any],
    argv: Sequence[str] | None = None,
) -> int:
    """A side tool's ``main``: INFO logging, parse ``argv`` (the parser has ``--traceback``), then
    :func:`run_tool` on ``body(args)``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parser.parse_args(argv)
    return run_tool(prog, lambda: body(args), args.traceback)


def report_user_error(e: BaseException, prog: str | None = None) -> int:
    """Write a user error as the command line's one ``[prog: ]error: ...`` line on stderr; returns status 2.

    The terminal output of the tools (as ``argparse``'s ``parser.error``), not a log record: it must look the
    same whatever logging configuration the caller has.
    """
    sys.stderr.write(f"{prog + ': ' if prog else ''}error: {one_line(e)}\n")
    return 2
