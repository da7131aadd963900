"""Every JAX family against transformers (the reference): tiny random models with non-default settings, saved with
`save_pretrained`, loaded with `moegrok.load_hf`; logits, router logits and the chosen experts compared, then written
back with `save_hf` and loaded by transformers again."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from moegrok.convert.hf import load_hf, save_hf
from moegrok.errors import MoegrokError
from moegrok.families import FAMILIES, config_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

V = 61
SMALL = dict(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             pad_token_id=0, eos_token_id=1, bos_token_id=2)
# One case per setting the acceptance names: GQA everywhere, renormalisation on and off, shared experts (gated and
# not), dense first layers, decoder_sparse_step 2, qkv bias, group-limited routing with a non-zero correction bias.
CASES = {
    "olmoe": ("OlmoeConfig", dict(intermediate_size=24, num_experts=6, num_experts_per_tok=2, clip_qkv=0.9)),
    "olmoe_renorm_tied": ("OlmoeConfig", dict(intermediate_size=24, num_experts=4, num_experts_per_tok=2,
                                              norm_topk_prob=True, tie_word_embeddings=True)),
    "mixtral_window": ("MixtralConfig", dict(intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                             sliding_window=4, rope_parameters={"rope_type": "default",
                                                                                "rope_theta": 500.0})),
    "qwen2_moe_sparse_step": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24,
                                                     shared_expert_intermediate_size=16, num_experts=6,
                                                     num_experts_per_tok=2, decoder_sparse_step=2)),
    "qwen2_moe_renorm": ("Qwen2MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24, qkv_bias=True,
                                                shared_expert_intermediate_size=8, num_experts=4,
                                                num_experts_per_tok=3, norm_topk_prob=True, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(intermediate_size=40, moe_intermediate_size=24, num_experts=8,
                                         num_experts_per_tok=2, norm_topk_prob=True, mlp_only_layers=[0],
                                         head_dim=16)),
    "glm4_moe_groups": ("Glm4MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=8,
                                              num_experts_per_tok=3, n_group=4, topk_group=2,
                                              first_k_dense_replace=1, n_shared_experts=2, attention_bias=True,
                                              use_qk_norm=True, routed_scaling_factor=2.5)),
    "glm4_moe_plain": ("Glm4MoeConfig", dict(intermediate_size=40, moe_intermediate_size=16, n_routed_experts=4,
                                             num_experts_per_tok=2, first_k_dense_replace=0, n_shared_experts=1,
                                             norm_topk_prob=False,
                                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                              "partial_rotary_factor": 1.0})),
}


def build(case: str, tmp_path):
    cls, kw = CASES[case]
    torch.manual_seed(sum(map(ord, case)))
    model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**SMALL, **kw)).eval()
    with torch.no_grad():  # larger than the init scale so routing and attention are far from uniform
        for p in model.parameters():
            p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.3)  # a bias that changes which experts win
    path = tmp_path / case
    model.save_pretrained(path)
    return model, path


def tokens():
    ids = np.random.RandomState(1).randint(3, V, size=(3, 11))
    mask = np.ones_like(ids, bool)
    mask[1, 7:] = False  # right padding
    ids[~mask] = 0
    return ids, mask


def hf_routing(model, ids, mask):
    """transformers' logits, router logits and the experts its routers chose (hooked on the router modules, which
    return (logits, weights, indices))."""
    chosen = []
    hooks = [m.register_forward_hook(lambda mod, a, out: chosen.append(out[2].numpy()))
             for name, m in model.named_modules() if name.endswith(("mlp.gate", "block_sparse_moe.gate"))
             and not isinstance(m, torch.nn.Linear)]
    try:
        with torch.no_grad():
            out = model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                        output_router_logits=True)
    finally:
        for h in hooks:
            h.remove()
    B, T = ids.shape
    router = np.stack([r.float().numpy().reshape(B, T, -1) for r in out.router_logits])
    return out.logits.numpy(), router, np.stack(chosen).reshape(len(chosen), B, T, -1)


@pytest.mark.parametrize("case", sorted(CASES))
def test_family_matches_transformers(case, tmp_path):
    hf, path = build(case, tmp_path)
    ids, mask = tokens()
    ref_logits, ref_router, ref_ids = hf_routing(hf, ids, mask)
    model = load_hf(path)
    assert model.cfg.family == hf.config.model_type
    out = model(jnp.asarray(ids), jnp.asarray(mask))
    logits, router = np.asarray(out.logits), np.asarray(out.router_logits)
    assert router.shape == ref_router.shape  # MoE layers only
    np.testing.assert_allclose(logits[mask], ref_logits[mask], atol=1e-4, rtol=0)
    np.testing.assert_allclose(router[:, mask], ref_router[:, mask], atol=1e-5, rtol=0)

    # The experts the model chose: the same set per real token wherever the choice is not a near tie.
    g, topw, topi = (np.asarray(a) for a in model.routing(out.router_logits))
    k = topi.shape[-1]
    if model.cfg.router == "sigmoid":
        score = 1 / (1 + np.exp(-router)) + np.stack([np.asarray(lyr.moe.selection_bias[...])
                                                       for lyr in model.layers if lyr.moe is not None])[:, None, None]
    else:
        score = router
    srt = np.sort(score, axis=-1)[..., ::-1]
    untied = (srt[..., k - 1] - srt[..., k] > 1e-5) & mask[None]
    assert untied.mean() > 0.8
    np.testing.assert_array_equal(np.sort(topi, -1)[untied], np.sort(ref_ids, -1)[untied])
    # g is the routing distribution: softmax, or normalised sigmoid scores, of the pre-activation logits.
    expect_g = (np.exp(router) if model.cfg.router == "softmax" else 1 / (1 + np.exp(-router)))
    expect_g = expect_g / expect_g.sum(-1, keepdims=True)
    np.testing.assert_allclose(g, expect_g, atol=1e-6)
    np.testing.assert_allclose(topw, np.take_along_axis(expect_g, topi, -1), atol=1e-6)
    assert (np.diff(topw, axis=-1) <= 1e-7).all()  # ordered by g, descending

    # Written back: transformers loads it and computes the same logits.
    out_dir = save_hf(model, tmp_path / "saved")
    assert json.loads((out_dir / "config.json").read_text())["architectures"] == [type(hf).__name__]
    again = transformers.AutoModelForCausalLM.from_pretrained(out_dir).eval()
    with torch.no_grad():
        logits2 = again(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(logits2[mask], ref_logits[mask], atol=1e-5, rtol=0)
    assert config_from_hf(again.config.to_dict()) == model.cfg.replace(moe_impl="auto")


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_family_defaults_are_the_config_class_defaults(model_type):
    """Loading reads config.json without transformers; what it assumes for omitted keys must be the class's."""
    import dataclasses

    fam = FAMILIES[model_type]
    cls = getattr(transformers, fam.hf_config_class)
    declared = {f.name: f.default for f in dataclasses.fields(cls)}  # before __post_init__ normalises them
    for key, value in fam.defaults.items():
        assert declared[key] == value, (model_type, key)
    # A config.json that omits keys means the class's defaults: the same model config either way. (Shapes set:
    # GLM's class defaults, 96 heads on 4096, give an odd rotary width no model uses.)
    shape = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2)
    assert config_from_hf({"model_type": model_type, **shape}) == config_from_hf(cls(**shape).to_dict())


