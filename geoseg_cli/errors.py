"""Exceptions raised by the geoseg library."""


class GeosegError(Exception):
    """A runtime refusal with a message fit for the user (names the file and the fix).

    The CLI maps :class:`UsageError` to exit code 2 and every other :class:`GeosegError` to
    exit code 1, printing the message on one line.
    """


class UsageError(GeosegError):
    """The user asked for something inconsistent (bad option combination, wrong value)."""


class InputError(GeosegError):
    """An input file is missing, unreadable or does not fit what is asked of it."""


class OutputError(GeosegError):
    """An output cannot be written (exists without --overwrite, folder missing, disk full)."""


class CheckpointError(GeosegError):
    """A checkpoint or ONNX model is corrupt, foreign or inconsistent."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped a command that keeps what it finished; the message says what."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
