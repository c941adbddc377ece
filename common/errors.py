"""The medkd error hierarchy.

Every error medkd raises on purpose subclasses :class:`MedkdError` and a
built-in exception, so callers may catch either (as Opacus does with
``UnsupportedModuleError(ValueError)``).
"""

from __future__ import annotations


class MedkdError(Exception):
    """Base class of every error raised on purpose by medkd."""


class ConfigError(MedkdError, ValueError):
    """An experiment config is invalid; the message lists every problem."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        lines = [f"medkd: {count} {noun} in {source}"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


class DataError(MedkdError, ValueError):
    """A data set is missing, corrupt or not in the expected format."""


class PayloadError(MedkdError, ValueError):
    """A query or a reply does not match the payload contract."""
