"""Numbers in config files and `key=value` overrides read as people write them (`3e-4`, not YAML 1.1's `3.0e-4`),
and a value of the wrong type refused with one line naming the dotted key, from every entry point."""
from __future__ import annotations

import importlib.util
import inspect
import itertools
import json
import math
from pathlib import Path

import pytest

from moegrok.cli import main
from moegrok.config_values import check_fields, dump_yaml, load_yaml
from moegrok.errors import MoegrokError
from moegrok.model.config import MoeConfig
from moegrok.training.config import TrainConfig, apply_overrides, load_config_file

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
LR_ABC = "train.learning_rate: expected a number, got 'abc'"


def _read_both_ways(text: str):
    """The value as a config file and as an override read it (they must agree)."""
    from_file = load_yaml(f"x: {text}")["x"]
    from_override = apply_overrides({}, [f"s.x={text}"])["s"]["x"]
    assert type(from_file) is type(from_override) and (from_file == from_override or from_file != from_file)
    return from_file


def test_decimal_spellings_read_as_python_reads_them():
    signs = ["", "+", "-"]
    mantissas = ["0", "7", "010", "1_000", ".5", "5.", "3.25", "1_0.2_5", "0.0"]
    exponents = ["", "e5", "E5", "e-4", "e+3", "E-0_1", "e0"]
    for sign, mant, exp in itertools.product(signs, mantissas, exponents):
        text = sign + mant + exp
        want = float(text) if "." in mant or exp else int(text)
        got = _read_both_ways(text)
        assert type(got) is type(want) and got == want, text


@pytest.mark.parametrize("text", ["0x10", "0X1f", "-0x_ff", "0o17", "+0b101"])
def test_prefixed_integers_read_as_int_base_0(text):
    got = _read_both_ways(text)
    assert type(got) is int and got == int(text, 0)


def test_yaml_infinities_and_nan_are_floats():
    assert _read_both_ways(".inf") == math.inf and _read_both_ways("-.inf") == -math.inf
    assert math.isnan(_read_both_ways(".nan"))


@pytest.mark.parametrize("text", ["1:30", "1__0", "1_", "_1", "1_.5", "1e", "e5", ".", "1.2.3", "0x", "0x1g", "--1",
                                  "inf", "nan", "1e5x", "'3e-4'", '"1E5"', "'7'"])
def test_other_spellings_and_quoted_numbers_stay_strings(text):
    assert isinstance(_read_both_ways(text), str)


def test_a_dump_reads_back_equal():
    data = {"s": ["3e-4", "1_0", "010", ".5", "1:30"], "n": [3e-4, 1e-8, 1e20, 10, -2.5, math.inf]}
    assert load_yaml(dump_yaml(data)) == data


def test_config_file_numbers(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  learning_rate: 1e-3\n  max_steps: 1e3\n  clip_norm: 2\ndata:\n  num_steps: 2E2\n")
    from moegrok.training.train import RunConfig

    run = RunConfig.from_dict(load_config_file(cfg))
    assert run.train.learning_rate == 0.001 and type(run.train.learning_rate) is float
    assert (run.train.max_steps, run.data.num_steps) == (1000, 200) and type(run.train.max_steps) is int
    assert run.train.clip_norm == 2.0 and type(run.train.clip_norm) is float


@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", "abc", "train.learning_rate: expected a number, got 'abc'"),
    ("learning_rate", True, "train.learning_rate: expected a number, got True"),
    ("learning_rate", math.nan, "train.learning_rate: expected a finite number, got nan"),
    ("warmup_steps", 2.5, "train.warmup_steps: expected an integer, got 2.5"),
    ("max_steps", "10", "train.max_steps: expected an integer or null, got '10'"),
    ("tensorboard", "maybe", "train.tensorboard: expected true or false, got 'maybe'"),
])
def test_wrong_types_are_refused_by_the_dataclass(field, value, message):
    with pytest.raises(MoegrokError) as e:
        TrainConfig(**{field: value})
    assert str(e.value) == message


def test_numbers_are_stored_as_their_fields_type():
    cfg = TrainConfig(learning_rate=1, warmup_steps=1e2, max_steps=None)
    assert (cfg.learning_rate, cfg.warmup_steps, cfg.max_steps) == (1.0, 100, None)
    assert type(cfg.learning_rate) is float and type(cfg.warmup_steps) is int


def _cli(capsys, *argv) -> str:
    """Run `moegrok ARGV`, expect a refusal, return its one stderr line."""
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err.strip()


