"""The README's config reference lists every key the code accepts, with its default."""

from __future__ import annotations

from pathlib import Path

from common.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_config_key() -> None:
    text = README.read_text()
    missing = [key for key, default, _ in config_reference() if f"| `{key}` | `{default}` |" not in text]
    assert not missing, f"README config reference lacks or misstates: {missing}"
