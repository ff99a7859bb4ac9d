"""The user-error base class: bad input, config or environment, never a bug.

Every stage maps a :class:`UserError` to one message on stderr and exit code 2 (no traceback);
any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(ValueError):
    """The user's input is wrong; the message names what and how to fix it."""
