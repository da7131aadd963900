"""moegrok.torch_capture against independent references, for every MoE causal-LM family it supports.

Each family: a tiny random model built from its config (no hub), router weights scaled so logits are O(1) and
selection biases filled with random values so that they change the choice. Then one `probe_record` and:
(a) g / route_probs / topk_weights against a NumPy softmax / sigmoid-normalisation of logits recomputed from the
    router's input and weight (cross-checked with transformers' own ``output_router_logits``);
(b) topk_ids as sets against a NumPy re-implementation of the family's selection rule, and against the ids the
    experts module actually received;
(c) sample_loss against transformers' own loss (``labels=``) computed per sample;
(d) every module's train flag, the torch RNG state and the hooks are as before.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from moegrok import torch_capture as tc  # noqa: E402
from moegrok.errors import MoegrokError  # noqa: E402
from moegrok.rundir import OPTIONAL_PROBE_FIELDS, PROBE_FIELDS, validate_probe_arrays  # noqa: E402

V = 97


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and on a shared 2-core machine spinning worker threads made
    this file 4-8x slower under load (measured: 17 s with one thread vs 73 s with two while other tests ran)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

# Set where the config has the field: 3 layers, width 32, 8 experts, top-2, 4 groups of which 2 are kept.
TINY = dict(hidden_size=32, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3, num_layers=3,
            num_attention_heads=4, num_key_value_heads=4, head_dim=8, vocab_size=V, max_position_embeddings=64,
            num_experts=8, num_local_experts=8, n_routed_experts=8, moe_num_experts=8,
            num_experts_per_tok=2, moe_topk=2, top_k_experts=2, moe_top_k=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
            v_head_dim=8, shared_expert_intermediate_size=32, n_shared_experts=1, tie_word_embeddings=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclasses.dataclass(frozen=True)
class Fam:
    """How the test builds a family and what its selection rule is (NumPy reference in `_reference_choice`)."""
    model_type: str
    rule: str = "topk"  # topk | group | group0 | v2group | sig_bias | logit_bias | soft_bias
    extra: dict = dataclasses.field(default_factory=dict)
    weight: str = "weight"  # the router's [E, d] matrix, relative to the router module
    logits: str = "linear"  # how the test recomputes logits: linear | recorded (router-internal norm: gemma4)


FAMS = [
    Fam("olmoe"), Fam("flex_olmo"), Fam("mixtral"), Fam("minimax"), Fam("qwen2_moe"), Fam("qwen3_moe"),
    Fam("mellum"), Fam("lara_mini"), Fam("phimoe"), Fam("hunyuan_v1_moe", weight="wg.weight"),
    Fam("aria_text"), Fam("granitemoe"), Fam("granitemoe_swa"), Fam("granitemoeshared"), Fam("gpt_oss"),
    Fam("jamba", extra=dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1, expert_layer_offset=0)),
    Fam("cohere2_moe"), Fam("cohere2_moe", extra=dict(expert_selection_fn="sigmoid")),
    Fam("dbrx", weight="layer.weight", extra=dict(
        d_model=32, n_heads=4, n_layers=3, max_seq_len=64,
        # transformers 5.25's DBRX attention reads `rope_theta` from attn_config and cannot clamp with clip_qkv=None
        attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
        ffn_config=dict(ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2))),
    Fam("jetmoe", weight="layer.weight", extra=dict(kv_channels=8, num_key_value_heads=2)),
    Fam("llama4_text", extra=dict(interleave_moe_layer_step=1)),
    Fam("gemma4_text", logits="recorded", weight="proj.weight", extra=dict(
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32, head_dim=8,
        global_head_dim=8, hidden_size_per_layer_input=8, vocab_size_per_layer_input=V, per_layer_config={},
        layer_types=["sliding_attention", "full_attention", "full_attention"])),
    Fam("flint"),
    Fam("deepseek_v2", rule="v2group", extra=dict(topk_method="group_limited_greedy", topk_group=1)),
    Fam("deepseek_v3", rule="group"), Fam("deepseek_v32", rule="group"), Fam("glm4_moe", rule="group"),
    Fam("glm4_moe_lite", rule="group"), Fam("glm_moe_dsa", rule="group"), Fam("dots1", rule="group"),
    Fam("axk1", rule="group"), Fam("axk2", rule="group0"), Fam("exaone_moe", rule="group"),
    Fam("hy_v4", rule="group"), Fam("minicpm5_moe", rule="group"),
    Fam("mimo_v2_flash", rule="group", extra=dict(head_dim=24, num_key_value_heads=2)),  # SWA doubles kv heads
    Fam("solar_open", rule="group"),
    Fam("beam", rule="group", extra=dict(mlp_layer_types=["dense", "sparse", "sparse"])),
    Fam("afmoe", rule="sig_bias", weight="gate.weight"), Fam("ergo", rule="sig_bias", weight="linear.weight",
                                                            extra=dict(first_dense_intermediate_size=64)),
    Fam("hy_v3", rule="sig_bias"), Fam("minimax_m2", rule="sig_bias"), Fam("minimax_m3_vl_text", rule="sig_bias"),
    Fam("laguna", rule="sig_bias", extra=dict(moe_router_logit_softcapping=3.0)),
    Fam("kolibri1", rule="logit_bias"),
    Fam("kolibri1_1", rule="logit_bias", extra=dict(head_dim=16, index_num_heads=1)),
    Fam("lfm2_moe", rule="sig_bias", extra=dict(num_dense_layers=1, layer_types=["conv", "full_attention", "conv"])),
    Fam("inkling_text", rule="sig_bias", extra=dict(swa_head_dim=8)),
    Fam("inkling2_text", rule="sig_bias", extra=dict(unpadded_vocab_size=V, swa_head_dim=8)),
    Fam("deepseek_v4", rule="sig_bias", extra=dict(
        scoring_func="sigmoid", mlp_layer_types=["hash_moe", "moe", "moe"], head_dim=16, qk_rope_head_dim=8,
        o_groups=2, o_lora_rank=8, index_n_heads=2, index_head_dim=8, index_topk=4, hc_mult=2,
        num_nextn_predict_layers=0)),
    Fam("qwen3_next", extra=dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                 linear_num_value_heads=4, layer_types=["linear_attention", "full_attention",
                                                                        "full_attention"])),
    Fam("qwen3_5_moe_text", extra=dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                       linear_num_value_heads=4)),
    Fam("qwen4_exp_text", extra=dict(linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                     linear_num_value_heads=4)),
    Fam("granitemoehybrid", extra=dict(
        layer_types=["mamba", "attention", "mamba"], mamba_n_heads=4, mamba_d_head=16, mamba_d_state=8,
        mamba_chunk_size=8, shared_intermediate_size=32)),
    Fam("nemotron_h", rule="group", extra=dict(
        layers_block_type=["linear_attention", "moe", "full_attention", "moe"], mamba_num_heads=4, mamba_head_dim=16,
        ssm_state_size=8, n_groups=1, chunk_size=8, moe_shared_expert_intermediate_size=32)),
    Fam("kimi_linear", rule="group", extra=dict(
        num_experts=8, num_experts_per_token=2, num_expert_group=4, linear_head_dim=8, linear_num_heads=4,
        layer_types=["linear_attention", "full_attention", "full_attention"],
        mlp_layer_types=["dense", "sparse", "sparse"])),
    Fam("bailing_hybrid", rule="group", extra=dict(
        num_experts=8, num_experts_per_token=2, num_expert_group=4, layer_group_size=2, num_nextn_predict_layers=0,
        mlp_layer_types=["dense", "sparse", "sparse"])),
    Fam("dots3_note_text", rule="group", extra=dict(
        per_layer_config={}, index_n_heads=2, index_head_dim=8, index_topk=4, head_dim=16,
        shared_experts_intermediate_size=32, mlp_layer_types=["dense", "sparse", "sparse"])),
    Fam("ernie4_5_moe", rule="soft_bias"),
    Fam("longcat_flash", rule="soft_bias", weight="classifier.weight", extra=dict(
        num_layers=2, zero_expert_num=2, ffn_hidden_size=64, expert_ffn_hidden_size=32)),
]


def _fam_id(f: Fam) -> str:
    return f.model_type + ("-" + "-".join(f"{v}" for v in f.extra.values() if isinstance(v, str))
                           if f.model_type == "cohere2_moe" and f.extra else "")


def tiny_config(f: Fam):
    cls = CONFIG_MAPPING[f.model_type]
    known = set(cls().to_dict())
    kw = {k: v for k, v in TINY.items() if k in known}
    kw.update(f.extra)
    return cls(**kw)


def build(f: Fam):
    """The tiny model, float32, with O(1) router logits and random selection biases (so the bias changes choices)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(f), dtype=torch.float32)
    spec = tc.router_spec(model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for r in spec.routers:
            w = _get(r, f.weight)
            w.copy_(torch.randn(w.shape, generator=gen) * 2 / w.shape[1] ** 0.5)
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("e_score_correction_bias", "expert_bias")):
                t.copy_(torch.rand(t.shape, generator=gen) * 0.6 - 0.3)
            elif name.endswith("tid2eid"):  # deepseek_v4 hash routing: k distinct experts per token id
                t.copy_(torch.rand(t.shape[0], spec.num_experts, generator=gen).argsort(-1)[:, : t.shape[1]])
    return model, spec


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# --- NumPy references -------------------------------------------------------------------------------------------------