@pytest.mark.parametrize("override, message", [
    ("train.learning_rate=abc", LR_ABC),
    ("train.max_steps=2.5", "train.max_steps: expected an integer or null, got 2.5"),
    ("data.num_steps=true", "data.num_steps: expected an integer or null, got True"),
    ("data.domains.math.heldout_frac=x", "data.domains.math.heldout_frac: expected a number or null, got 'x'"),
    ("analysis.tau=abc", "analysis.tau: expected a number, got 'abc'"),
    ("theory.lam_rel=abc", "theory.lam_rel: expected a number, got 'abc'"),
])
def test_every_section_names_the_dotted_key(capsys, override, message):
    assert _cli(capsys, "plan", TINY, override) == f"moegrok plan: error: {message}"


@pytest.mark.skipif("check_fields" not in inspect.getsource(MoeConfig.validate),
                    reason="MoeConfig.validate does not call check_fields yet")
def test_model_section_names_the_dotted_key(capsys):
    assert _cli(capsys, "plan", TINY, "model.rope_theta=abc") == \
        "moegrok plan: error: model.rope_theta: expected a number, got 'abc'"


@pytest.mark.parametrize("command", [["train"], ["run"], ["train", "--fork", "parent@10"]])
def test_train_run_and_fork_refuse_before_writing(tmp_path, capsys, command):
    run_dir = tmp_path / "r"
    line = _cli(capsys, command[0], TINY, "--run-dir", str(run_dir), *command[1:], "train.learning_rate=abc")
    assert line == f"moegrok {command[0]}: error: {LR_ABC}"
    assert not run_dir.exists()


def test_an_override_that_is_not_yaml_is_one_line(capsys):
    assert _cli(capsys, "plan", TINY, "train.learning_rate=[1") == \
        "moegrok plan: error: override 'train.learning_rate=[1': the value is not valid YAML"


def _sweep(*argv):
    spec = importlib.util.spec_from_file_location("sweep", ROOT / "train" / "sweep.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main([TINY, *argv, "--dry-run"])


@pytest.mark.parametrize("option, run", [
    (["--knob", "train.learning_rate=3e-4,abc"], "learning_rateabc_s0"),
    (["--variant", "a:", "--variant", "b:train.learning_rate=abc"], "b_s0"),
    (["--fork", "s0@10:train.learning_rate=abc"], "s0-f10-learning_rateabc"),
])
def test_sweep_refuses_every_run_before_the_first_starts(tmp_path, capsys, option, run):
    assert _sweep("--out", str(tmp_path / "out"), *option) == 1
    out, err = capsys.readouterr()
    assert out == "" and err == f"sweep: error: run {run!r}: {LR_ABC}\n"


def test_sweep_knob_in_e_notation(tmp_path, capsys):
    assert _sweep("--out", str(tmp_path / "out"), "--knob", "train.learning_rate=3e-4,1E-3") == 0
    out = capsys.readouterr().out
    assert "[run] learning_rate3e-4_s0:" in out and "train.learning_rate=1E-3" in out


def test_train_with_an_e_notation_learning_rate(tmp_path, capsys):
    """README's example spelling trains and the optimizer gets 3e-4 (two steps of a one-layer model on one small
    domain: few shapes for XLA to compile, so this stays a few seconds)."""
    run_dir = tmp_path / "r"
    assert main(["train", TINY, "--run-dir", str(run_dir), "--no-progress", "train.learning_rate=3e-4",
                 "train.warmup_steps=0", "train.max_steps=2", "train.num_checkpoints=1", "train.log_every=1",
                 "train.tensorboard=false", "model.num_hidden_layers=1", "data.val_docs=4", "data.probe_docs=4",
                 "data.domains={math: {docs_per_step: 4, modulus: 5, test_items: 4}}"]) == 0
    assert load_yaml((run_dir / "config.yaml").read_text())["train"]["learning_rate"] == 3e-4
    lrs = [json.loads(ln)["lr"] for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if '"lr"' in ln]
    assert lrs == pytest.approx([3e-4, 3e-4])


def test_check_fields_skips_fields_that_are_not_numbers():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class C:
        name: str = "x"
        pairs: dict | None = None
        n: int | None = None

    c = C(name=3, pairs="p", n=2.0)
    check_fields(c, "c")
    assert (c.name, c.pairs, c.n) == (3, "p", 2) and type(c.n) is int
