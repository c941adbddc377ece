"""The README's config reference lists every key the code accepts, with its default."""

from __future__ import annotations

from pathlib import Path

from common.config import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_documents_every_config_key() -> None:
    text = README.read_text()
    missing = [key for key, default, _ in config_reference() if f"| `{key}` | `{default}` |" not in text]
    assert not missing, f"README config reference lacks or misstates: {missing}"


def test_readme_documents_every_policy_key_and_its_example_is_valid() -> None:
    import re

    import yaml

    from common.policy import build_policy, policy_reference

    text = README.read_text()
    section = text[text.index("## Hospital policy"):text.index("## Configs")]
    missing = [key for key, default, _ in policy_reference() if f"| `{key}` | `{default}` |" not in section]
    assert not missing, f"README policy reference lacks or misstates: {missing}"
    example = re.search(r"```yaml\n(hospital: .*?)```", section, re.S)
    assert example is not None
    policy = build_policy(yaml.safe_load(example.group(1)), source="README example")
    assert policy.hospital == "H1" and not policy.answers.fedavg_weights
