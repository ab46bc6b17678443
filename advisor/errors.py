"""User-facing errors: the one line a user sees when their input is wrong.

Every message says what was expected, what came, and how to fix it. The CLI prints it
without a traceback and exits with status 2; the Python API raises it as is.
"""

from __future__ import annotations


class AdvisorError(Exception):
    """Bad input or a state the user must fix; the message is the whole story."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message ("" when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
