"""The one exception type for problems the user can fix (bad input, bad options)."""

import errno
from collections.abc import Iterator
from contextlib import contextmanager


class PtqflowError(Exception):
    """A user error: its message says what is wrong and what to do; no traceback is shown."""


@contextmanager
def disk_full_is(message: str) -> Iterator[None]:
    """Turn "no space left on device" into a PtqflowError saying `message`."""
    try:
        yield
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise PtqflowError(message) from None
        raise
