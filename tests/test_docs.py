"""The documentation is checked: README stays short, every relative link and #anchor resolves, the configuration
reference matches the config dataclasses, and every shell command in README and docs/ runs.

Commands run as shown, from a temporary directory that links the repository's configs/, train/ and analysis/, with
the substitutions of SUBSTITUTIONS where the real command takes minutes or hours, in order per page (one bash per
page, so a page's later commands see what its earlier ones wrote). One tiny run of the main job is shared by every
page (`runs/default`), a command shown on several pages runs once, and the trainings share one XLA compilation
cache. SKIPPED lists the commands that cannot run here, each with its reason."""
from __future__ import annotations

import re
import shlex
import socket
import subprocess
from pathlib import Path

import pytest

from docs_check import (PAGES, ROOT, SHRINK, TRAINING, anchors, broken_links, compile_cache_env, config_reference,
                        fenced_blocks, reference_in_page, rel, shell_commands, slug)

MAIN_JOB = "moegrok run configs/default.yaml --run-dir runs/default train.mesh_data=2"

# (pattern, replacement, why), applied in order to each command (trailing `# comments` removed first).
SUBSTITUTIONS = [
    (r"configs/default\.yaml", "configs/tiny.yaml", "the same pipeline at CI size"),
    (r"\bmoegrok (run|train) (configs/\S+)", rf"moegrok \1 \2 {SHRINK}", "few steps"),
    (r"^(moegrok run .*?) train\.mesh_data=2", r"\1",
     "one device, so every training compiles the same programs (the compilation cache serves them)"),
    (r"@4500\b", "@8", "fork at a checkpoint the shrunk run has"),
    (r"^python train/sweep\.py", "python train/sweep.py --dry-run",
     "a sweep takes hours: the plan and every run's config are checked (tests/test_sweep.py trains a tiny sweep)"),
    (r"^(moegrok theory synthetic .*)$",
     r"\1 --seeds 2 --train-seeds 0 --n 10 --n-test 5 --width 8 --alphas 0,1 --temperatures 1 --quiet",
     "the synthetic check at test size (7 minutes at its defaults)"),
    (r"/tmp/", "", "files go to the temporary directory"),
    (r"127\.0\.0\.1:12355", "127.0.0.1:{port}", "a free port"),
    (r"^python -m pip install -e '\.\[(test|torch)\]'$",
     r"python -m pip install --dry-run --no-deps --no-index --no-build-isolation -e '{root}[\1]'",
     "builds the editable install's metadata and installs nothing"),
    (r"^python -m pytest -q$", "python -m pytest -q --collect-only {root}/tests/test_imports.py",
     "the suite cannot run inside itself: pytest loads with the project's settings"),
]
# Substring of a command as shown -> why it cannot run here.
SKIPPED = {
    "ckpts/": "needs checkpoints downloaded from the Hugging Face Hub (ckpts/)",
    "moegrok analyze runs/olmoe": "reads the run directory made from the downloaded checkpoints",
    "pip install -e '.[gpu]'": "needs an NVIDIA GPU (CUDA JAX and tokamax wheels)",
}
# The sweeps run --dry-run; the directories they would fill hold the shared run under the sweep's first run name,
# so the commands that read a sweep (the benchmark, the metrics study) run on it.
SWEEP_RUNS = {"sweep": "weight_decay3.0_s0", "study": "default_s0"}
# What a page's commands must leave behind (README's claims about the main job; the loop of `&` processes, whose
# exit status `wait` does not report).
PRODUCES = {
    "README.md": ["runs/default/report.md", "runs/default/figures/training.png", "runs/default/analysis/report.md",
                  "runs/default/theory/theory.md", "runs/default/tb", "runs/default/METHOD.md", "step.hlo"],
    "docs/scaling.md": ["runs/tiny_2p/records/step_000000012/probe.npz"],
    "docs/training.md": ["runs/lr3e-4/records/step_000000012", "runs/default_wd6/records/step_000000012",
                         "runs/default_hf/config.json"],
}


def page_commands(page: Path) -> list[str]:
    return [c for block in fenced_blocks(page.read_text(encoding="utf-8"), "bash") for c in shell_commands(block)]


COMMANDS = {rel(p): page_commands(p) for p in PAGES}
RUN_PAGES = [p for p, cmds in COMMANDS.items() if cmds]


def skip_reason(command: str) -> str | None:
    return next((why for key, why in SKIPPED.items() if key in command), None)


