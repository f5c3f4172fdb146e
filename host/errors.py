"""Errors shared by the host's commands."""


class UsageError(Exception):
    """A user-facing error: ``hel`` prints it as one line and exits with code 2."""
