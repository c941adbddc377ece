"""How every ``medkd`` command turns the project's errors into exit codes (one place for all of its CLIs)."""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import ConfigError, MedkdError

__all__ = ["guarded"]


def guarded(command: Callable[[], int], *, config_exit: int | None = 2) -> int:
    """Run ``command``; a config problem prints its report and exits ``config_exit`` (None: like any other
    error), any other medkd error prints "medkd: error: ..." and exits 1."""
    try:
        return command()
    except ConfigError as e:
        if config_exit is None:
            sys.stderr.write(f"medkd: error: {e}\n")
            return 1
        sys.stderr.write(f"{e}\n")
        return config_exit
    except MedkdError as e:
        sys.stderr.write(f"medkd: error: {e}\n")
        return 1
