"""The search's user errors (exit code 2 with one message)."""

from __future__ import annotations

from prefsculpt.core.errors import UserError


class SearchInputError(UserError):
    """The search's inputs (audit run, decisions, storage, sampler) are missing or inconsistent."""
