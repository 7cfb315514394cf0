"""The one exception type for problems the user can fix (bad input, bad options)."""


class PtqflowError(Exception):
    """A user error: its message says what is wrong and what to do; no traceback is shown."""
