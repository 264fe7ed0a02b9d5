"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class PlscError(Exception):
    """Bad input or an impossible request; ``str(error)`` is a complete one-line explanation."""
