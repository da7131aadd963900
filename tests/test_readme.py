"""README's Python examples run as written (those that need downloaded OLMoE checkpoints are skipped)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("i", range(len(BLOCKS)))
def test_readme_python_example_runs(i):
    code = BLOCKS[i]
    if "ckpts/" in code:
        pytest.skip("needs a downloaded OLMoE checkpoint")
    from moegrok.analysis import indicators

    before = set(indicators.REGISTRY)
    try:
        exec(compile(code, f"README.md python block {i}", "exec"), {})
    finally:
        for name in set(indicators.REGISTRY) - before:
            indicators.unregister(name)