def _softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _g(kind: str, logits_NxE):
    if kind == "softmax":
        return _softmax(logits_NxE)
    s = _sigmoid(logits_NxE)
    return s / s.sum(-1, keepdims=True)


def _topk_sets(scores_NxE, k: int) -> list[set]:
    return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in scores_NxE]


def _group_mask(scores_NxE, n_group: int, topk_group: int, group_score) -> np.ndarray:
    N, E = scores_NxE.shape
    gs = group_score(scores_NxE.reshape(N, n_group, E // n_group))
    keep = np.argsort(-gs, axis=1, kind="stable")[:, :topk_group]
    mask = np.zeros((N, n_group), bool)
    np.put_along_axis(mask, keep, True, axis=1)
    return np.repeat(mask, E // n_group, axis=1)


def _reference_choice(rule: str, logits_NxE, bias, k: int, cfg) -> list[set]:
    """The family's selection rule, re-implemented from its published definition."""
    if rule == "topk":
        return _topk_sets(logits_NxE, k)
    if rule == "logit_bias":
        return _topk_sets(logits_NxE + bias, k)
    if rule == "soft_bias":
        return _topk_sets(_softmax(logits_NxE) + bias, k)
    if rule == "sig_bias":
        return _topk_sets(_sigmoid(logits_NxE) + bias, k)
    if rule in ("group", "group0"):  # DeepSeek-V3: groups ranked by the sum of their two best biased scores
        s = _sigmoid(logits_NxE) + bias
        mask = _group_mask(s, cfg.n_group, cfg.topk_group, lambda x: np.sort(x, -1)[..., -2:].sum(-1))
        return _topk_sets(np.where(mask, s, -np.inf if rule == "group" else 0.0), k)
    if rule == "v2group":  # DeepSeek-V2 group-limited greedy: groups ranked by their best softmax score
        p = _softmax(logits_NxE)
        mask = _group_mask(p, cfg.n_group, cfg.topk_group, lambda x: x.max(-1))
        return _topk_sets(np.where(mask, p, 0.0), k)
    raise AssertionError(rule)


# --- what the model did, recorded by the test's own hooks -----------------------------------------------------------

class Observed:
    """Per MoE layer: the router's input and extra call arguments, and the ids its experts module received."""

    def __init__(self, model, spec):
        self.inputs, self.call_args, self.expert_ids = [], [], []
        self.handles = []
        modules = dict(model.named_modules())
        for name, router in zip(spec.names, spec.routers, strict=True):
            parent = modules[name.rsplit(".", 1)[0]]
            self.handles.append(router.register_forward_pre_hook(self._on_router))
            experts = getattr(parent, "experts", None)
            if isinstance(experts, torch.nn.Module) and spec.family not in ("llama4_text",):
                self.handles.append(experts.register_forward_pre_hook(self._on_experts))
            elif spec.family == "jetmoe":  # its experts get tokens gathered by expert: batch_index + expert_size
                self.handles.append(router.register_forward_hook(self._on_jetmoe))
            elif spec.family == "llama4_text":  # experts get inputs scaled by the scores: non-zero = used
                self.handles.append(router.register_forward_hook(self._on_llama4))

    def _on_router(self, module, args):
        self.inputs.append(args[0].detach().float().reshape(-1, args[0].shape[-1]).numpy().astype(np.float64))
        self.call_args.append([a for a in args[1:] if isinstance(a, torch.Tensor)])

    def _on_experts(self, module, args):
        ids, w = args[1].detach().numpy(), args[2].detach().float().numpy()
        self.expert_ids.append([set(i[wi != 0].tolist()) for i, wi in zip(ids, w, strict=True)])

    def _on_jetmoe(self, module, args, out):
        _, batch_index, _, expert_size, _ = out
        experts = np.repeat(np.arange(len(expert_size)), expert_size)
        sets = [set() for _ in range(args[0].reshape(-1, args[0].shape[-1]).shape[0])]
        for t, e in zip(batch_index.tolist(), experts.tolist(), strict=True):
            sets[t].add(e)
        self.expert_ids.append(sets)

    def _on_llama4(self, module, args, out):
        self.expert_ids.append([set(np.flatnonzero(row).tolist()) for row in out[0].detach().numpy()])

    def remove(self):
        for h in self.handles:
            h.remove()


def _bias(router, call_args, E: int):
    """The selection bias: the router's own buffer, ernie's statics, or the one its MoE block passes in."""
    for path in ("e_score_correction_bias", "moe_statics.e_score_correction_bias"):
        try:
            return _get(router, path).detach().float().numpy().reshape(-1)[:E]
        except AttributeError:
            pass
    return call_args[0].detach().float().numpy().reshape(-1) if call_args else np.zeros(E)


def _recomputed_logits(f: Fam, router, h_NxD, E: int, cfg):
    W = _get(router, f.weight).detach().double().numpy()[:E]
    logits = h_NxD @ W.T
    bias = getattr(router, "bias", None)
    if isinstance(bias, torch.Tensor):  # gpt_oss: a biased router
        logits = logits + bias.detach().double().numpy()
    cap = getattr(cfg, "moe_router_logit_softcapping", 0.0) or 0.0
    if cap > 0:  # laguna
        logits = np.tanh(logits / cap) * cap
    return logits


# --- the per-family test ---------------------------------------------------------------------------------------------

def _batch():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, size=(3, 7)).astype(np.int32)
    mask = np.zeros((3, 7), bool)
    for r, n in enumerate((7, 5, 3)):
        mask[r, :n] = True
    return np.where(mask, tokens, 0), mask


def _real(per_token: list, real) -> list:
    """The entries of a per-token list at real (non-padding) tokens; the lengths must agree."""
    return [x for x, r in zip(per_token, real, strict=True) if r]


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("f", FAMS, ids=_fam_id)
def test_family(f: Fam):
    model, spec = build(f)
    cfg = model.config
    tokens, mask = _batch()
    N, T = tokens.shape
    E, k, L = spec.num_experts, spec.top_k, len(spec.routers)

    model.train()
    hooks, rng = _hook_count(model), torch.get_rng_state()
    rec = tc.probe_record(model, tokens, mask, [10, 11, 12], ["a", "b", "a"], batch_size=2)
    # (d) nothing left behind: train flags, RNG, hooks
    assert all(m.training for m in model.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert _hook_count(model) == hooks

    arrays = validate_probe_arrays(rec, f.model_type)
    assert set(rec) == set(PROBE_FIELDS)
    assert rec["route_probs"].shape == (N, L, E) and rec["topk_ids"].shape == (N, T, L, k)

    model.eval()
    obs = Observed(model, spec)
    try:
        with torch.no_grad():
            ref = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                        attention_mask=torch.as_tensor(mask, dtype=torch.long), use_cache=False,
                        output_router_logits=True)
    finally:
        obs.remove()
    assert len(obs.inputs) == L and len(obs.expert_ids) == L

    hf = list(ref.router_logits or ())
    if spec.family == "jetmoe":  # its attention (MoA) routers come first in each layer
        hf = hf[1::2]
    hashed = [type(r).__name__.endswith("HashRouter") for r in spec.routers]
    assert len(hf) == L - sum(hashed)  # transformers records the learned routers only (not deepseek_v4's hash ones)
    hf = [None if h else hf.pop(0) for h in hashed]

    real = mask.reshape(-1)
    rule_mattered = False
    for layer in range(L):
        router = spec.routers[layer]
        hf_scores = None if hf[layer] is None else \
            hf[layer].detach().double().numpy().reshape(-1, hf[layer].shape[-1])[:, :E]
        if f.logits == "recorded":  # gemma4: its router normalises internally and returns probabilities
            g = hf_scores
        else:
            logits = _recomputed_logits(f, router, obs.inputs[layer], E, cfg)
            if hf_scores is not None:
                np.testing.assert_allclose(logits, hf_scores, atol=1e-4, rtol=1e-4)
            g = _g(spec.kind, logits)
        # (a) the distribution and its per-sample mean
        g_NxTxE = g.reshape(N, T, E)
        want = (g_NxTxE * mask[..., None]).sum(1) / mask.sum(1)[:, None]
        np.testing.assert_allclose(rec["route_probs"][:, layer], want, atol=2e-5)
        ids = rec["topk_ids"][:, :, layer].reshape(N * T, k)
        w = rec["topk_weights"][:, :, layer].reshape(N * T, k)
        np.testing.assert_allclose(w[real], np.take_along_axis(g, ids, -1)[real], atol=2e-5)
        assert (np.diff(w[real], axis=1) <= 0).all()  # ordered by g, descending
        assert (ids[~real] == 0).all() and (w[~real] == 0).all()
        np.testing.assert_allclose(rec["router_weights"][layer],
                                   _get(router, f.weight).detach().float().numpy()[:E], atol=0)
        # (b) the choice: the family's rule, and what the experts received
        recorded = [set(r.tolist()) for r in ids[real]]
        if type(router).__name__.endswith("HashRouter"):  # a fixed token-id -> experts table
            table = router.tid2eid.numpy()
            assert recorded == [set(table[t].tolist()) for t in tokens.reshape(-1)[real]]
        elif f.logits != "recorded":
            bias = _bias(router, obs.call_args[layer], E)
            assert recorded == _real(_reference_choice(f.rule, logits, bias, k, cfg), real)
        else:
            assert recorded == _real(_topk_sets(g, k), real)
        rule_mattered |= recorded != _real(_topk_sets(g, k), real)
        # longcat's zero-computation experts (ids >= n_routed_experts) bypass its experts module
        routed = cfg.n_routed_experts if f.model_type == "longcat_flash" else E
        assert [{e for e in s if e < routed} for s in recorded] == _real(obs.expert_ids[layer], real)

    # the biases / groups / hash tables set by `build` change the choice, so the rule check above is not vacuous
    assert rule_mattered == (f.rule != "topk")

    # (c) per-sample loss from transformers' own loss, one sample at a time
    for i in range(N):
        labels = torch.as_tensor(np.where(mask[i], tokens[i], -100)[None], dtype=torch.long)
        with torch.no_grad():
            out = model(input_ids=torch.as_tensor(tokens[i][None], dtype=torch.long),
                        attention_mask=torch.as_tensor(mask[i][None], dtype=torch.long), labels=labels,
                        use_cache=False, output_router_logits=False)
        assert rec["sample_loss"][i] == pytest.approx(float(out.loss), abs=2e-5)
    assert arrays["sample_ids"].dtype == np.int64 and list(arrays["domains"]) == ["a", "b", "a"]


def test_moe_layer_indices_skip_dense_layers():
    """Dense layers (first_k_dense_replace, mlp_layer_types) have no router: L counts MoE layers, in layer order."""
    for f in (Fam("deepseek_v3", rule="group"),
              Fam("beam", rule="group", extra=dict(mlp_layer_types=["dense", "sparse", "sparse"]))):
        cfg = tiny_config(f)
        dense = [i for i in range(cfg.num_hidden_layers)
                 if (getattr(cfg, "mlp_layer_types", None) or ["sparse"] * 9)[i] == "dense"
                 or i < (getattr(cfg, "first_k_dense_replace", 0) or 0)]
        _, spec = build(f)
        assert dense and spec.layers == tuple(i for i in range(cfg.num_hidden_layers) if i not in dense)


# --- the record's other fields ---------------------------------------------------------------------------------------

def test_answer_loss_and_token_logprobs_match_cross_entropy():
    model, _ = build(Fam("olmoe"))
    tokens, mask = _batch()
    answer = np.zeros_like(mask)
    answer[0, 4:6] = True
    answer[1, 2] = True  # row 2 has no answer token: NaN
    rec = tc.probe_record(model, tokens, mask, [0, 1, 2], ["a"] * 3, answer_mask_NxT=answer)
    assert set(rec) == set(PROBE_FIELDS) | set(OPTIONAL_PROBE_FIELDS)
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2),
                                            torch.as_tensor(tokens[:, 1:], dtype=torch.long),
                                            reduction="none").numpy()
    for i in range(2):
        sel = answer[i, 1:] & mask[i, 1:]
        assert rec["answer_loss"][i] == pytest.approx(nll[i][sel].mean(), abs=1e-5)
    assert np.isnan(rec["answer_loss"][2])
    lp = tc.token_logprobs(model, tokens, mask, batch_size=2)
    assert lp.shape == (3, 6) and lp.dtype == np.float32
    np.testing.assert_allclose(lp, -nll, atol=1e-5)


