"""The tiny study end to end: `moegrok run configs/tiny.yaml` writes every artifact, and rerunning resumes."""
from __future__ import annotations

from pathlib import Path

from moegrok import RunDir
from moegrok.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


def test_tiny_study_end_to_end(tmp_path):
    run_dir = tmp_path / "study"
    args = ["run", str(TINY), "--run-dir", str(run_dir), "--no-progress", "train.tensorboard=false"]
    assert main(args) == 0
    rd = RunDir(run_dir)
    assert rd.finished and len(rd.steps) == 4
    for f in ["report.md", "figures/training.png", "analysis/report.md", "analysis/correlations.md",
              "analysis/metrics.csv", "analysis/lag.csv", "theory/theory.md"]:
        assert (run_dir / f).stat().st_size > 0, f
    report = (run_dir / "report.md").read_text()
    assert "## Analysis" in report and "## Theory" in report and "nan" not in report.lower().replace("n/a", "")
    # every image the report links to exists
    import re

    for link in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report):
        assert (run_dir / link).exists(), link
    # the method the report cites is a link that resolves, also inside the embedded analysis report
    methods = [m for m in re.findall(r"\]\(([^)]*METHOD\.md)\)", report)]
    assert len(methods) >= 2 and all((run_dir / m).resolve() == (run_dir / "METHOD.md").resolve() for m in methods)
    assert (run_dir / "METHOD.md").read_text() == (ROOT / "docs" / "METHOD.md").read_text()
    assert "## Late, sharp transitions" in report
    first = (run_dir / "records" / "step_000000030" / "probe.npz").stat().st_mtime_ns
    assert main(args) == 0  # resumes: training is complete, nothing is retrained
    assert (run_dir / "records" / "step_000000030" / "probe.npz").stat().st_mtime_ns == first
