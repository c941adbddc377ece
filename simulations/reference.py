"""Regenerate the README's config and policy reference tables from the code.

    python -m simulations.reference README.md

Both tables are built from the documented dataclass fields
(:func:`common.config.config_reference`, :func:`common.policy.policy_reference`);
``tests/test_docs.py`` checks that the README matches them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common.atomic import atomic_write_text
from common.config import config_reference
from common.policy import policy_reference

HEADER = "| key | default | meaning |\n|---|---|---|\n"


def table(rows: list[tuple[str, str, str]]) -> str:
    """A Markdown table of (key, default, meaning) rows; ``|`` in text is escaped."""
    return HEADER + "".join(f"| `{k}` | `{d}` | {m.replace('|', chr(92) + '|')} |\n" for k, d, m in rows)


def replace_table(text: str, first_key: str, rows: list[tuple[str, str, str]]) -> str:
    """Replace the reference table whose first row documents ``first_key``."""
    start = text.index(HEADER + f"| `{first_key}` |")
    end = text.index("\n\n", start) + 1
    return text[:start] + table(rows) + text[end:]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0] if args else "README.md")
    text = path.read_text(encoding="utf-8")
    text = replace_table(text, "hospital", policy_reference())
    text = replace_table(text, "seed", config_reference())
    atomic_write_text(path, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