def test_token_logprobs_needs_no_router():
    cfg = CONFIG_MAPPING["llama"](hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=V)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    tokens, mask = _batch()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                                       attention_mask=torch.as_tensor(mask, dtype=torch.long)).logits, -1)
    want = torch.gather(logp[:, :-1], -1, torch.as_tensor(tokens[:, 1:, None], dtype=torch.long))[..., 0]
    np.testing.assert_allclose(tc.token_logprobs(model, tokens, mask), want.numpy(), atol=1e-5)


def test_record_dtypes_are_the_jax_backends():
    """`moegrok.probe.probe_record`'s dtypes (int32 ids/tokens, float32 values, int64 sample ids), also for N=0."""
    model, spec = build(Fam("olmoe"))
    tokens, mask = _batch()
    want = dict(sample_ids=np.int64, sample_loss=np.float32, route_probs=np.float32, router_weights=np.float32,
                topk_ids=np.int32, topk_weights=np.float32, token_mask=np.bool_, tokens=np.int32)
    for n in (3, 0):
        rec = tc.probe_record(model, tokens[:n], mask[:n], list(range(n)), ["a"] * n)
        validate_probe_arrays(rec, "torch")
        assert {k: rec[k].dtype.type for k in want} == want and rec["domains"].dtype.kind == "U"
        assert rec["route_probs"].shape == (n, len(spec.routers), spec.num_experts)
        assert rec["topk_ids"].shape == (n, tokens.shape[1], len(spec.routers), spec.top_k)
    np.testing.assert_allclose(tc.probe_record(model, tokens, mask, [0, 1, 2], ["a"] * 3)["route_probs"].sum(-1), 1,
                               atol=1e-5)


