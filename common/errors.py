"""Errors shared across packages."""


class RunError(RuntimeError):
    """A run-stopping problem with a message that names its cause and the fix."""
