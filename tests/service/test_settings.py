"""The one Settings object and its documentation stay in step."""

from __future__ import annotations

import re

from service.settings import Settings
from tests.conftest import REPO

SCRIPT_ONLY = {"HOST", "PORT"}  # read by ./scripts/serve and python -m service, not Settings


def test_env_example_and_the_readme_list_every_setting():
    fields = {name.upper() for name in Settings.model_fields}
    example = set(re.findall(r"^([A-Z_]+)=", (REPO / ".env.example").read_text(), re.MULTILINE))
    assert example == fields | SCRIPT_ONLY
    readme = (REPO / "README.md").read_text()
    assert not [name for name in fields if f"`{name}`" not in readme]
