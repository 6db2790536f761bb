"""Errors qkcore reports to the user as one clear line (no traceback)."""


class QkcoreError(RuntimeError):
    """A user-facing failure: bad input, unsupported model, failed upload."""
