"""The Python examples of README and docs/ run as written (those that need downloaded OLMoE checkpoints are skipped)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [(page.relative_to(ROOT).as_posix(), i, code) for page in PAGES
          for i, code in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S))]


def test_docs_have_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("page,i,code", BLOCKS, ids=[f"{page}-{i}" for page, i, _ in BLOCKS])
def test_python_example_runs(page, i, code):
    if "ckpts/" in code:
        pytest.skip("needs a downloaded OLMoE checkpoint")
    from moegrok.analysis import indicators

    before = set(indicators.REGISTRY)
    try:
        exec(compile(code, f"{page} python block {i}", "exec"), {})
    finally:
        for name in set(indicators.REGISTRY) - before:
            indicators.unregister(name)
