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


class PolicyError(ConfigError):
    """A hospital's policy file is missing or invalid; the message lists every problem."""


class DataError(MedkdError, ValueError):
    """A data set is missing, corrupt or not in the expected format."""


class PayloadError(MedkdError, ValueError):
    """A query or a reply does not match the payload contract.

    ``field`` names the part of the message that is wrong (``outputs``,
    ``metrics.val_auc``, ``query.temperature``, ...) and ``hospital`` the
    sender or receiver, where known. ``reason`` is the text without the
    hospital, as it goes into a round's ``rejected`` table.
    """

    def __init__(self, problem: str, *, field: str | None = None, hospital: str | None = None) -> None:
        self.problem = problem
        self.field = field
        self.hospital = hospital
        self.reason = f"{field}: {problem}" if field else problem
        super().__init__(f"hospital {hospital}: {self.reason}" if hospital else self.reason)

    def naming(self, hospital: str) -> PayloadError:
        """The same error, naming ``hospital``."""
        return type(self)(self.problem, field=self.field, hospital=hospital)


class PolicyRefusal(PayloadError):
    """A request the hospital's own policy does not allow; ``field`` is the policy key."""

    def __init__(self, problem: str, *, field: str | None = None, hospital: str | None = None) -> None:
        super().__init__(problem, field=f"policy {field}" if field and not field.startswith("policy ") else field,
                         hospital=hospital)
