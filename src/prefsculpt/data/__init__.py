"""Preference pairs: schema, loaders, validation, splits, tokenisation and the built-in planted set."""

from prefsculpt.data.errors import DataSourceError, DataValidationError, RowError
from prefsculpt.data.loaders import LoadResult, load_pairs
from prefsculpt.data.schema import PreferencePair
from prefsculpt.data.splits import SPLITS, split_pairs
from prefsculpt.data.tokenize import TokenizedPair, token_stats, tokenize_pairs

__all__ = [
    "SPLITS",
    "DataSourceError",
    "DataValidationError",
    "LoadResult",
    "PreferencePair",
    "RowError",
    "TokenizedPair",
    "load_pairs",
    "split_pairs",
    "token_stats",
    "tokenize_pairs",
]
