"""moegrok works outside the repository: the shipped configs are package data that `moegrok run NAME` finds from any
directory, and reports carry the method document in the run directory. The end-to-end check builds the wheel,
installs it without dependencies into a temporary target and runs `moegrok run tiny` from a temporary directory."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from docs_check import ROOT, SHRINK, compile_cache_env
from moegrok.cli import main
from moegrok.errors import MoegrokError
from moegrok.rundir import method_link
from moegrok.training.config import load_config_file, packaged_configs, resolve_config

METHOD = (ROOT / "docs" / "METHOD.md").read_text(encoding="utf-8")


def test_packaged_configs_are_the_repositorys():
    shipped = packaged_configs()
    assert sorted(shipped) == sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert all(shipped[p.stem].read_text() == p.read_text() for p in (ROOT / "configs").glob("*.yaml"))


def test_a_name_resolves_to_the_packaged_config_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config_file("tiny", ["train.learning_rate=3e-4"]) == \
        load_config_file(ROOT / "configs" / "tiny.yaml", ["train.learning_rate=3e-4"])
    (tmp_path / "tiny").write_text("train: {learning_rate: 0.5}\n")  # an existing file wins over the name
    assert resolve_config("tiny") == Path("tiny") and load_config_file("tiny")["train"]["learning_rate"] == 0.5
    with pytest.raises(MoegrokError, match="config file not found"):
        load_config_file("elsewhere/tiny.yaml")  # a path is never looked up among the packaged configs


def test_an_unknown_name_is_refused_with_the_available_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "tyni", "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "tyni: neither a config file nor a packaged config; packaged: default, gpu, grok_single, tiny" in err
    assert not (tmp_path / "r").exists()


def test_method_link_points_at_a_copy_inside_the_run_directory(tmp_path):
    run = tmp_path / "run"
    (run / "analysis").mkdir(parents=True)
    (run / "meta.json").write_text("{}")
    assert method_link(run).startswith("[METHOD.md](METHOD.md) (moegrok ")
    assert method_link(run / "analysis").startswith("[METHOD.md](../METHOD.md) (moegrok ")
    assert (run / "METHOD.md").read_text(encoding="utf-8") == METHOD and not (run / "analysis" / "METHOD.md").exists()


def _build_and_install(tmp_path: Path) -> Path:
    """The wheel of this checkout, installed without dependencies into a fresh target directory. It is built from
    a copy because pip builds in place and would leave build/ and *.egg-info in the checkout."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for d in ("moegrok", "configs", "docs"):
        shutil.copytree(ROOT / d, src / d, ignore=skip)
    for f in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(ROOT / f, src / f)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"),
                    str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("moegrok-*.whl")
    target = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)], check=True,
                   capture_output=True)
    return target


def test_the_wheel_runs_tiny_outside_the_repository_and_the_method_link_survives_a_move(tmp_path, tmp_path_factory):
    target = _build_and_install(tmp_path)
    env = {**compile_cache_env(tmp_path_factory), "PYTHONPATH": str(target)}
    work = tmp_path / "work"
    work.mkdir()

    def python(*args: str) -> str:
        r = subprocess.run([sys.executable, *args], cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
        return r.stdout

    where = json.loads(python("-c", "import json, moegrok, moegrok.configs, moegrok.docs; print(json.dumps("
                                    "[moegrok.__file__, moegrok.configs.__file__, moegrok.docs.__file__]))"))
    assert all(Path(f).is_relative_to(target) for f in where), where  # the wheel's code, not the checkout's
    python("-m", "moegrok.cli", "run", "tiny", "--run-dir", "R", "--no-progress", *SHRINK.split())
    (work / "a" / "b").mkdir(parents=True)
    shutil.move(str(work / "R"), str(work / "a" / "b" / "R2"))
    moved = work / "a" / "b" / "R2"
    links = re.findall(r"\]\(([^)]*METHOD\.md)\)", (moved / "report.md").read_text(encoding="utf-8"))
    assert len(links) >= 2  # the report's own and the embedded analysis report's
    for link in links:
        assert (moved / link).resolve().read_text(encoding="utf-8") == METHOD, link