REFUSALS = {
    "rope scaling": ("mixtral", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}),
                     r"config\.json: rope_type 'yarn' is not supported"),
    "activation": ("qwen3_moe", dict(hidden_act="gelu"), r"config\.json: hidden_act 'gelu' is not supported"),
    "qwen3 output bias": ("qwen3_moe", dict(attention_bias=True), r"config\.json: attention_bias=True is not "
                                                                  r"supported"),
    "qwen2 windows": ("qwen2_moe", dict(use_sliding_window=True), r"use_sliding_window=True is not supported"),
    "groups": ("glm4_moe", dict(n_routed_experts=8, n_group=3), r"field 'n_group' \(3\) must divide num_experts"),
    "all dense": ("glm4_moe", dict(num_hidden_layers=2, first_k_dense_replace=2), r"dense_layers.*leaves no MoE"),
}


@pytest.mark.parametrize("name", sorted(REFUSALS))
def test_unsupported_settings_are_refused_by_name(name):
    model_type, kw, msg = REFUSALS[name]
    with pytest.raises(MoegrokError, match=msg):
        config_from_hf({"model_type": model_type, "hidden_size": 64, "num_attention_heads": 4,
                        "num_key_value_heads": 2, **kw}, "config.json")


def test_switches_a_family_lacks_are_refused_on_save(tmp_path):
    from moegrok.model.config import MoeConfig
    from moegrok.model.model import MoeLM

    model = MoeLM(MoeConfig(family="mixtral", qk_norm=False, norm_topk_prob=True, qkv_bias=True))
    with pytest.raises(MoegrokError, match=r"qkv_bias=True \(the family needs False\) has no Hugging Face Mixtral"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()
