"""`moegrok plan`: parameter counts against the built model, the FLOP count against a hand count, the expert and
attention paths per platform, and the train step lowered for CUDA from this CPU host without `ragged_dot`."""
from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from moegrok.cli import main
from moegrok.model.config import MoeConfig
from moegrok.model.layers import attention_impl_for
from moegrok.model.model import MoeLM
from moegrok.model.moe import expert_impl_for, tokamax_available
from moegrok.plan import flops_per_token, parameter_counts

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
            num_experts=4, num_experts_per_tok=2, eos_token_id=None, pad_token_id=0)


@pytest.mark.parametrize("extra", [{}, {"num_key_value_heads": 1}, {"tie_word_embeddings": True},
                                   {"position_embedding": "learned", "qk_norm": False,
                                    "max_position_embeddings": 40},
                                   {"qkv_bias": True, "qk_norm_per_head": True, "router": "sigmoid",
                                    "shared_expert_intermediate_size": 24, "shared_expert_gate": True,
                                    "dense_layers": [0], "dense_intermediate_size": 48}])
def test_parameter_count_equals_the_built_model(extra):
    cfg = MoeConfig(**TINY, **extra)
    built = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(nnx.eval_shape(lambda: MoeLM(cfg)),
                                                                          nnx.Param)))
    assert parameter_counts(cfg)["total"] == built


def test_flops_match_a_hand_count():
    cfg = MoeConfig(**TINY)
    # per layer: q, k, v, o = 4 x 32 x 32; router 32 x 4; two of four experts, each gate + up + down = 3 x 32 x 32
    per_layer = 4 * 32 * 32 + 32 * 4 + 2 * 3 * 32 * 32
    active = 3 * per_layer + 32 * 128  # + the LM head
    assert parameter_counts(cfg)["active"] == active == 35200
    T = 48
    assert flops_per_token(cfg, T) == 6 * 35200 + 12 * 3 * T * (2 * 16)


def test_paths_per_platform():
    assert expert_impl_for("auto", "cpu") == "ragged"  # the tiled grouped matmul on CPU
    assert expert_impl_for("auto", "tpu") == "ragged_dot"
    assert expert_impl_for("auto", "cuda") == ("tokamax" if tokamax_available() else "blocked")
    assert expert_impl_for("ragged", "cuda") == "ragged"  # an explicit choice is kept
    assert attention_impl_for("auto", "cuda", "bfloat16") == "cudnn"
    assert attention_impl_for("auto", "cuda", "float32") == "einsum"
    assert attention_impl_for("auto", "cpu", "bfloat16") == "einsum"


def test_plan_lowers_for_cuda_without_ragged_dot(tmp_path, capsys):
    hlo = tmp_path / "step.hlo"
    assert main(["plan", str(ROOT / "configs" / "gpu.yaml"), "--platform", "cuda", "--hlo", str(hlo),
                 "model.num_hidden_layers=2", "model.dtype=bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "expert path" in out and ("blocked" in out or "tokamax" in out) and "cudnn" in out
    text = hlo.read_text()
    assert "ragged_dot" not in text and "stablehlo.dot_general" in text
    # the router's logits at full precision (forward and both backward dots, per layer)
    assert text.count("HIGHEST, HIGHEST") >= 2 * 3
    forced = tmp_path / "forced.hlo"
    assert main(["plan", str(ROOT / "configs" / "gpu.yaml"), "--platform", "cuda", "--hlo", str(forced),
                 "model.num_hidden_layers=2", "model.moe_impl=ragged"]) == 0
    assert "ragged_dot" in forced.read_text()  # the check above can fail


def test_plan_refuses_bad_values(tmp_path, capsys):
    assert main(["plan", str(ROOT / "configs" / "tiny.yaml"), "model.moe_impl=fast"]) == 1
    assert "moe_impl" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_builds(name, capsys):
    """Every config in configs/ parses and validates (model, data, train, analysis sections) and has a plan."""
    assert main(["plan", str(ROOT / "configs" / name), "--platform", "cpu"]) == 0
    assert "model FLOPs per training step" in capsys.readouterr().out
