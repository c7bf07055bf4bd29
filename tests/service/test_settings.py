"""The one Settings object: its documentation stays in step, and it refuses what it must."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from service.settings import Settings
from tests.conftest import REPO

SCRIPT_ONLY = {"HOST", "PORT"}  # read by ./scripts/serve and python -m service, not Settings


def test_env_example_and_the_readme_list_every_setting():
    fields = {name.upper() for name in Settings.model_fields}
    example = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    assert example == fields | SCRIPT_ONLY
    readme = (REPO / "README.md").read_text()
    assert not [name for name in fields if f"`{name}`" not in readme]


def _same_value(documented: str, default: object) -> bool:
    """`5` and `5.0`, `false` and False, `*(empty)*` and "" are the same default; None (found
    at start-up) is empty in .env.example and said in words, not as a `value`, in README."""
    documented = documented.strip()
    if default is None:
        return not documented.startswith("`")
    documented = documented.strip("`").replace("*(empty)*", "")
    expected = str(default).lower() if isinstance(default, bool) else str(default)
    try:
        return float(documented) == float(expected)
    except ValueError:
        return documented.lower() == expected.lower()


def test_env_example_and_the_readme_give_every_setting_its_real_default():
    example = dict(re.findall(r"^([A-Z_]+)=(.*)$", (REPO / ".env.example").read_text(), re.M))
    table = {}  # README configuration rows: | `A`, `B` | `1`, `2` | ...
    for names, values in re.findall(
        r"^\| (`[A-Z_]+`(?:, `[A-Z_]+`)*) \| ([^|]*)\|", (REPO / "README.md").read_text(), re.M
    ):
        table.update(zip(re.findall(r"`([A-Z_]+)`", names), values.split(","), strict=True))
    wrong = [
        (name.upper(), field.default, example[name.upper()], table.get(name.upper()))
        for name, field in Settings.model_fields.items()
        if not _same_value(example[name.upper()], field.default)
        or not _same_value(table.get(name.upper(), "missing"), field.default)
    ]
    assert not wrong  # (setting, default, .env.example, README)


def test_the_kubernetes_placeholder_key_refuses_to_start():
    example = (REPO / "deploy/kubernetes/base/api-keys.env.example").read_text()
    placeholder = next(
        line.split("=", 1)[1] for line in example.splitlines() if line.startswith("API_KEYS=")
    )
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(api_keys=f"real-key,{placeholder}")
    assert Settings(api_keys="real-key").api_key_set == {"real-key"}


@pytest.mark.parametrize(
    ("settings", "says"),
    [
        ({"api_keys": "s3cret-real-key,replace-me-before-deploying"}, "placeholder"),
        ({"api_key_priorities": "s3cret-real-key=abc"}, "item 1: expected key=priority"),
        ({"api_key_priorities": "other=1,s3cret-real-key=500"}, "item 2: priority 500"),
    ],
)
def test_a_refused_setting_says_why_without_printing_a_key(settings, says) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(**settings)
    assert says in str(refused.value)
    assert "s3cret-real-key" not in str(refused.value)