def test_bad_rows_are_refused():
    model, _ = build(Fam("olmoe"))
    tokens, mask = _batch()
    left = mask[:, ::-1].copy()
    with pytest.raises(MoegrokError, match="right-padded"):
        tc.probe_record(model, tokens, left, [0, 1, 2], ["a"] * 3)
    with pytest.raises(MoegrokError, match=r"\[0, 97\)"):
        tc.probe_record(model, np.where(mask, V, 0), mask, [0, 1, 2], ["a"] * 3)
    with pytest.raises(MoegrokError, match="sample_ids"):
        tc.probe_record(model, tokens, mask, [0, 1], ["a"] * 3)


# --- state left behind on error -------------------------------------------------------------------------------------

def test_hooks_removed_and_modes_restored_on_error():
    model, _ = build(Fam("mixtral"))
    model.train()
    model.model.layers[1].eval()  # a mixed state must come back as it was, not as one blanket flag

    def boom(*args):
        raise RuntimeError("boom")

    handle = model.model.norm.register_forward_pre_hook(boom)
    before = [m.training for m in model.modules()]
    hooks = _hook_count(model)
    tokens, mask = _batch()
    with pytest.raises(RuntimeError, match="boom"):
        tc.probe_record(model, tokens, mask, [0, 1, 2], ["a"] * 3)
    assert [m.training for m in model.modules()] == before and _hook_count(model) == hooks
    handle.remove()


