"""The documents users read name the same error codes as the code."""
import re
from pathlib import Path

import pytest

from piqa_core.errors import ERROR_CODES

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("doc", ["README.md", "docs/output_schema.md"])
def test_documented_error_codes_match_the_code(doc: str) -> None:
    text = (ROOT / doc).read_text()
    found = re.search(r"`error_code`[^`]*`([a-z_,\s]+)`", text)
    assert found, f"{doc} no longer lists the error codes after `error_code`"
    listed = [c.strip() for c in found.group(1).split(",")]
    assert sorted(listed) == sorted(ERROR_CODES), doc