def substitute(command: str, port: int = 0) -> str:
    command = re.sub(r"[ \t]+#[^\n]*", "", command)
    for pattern, replacement, _ in SUBSTITUTIONS:
        command = re.sub(pattern, replacement, command)
    return command.replace("{port}", str(port)).replace("{root}", str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Shell:
    """One bash per page in a shared workspace; remembers what ran, so a command shown twice runs once."""

    def __init__(self, workspace: Path, env: dict[str, str]):
        self.workspace, self.env, self.done = workspace, env, set()

    def run(self, label: str, commands: list[str]) -> None:
        todo = [c for c in commands if c not in self.done]
        script = ["set -euo pipefail"] + [f"printf '%s\\n' {shlex.quote('$ ' + c)}\n{c}" for c in todo]
        r = subprocess.run(["bash", "-c", "\n".join(script)], cwd=self.workspace, env=self.env, capture_output=True,
                           text=True, timeout=900)
        if r.returncode != 0:
            failed = [ln for ln in r.stdout.splitlines() if ln.startswith("$ ")][-1:]
            pytest.fail(f"{label}: {failed} exited {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-4000:]}")
        self.done.update(todo)


@pytest.fixture(scope="module")
def shell(tmp_path_factory):
    ws = tmp_path_factory.mktemp("docs")
    for d in ("configs", "train", "analysis"):
        (ws / d).symlink_to(ROOT / d)
    sh = Shell(ws, compile_cache_env(tmp_path_factory))
    sh.run("the main job", [substitute(MAIN_JOB)])
    for sweep, first_run in SWEEP_RUNS.items():
        (ws / "runs" / sweep).mkdir(parents=True)
        (ws / "runs" / sweep / first_run).symlink_to(ws / "runs" / "default")
    return sh


# ---------------------------------------------------------------------------------------------------------------
# Commands

@pytest.mark.parametrize("page", RUN_PAGES)
def test_shell_commands_run(shell, page):
    port = _free_port()
    shell.run(page, [substitute(c, port) for c in COMMANDS[page] if not skip_reason(c)])
    for path in PRODUCES.get(page, []):
        assert (shell.workspace / path).exists(), f"{page}: the commands did not write {path}"


SKIPPED_COMMANDS = sorted({c for cmds in COMMANDS.values() for c in cmds if skip_reason(c)})


@pytest.mark.parametrize("command", SKIPPED_COMMANDS)
def test_command_that_cannot_run_here(command):
    pytest.skip(f"{skip_reason(command)}: {command}")


def test_substitutions_and_skips_are_in_use():
    """Every entry of the tables above still matches a command, and the main job is README's."""
    shown = [c for cmds in COMMANDS.values() for c in cmds]
    assert MAIN_JOB in COMMANDS["README.md"]
    for key in SKIPPED:
        assert any(key in c for c in shown), f"SKIPPED entry {key!r} matches no command"
    runnable = [re.sub(r"[ \t]+#[^\n]*", "", c) for c in shown if not skip_reason(c)]
    for pattern, _, why in SUBSTITUTIONS:
        assert any(re.search(pattern, c) for c in runnable), f"substitution {pattern!r} ({why}) matches no command"


# ---------------------------------------------------------------------------------------------------------------
# README, links, reference

def test_readme_is_short():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 200


def test_setup_commands_are_what_ci_runs():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("python ")]
    assert COMMANDS["README.md"][:2] == ci


def test_docs_pages_start_with_their_command():
    for page in PAGES[1:]:
        if page.name == "METHOD.md":  # the method is cited as it is
            continue
        first = page.read_text(encoding="utf-8").split("\n\n")[1]
        assert first.startswith("```"), f"{rel(page)} does not start with the command it documents"


@pytest.mark.parametrize("page", [rel(p) for p in PAGES])
def test_links_resolve(page):
    assert broken_links((ROOT / page).read_text(encoding="utf-8"), ROOT / page) == []


def test_link_checker_finds_broken_links():
    page = ROOT / "docs" / "example.md"
    good = ("# Title\n\n## Run a study\n\nSee [the method](METHOD.md#1-the-claim-being-tested), "
            "[below](#run-a-study), [README](../README.md) and [the web](https://example.org/x#y).\n")
    assert broken_links(good, page) == []
    bad = ("# Title\n\n[gone](missing.md), [no anchor](METHOD.md#no-such-section), [self](#nowhere), "
           "![image](../analysis/results/none.png)\n\n```bash\n[in code](not-checked.md)\n```\n")
    errors = broken_links(bad, page)
    assert len(errors) == 4, errors
    assert any("missing.md" in e for e in errors) and any("#no-such-section" in e for e in errors)
    assert any("#nowhere" in e for e in errors) and any("none.png" in e for e in errors)


def test_anchor_slugs_follow_github():
    assert slug("The main job: the default study on CPU") == "the-main-job-the-default-study-on-cpu"
    assert slug("9. Transitions: late, sharp (`moegrok.analysis.transition`)") == \
        "9-transitions-late-sharp-moegrokanalysistransition"
    assert anchors("# A\n## A\n## A\n") == {"a", "a-1", "a-2"}


def test_config_reference_matches_the_code():
    page = reference_in_page(TRAINING.read_text(encoding="utf-8"))
    assert page == config_reference().strip("\n"), \
        "docs/training.md's configuration reference is out of date: run `python tests/docs_check.py`"