def test_a_router_run_twice_is_refused():
    """A layer run twice per forward (looped or shared layers) has no single routing per MoE layer."""
    model, _ = build(Fam("olmoe"))
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], layers[1], layers[2], layers[2]])
    model.config.num_hidden_layers = 4
    tokens, mask = _batch()
    hooks = _hook_count(model)
    with pytest.raises(MoegrokError, match=r"layers\.2\.mlp\.gate ran 2 times"):
        tc.probe_record(model, tokens, mask, [0, 1, 2], ["a"] * 3)
    assert _hook_count(model) == hooks


# --- refusals -------------------------------------------------------------------------------------------------------

def _refusal(model) -> str:
    with pytest.raises(MoegrokError) as e:
        tc.router_spec(model)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_dense_model_is_refused():
    cfg = CONFIG_MAPPING["llama"](hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=4, vocab_size=V)
    msg = _refusal(AutoModelForCausalLM.from_config(cfg))
    assert msg.startswith("llama: no MoE router found")


@pytest.mark.parametrize("f, why", [
    (Fam("doge"), "product-key router"),
    (Fam("zaya", extra=dict(num_experts_per_tok=1)), "MLP router"),
    (Fam("deepseek_v4"), "scoring_func='sqrtsoftplus'"),  # the family's default score function
    (Fam("inkling2_loop_text", extra=dict(unpadded_vocab_size=V)), "loop layers"),
], ids=lambda x: x.model_type if isinstance(x, Fam) else "")
def test_unsupported_families_are_refused(f, why):
    torch.manual_seed(0)
    msg = _refusal(AutoModelForCausalLM.from_config(tiny_config(f)))
    assert msg.startswith(f.model_type + ":") and why in msg


