"""Errors that reach users as one clear line and an exit code, never a traceback."""


class EdgelmError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 1


class BadInputError(EdgelmError):
    """A file, field or value supplied by the user is invalid."""

    exit_code = 2


class FormatError(BadInputError):
    """A bundle, GGUF or checkpoint file is malformed, truncated or unsupported."""

    exit_code = 3


class CapacityError(EdgelmError):
    """A request does not fit the KV-cache capacity chosen at load time."""

    exit_code = 4


class OutputError(EdgelmError):
    """An output file cannot be written: a full disk, a read-only or missing directory, no
    permission. The message names the path and the system's reason."""

    exit_code = 5
