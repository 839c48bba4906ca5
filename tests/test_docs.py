"""docs/reliability.md names the test behind each case (every one it names must exist) and counts its cases."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_named_in_reliability_md_exists():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`((?:tests/[\w/]+\.py|test_faults))::(\w+)", doc)
    assert len(named) >= 30
    for module, name in named:
        path = ROOT / "tests" / "test_faults.py" if module == "test_faults" else ROOT / module
        assert re.search(rf"^def {name}\(", path.read_text(), re.M), f"{module}::{name}"


def test_reliability_md_counts_its_cases():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    numbers = sorted(int(n) for n in re.findall(r"^\| (\d+) \|", doc, re.M))
    assert numbers == list(range(1, len(numbers) + 1))  # each case once, none skipped
    assert f"**Tried: {len(numbers)} cases, passed: {len(numbers)}.**" in doc