def test_encoder_decoder_moe_is_refused():
    from transformers import SwitchTransformersForConditionalGeneration

    cfg = CONFIG_MAPPING["switch_transformers"](vocab_size=V, d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                                num_decoder_layers=2, num_heads=2, num_experts=4)
    msg = _refusal(SwitchTransformersForConditionalGeneration(cfg))
    assert msg.startswith("switch_transformers:") and "not a causal LM" in msg


def test_moe_family_missing_from_the_table_is_refused():
    class Unknown(torch.nn.Module):
        _can_record_outputs = {"router_logits": object()}
        config = type("Cfg", (), {"model_type": "fancy_moe"})()

    msg = _refusal(Unknown())
    assert msg.startswith("fancy_moe: MoE family not in") and "olmoe" in msg


# --- loading --------------------------------------------------------------------------------------------------------

def test_load_model_roundtrip_and_dtypes(tmp_path):
    model, _ = build(Fam("olmoe"))
    model.save_pretrained(tmp_path / "ck")
    tokens, mask = _batch()
    want = tc.probe_record(model, tokens, mask, [0, 1, 2], ["a"] * 3)

    loaded = tc.load_model(tmp_path / "ck")
    assert not loaded.training and next(loaded.parameters()).dtype == torch.float32
    got = tc.probe_record(loaded, tokens, mask, [0, 1, 2], ["a"] * 3)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])

    half = tc.load_model(tmp_path / "ck", dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    rec = tc.probe_record(half, tokens, mask, [0, 1, 2], ["a"] * 3)
    assert rec["route_probs"].dtype == np.float32 and np.isfinite(rec["sample_loss"]).all()
    np.testing.assert_allclose(rec["route_probs"], want["route_probs"], atol=0.05)  # bf16 router, same model

    half.save_pretrained(tmp_path / "ck16")  # dtype=None keeps the checkpoint's dtype; a name converts
    assert next(tc.load_model(tmp_path / "ck16").parameters()).dtype == torch.bfloat16
    assert next(tc.load_model(tmp_path / "ck16", dtype="float32").parameters()).dtype == torch.float32


def test_load_model_errors_name_the_path(tmp_path):
    with pytest.raises(MoegrokError, match="not a directory"):
        tc.load_model(tmp_path / "missing")
    with pytest.raises(MoegrokError, match="config.json: missing"):
        tc.load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no_such_model"}')
    with pytest.raises(MoegrokError, match="'no_such_model' is not a causal LM"):
        tc.load_model(tmp_path)
    with pytest.raises(MoegrokError, match="dtype"):
        (tmp_path / "config.json").write_text('{"model_type": "olmoe"}')
        tc.load_model(tmp_path, dtype="int3")


def test_capture_takes_torch_tensors_and_returns_the_models_logits():
    model, spec = build(Fam("qwen3_moe"))
    tokens, mask = _batch()
    ids, am = torch.as_tensor(tokens, dtype=torch.long), torch.as_tensor(mask, dtype=torch.long)
    cap = tc.capture(model, ids, am)
    L, (B, T) = len(spec.routers), tokens.shape
    assert cap.g_LxBxTxE.shape == (L, B, T, spec.num_experts) and cap.g_LxBxTxE.dtype == torch.float32
    assert cap.topk_ids_LxBxTxk.shape == (L, B, T, spec.top_k)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=am).logits
    torch.testing.assert_close(cap.logits_BxTxV, want)
