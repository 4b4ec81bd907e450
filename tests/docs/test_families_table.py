"""The README's table of supported model families against models.model.SUPPORTED_MODEL_TYPES."""

from __future__ import annotations

from models.model import SUPPORTED_MODEL_TYPES
from tests.docs.test_readme import section, table_rows


def test_family_table_lists_exactly_the_supported_model_types():
    rows = table_rows(section("Supported model families"))
    listed = [row[1].strip("`") for row in rows]
    assert sorted(listed) == sorted(SUPPORTED_MODEL_TYPES)
    assert len(listed) == len(set(listed))
