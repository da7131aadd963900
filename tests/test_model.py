"""MoeLM against Hugging Face `OlmoeForCausalLM` (transformers + torch as the independent reference) on several
tiny random configs, loaded through `load_olmoe`; dense vs ragged experts against each other and against a NumPy
brute force, in outputs and gradients, including experts that receive no tokens."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flax import nnx

from moegrok.convert.hf import load_olmoe
from moegrok.errors import MoegrokError
from moegrok.model.config import MoeConfig
from moegrok.model.grouped import COUNTING_SORT_UP_TO, expert_ranks, experts_tiled, tile_rows
from moegrok.model.model import MoeLM, get_params, lm_loss, set_params, token_nll
from moegrok.model.moe import (EXPERT_IMPLS, tokamax_available, experts_blocked, experts_dense, experts_ragged, experts_ragged_dot,
                               route)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

jax.config.update("jax_default_matmul_precision", "highest")

# name -> OlmoeConfig fields. Together: top-1 .. top-E, norm_topk_prob both ways, clip_qkv set (small enough to
# bite) and unset, several rope_theta, MHA / GQA / MQA, tied and untied embeddings.
CONFIGS = {
    "gqa_top2": dict(num_experts=6, num_experts_per_tok=2, norm_topk_prob=False, clip_qkv=None,
                     rope_theta=500.0, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "top1_clip_tied": dict(num_experts=4, num_experts_per_tok=1, norm_topk_prob=True, clip_qkv=0.6,
                           rope_theta=10000.0, num_attention_heads=2, num_key_value_heads=2,
                           tie_word_embeddings=True),
    "mqa_top3_norm": dict(num_experts=8, num_experts_per_tok=3, norm_topk_prob=True, clip_qkv=None,
                          rope_theta=1e6, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True),
    "all_experts_clip": dict(num_experts=3, num_experts_per_tok=3, norm_topk_prob=False, clip_qkv=0.8,
                             rope_theta=50.0, num_attention_heads=2, num_key_value_heads=1,
                             tie_word_embeddings=False),
}
V, D, I, L, B, T = 61, 32, 20, 2, 3, 11


def hf_model(fields: dict, seed: int = 0):
    """A random HF OLMoE with every weight (norm scales included) away from its init, so that a mixed-up
    mapping cannot pass."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    fields = dict(fields)
    theta = fields.pop("rope_theta")
    cfg = OlmoeConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L, pad_token_id=0,
                      eos_token_id=None, rope_parameters={"rope_type": "default", "rope_theta": theta}, **fields)
    torch.manual_seed(seed)
    model = OlmoeForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(torch.rand(p.shape, generator=gen) + 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "gate.weight" in name else 0.15))
    return model


def batch(seed=0):
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, V, size=(B, T))
    mask = np.ones((B, T), bool)
    mask[1, 7:] = False  # right padding
    mask[2, 4:] = False
    ids[~mask] = 0
    return ids, mask


def forward(model, ids, mask):
    """Our model under one jit (eager dispatch compiles every op separately: slower for a single call)."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, i, m: nnx.merge(graphdef, s)(i, m))(state, jnp.asarray(ids), jnp.asarray(mask))


def hf_forward(model, ids, mask):
    with torch.no_grad():
        labels = torch.tensor(np.where(mask, ids, -100))
        return model(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)), labels=labels,
                     output_router_logits=True)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request, tmp_path_factory):
    hf = hf_model(CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return request.param, hf, path


def test_parity_with_transformers(pair):
    name, hf, path = pair
    ids, mask = batch()
    out = hf_forward(hf, ids, mask)
    ours = load_olmoe(path, dtype="float32")
    assert ours.cfg.num_experts_per_tok == CONFIGS[name]["num_experts_per_tok"]
    o = forward(ours, ids, mask)

    lg = out.logits.numpy()
    assert np.abs(np.asarray(o.logits)[mask] - lg[mask]).max() <= 1e-4

    E, k = hf.config.num_experts, hf.config.num_experts_per_tok
    rl_hf = np.stack([r.numpy().reshape(B, T, E) for r in out.router_logits])[:, mask]  # [L, n, E] pre-softmax
    rl = np.asarray(o.router_logits)[:, mask]
    p_hf = torch.softmax(torch.tensor(rl_hf), -1).numpy()
    p = np.asarray(jax.nn.softmax(rl, -1))
    assert np.abs(p - p_hf).max() <= 1e-5
    ids_hf = np.sort(np.argsort(-p_hf, axis=-1, kind="stable")[..., :k], -1)
    ids_ours = np.sort(np.asarray(jax.lax.top_k(jnp.asarray(p), k)[1]), -1)
    np.testing.assert_array_equal(ids_ours, ids_hf)

    # Per-token NLL against torch's cross entropy on HF's own logits.
    nll_hf = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, V), torch.tensor(ids[:, 1:]).reshape(-1),
                                               reduction="none").numpy().reshape(B, T - 1)
    nll, valid = token_nll(o.logits, jnp.asarray(ids), jnp.asarray(mask))
    valid = np.asarray(valid)
    assert valid.sum() == (mask[:, 1:] & mask[:, :-1]).sum()
    assert np.abs(np.asarray(nll)[valid] - nll_hf[valid]).max() <= 1e-5
    assert abs(float(o.aux_loss) - float(out.aux_loss)) <= 1e-5
    total = float(lm_loss(o.logits, jnp.asarray(ids), jnp.asarray(mask))) + hf.config.router_aux_loss_coef * float(
        o.aux_loss)
    assert abs(total - float(out.loss)) <= 1e-5


def test_explicit_positions_match_transformers(pair):
    """Default positions use precomputed RoPE tables, explicit ones compute cos/sin in the graph: both paths against
    HF with `position_ids` (stretched and gapped per row: RoPE is relative, so a mere shift would change nothing)."""
    from flax import nnx

    name, hf, path = pair
    ids, mask = batch(seed=3)
    pos = np.stack([np.arange(T), 3 * np.arange(T) + 5, np.cumsum(np.random.RandomState(0).randint(1, 9, T))])
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64)),
                 position_ids=torch.tensor(pos)).logits.numpy()
        ref0 = hf(torch.tensor(ids), attention_mask=torch.tensor(mask.astype(np.int64))).logits.numpy()
    ours = load_olmoe(path, dtype="float32")
    graphdef, state = nnx.split(ours)
    fwd = jax.jit(lambda s, i, m, p: nnx.merge(graphdef, s)(i, m, p).logits)
    got = np.asarray(fwd(state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos)))
    got0 = np.asarray(forward(ours, ids, mask).logits)
    assert np.abs(got[mask] - ref[mask]).max() <= 1e-4
    assert np.abs(got0[mask] - ref0[mask]).max() <= 1e-4
    assert np.abs(ref[1:][mask[1:]] - ref0[1:][mask[1:]]).max() > 1e-3  # the positions matter


def test_clip_qkv_actually_clips():
    """The clip configs must exercise clipping: the same weights without clipping give different logits."""
    fields = CONFIGS["top1_clip_tied"]
    ids, mask = batch()
    clipped = hf_forward(hf_model(fields), ids, mask).logits
    unclipped = hf_forward(hf_model({**fields, "clip_qkv": None}), ids, mask).logits
    assert (clipped - unclipped).abs().max() > 1e-2


def test_bf16_forward_close_to_fp32(tmp_path):
    hf = hf_model(CONFIGS["gqa_top2"])
    hf.save_pretrained(tmp_path)
    ids, mask = batch(1)
    lg = hf_forward(hf, ids, mask).logits.numpy()[mask]
    ours = load_olmoe(tmp_path, dtype="bfloat16")
    assert ours.embed[...].dtype == jnp.bfloat16
    o = np.asarray(forward(ours, ids, mask).logits)[mask]
    assert np.isfinite(o).all()
    assert np.linalg.norm(o - lg) / np.linalg.norm(lg) < 0.05
    assert (o.argmax(-1) == lg.argmax(-1)).mean() >= 0.8


# ------------------------------------------------------------------------------------------ dense vs ragged
def swiglu_brute_force(x, gate_up, down, topw, topi):
    """NumPy, one (token, slot) at a time."""
    I = down.shape[1]
    out = np.zeros_like(x)
    for n in range(x.shape[0]):
        for w, e in zip(topw[n], topi[n]):
            h = x[n] @ gate_up[e]
            g, u = h[:I], h[I:]
            out[n] += w * ((g / (1 + np.exp(-g))) * u) @ down[e]
    return out


def expert_inputs(N=40, Dm=12, Im=10, E=7, seed=0):
    rng = np.random.RandomState(seed)
    return (rng.randn(N, Dm).astype(np.float32), (rng.randn(E, Dm, 2 * Im) * 0.3).astype(np.float32),
            (rng.randn(E, Im, Dm) * 0.3).astype(np.float32), (rng.randn(Dm, E)).astype(np.float32))


ROUTINGS = {  # which experts the router may pick (the rest get no tokens)
    "all": None, "starve_three": [0, 2, 5, 6], "one_expert_only": [4],
}


@pytest.mark.parametrize("k,routing,tile", [
    (2, "all", None), (1, "all", 1), (4, "starve_three", 3), (2, "starve_three", None), (1, "one_expert_only", 3),
    (7, "all", 2),  # k = E: every expert sees every token
])
def test_tiled_experts_match_brute_force(k, routing, tile):
    x, gu, dn, r = expert_inputs()
    E = gu.shape[0]
    allowed = ROUTINGS[routing]
    bias = np.zeros(E, np.float32) if allowed is None else np.where(np.isin(np.arange(E), allowed), 0, -1e4)
    _, topw, topi = route(jnp.asarray(x @ r + bias), k, False)
    want = swiglu_brute_force(x, gu, dn, np.asarray(topw), np.asarray(topi))
    got = jax.jit(experts_tiled, static_argnames="tile")(*map(jnp.asarray, (x, gu, dn)), topw, topi, tile=tile)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


@pytest.mark.parametrize("E", [3, COUNTING_SORT_UP_TO, COUNTING_SORT_UP_TO + 1, 48])
def test_expert_ranks_match_numpy_on_both_branches(E):
    """Counting sort (E <= COUNTING_SORT_UP_TO) and argsort + scatter (above) against a NumPy loop: the rank of each
    assignment among earlier ones to the same expert, and the per-expert counts (a starved expert included)."""
    flat = np.random.RandomState(E).randint(0, E, 300)
    flat[flat == 1] = 0
    rank, sizes = jax.jit(expert_ranks, static_argnums=1)(jnp.asarray(flat, jnp.int32), E)
    np.testing.assert_array_equal(np.asarray(rank), [np.sum(flat[:m] == flat[m]) for m in range(len(flat))])
    np.testing.assert_array_equal(np.asarray(sizes), np.bincount(flat, minlength=E))


def test_tiled_experts_match_brute_force_many_experts():
    """E above the counting-sort threshold takes the argsort branch (OLMoE-1B-7B has 64 experts)."""
    x, gu, dn, r = expert_inputs(N=50, E=COUNTING_SORT_UP_TO + 8)
    _, topw, topi = route(jnp.asarray(x @ r), 3, False)
    want = swiglu_brute_force(x, gu, dn, np.asarray(topw), np.asarray(topi))
    got = jax.jit(experts_tiled)(*map(jnp.asarray, (x, gu, dn)), topw, topi)
    assert np.abs(np.asarray(got) - want).max() <= 1e-5


def moe_fn(impl, bias, k, norm):
    def f(x, gu, dn, r):
        _, topw, topi = route(x @ r + bias, k, norm)
        return impl(x, gu, dn, topw, topi)
    return f


OTHER_IMPLS = {"ragged": experts_ragged, "ragged_dot": experts_ragged_dot, "blocked": experts_blocked,
               "ragged_unrolled": EXPERT_IMPLS["ragged_unrolled"]}
if tokamax_available():  # the `gpu` extra; on CPU tokamax falls back to its XLA implementation
    OTHER_IMPLS["tokamax"] = EXPERT_IMPLS["tokamax"]


@pytest.mark.parametrize("impl", list(OTHER_IMPLS.values()), ids=list(OTHER_IMPLS))
@pytest.mark.parametrize("routing", ["all", "starve_three"])
def test_ragged_matches_dense_outputs_and_gradients(impl, routing):
    x, gu, dn, r = map(jnp.asarray, expert_inputs(N=64, seed=1))
    E, k = gu.shape[0], 2
    allowed = ROUTINGS[routing]
    bias = jnp.zeros(E) if allowed is None else jnp.where(jnp.isin(jnp.arange(E), jnp.asarray(allowed)), 0., -1e4)
    _, _, topi = route(x @ r + bias, k, False)
    counts = np.bincount(np.asarray(topi).ravel(), minlength=E)
    if allowed is not None:
        assert (counts[[1, 3, 4]] == 0).all()  # really starved
    cot = jnp.asarray(np.random.RandomState(2).randn(*x.shape).astype(np.float32))
    outs, grads = {}, {}
    for name, fn in (("dense", experts_dense), ("other", impl)):
        f = moe_fn(fn, bias, k, True)
        outs[name] = jax.jit(f)(x, gu, dn, r)
        grads[name] = jax.jit(jax.grad(lambda *a, f=f: jnp.sum(f(*a) * cot), argnums=(0, 1, 2, 3)))(x, gu, dn, r)
    assert np.abs(np.asarray(outs["dense"]) - np.asarray(outs["other"])).max() <= 1e-5
    for gd, go in zip(grads["dense"], grads["other"]):
        assert np.abs(np.asarray(gd) - np.asarray(go)).max() <= 1e-5
    if allowed is not None:  # no tokens, no gradient
        for g in grads["other"][1:3]:
            assert np.abs(np.asarray(g)[[1, 3, 4]]).max() == 0.0


def test_unrolled_tiles_are_unrolled_forward_and_backward():
    x, gu, dn, r = map(jnp.asarray, expert_inputs(N=64, seed=1))
    f = moe_fn(EXPERT_IMPLS["ragged_unrolled"], jnp.zeros(gu.shape[0]), 2, True)
    jaxpr = str(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(f(*a)), argnums=(1, 2)))(x, gu, dn, r))
    T = -(-64 * 2 // tile_rows(64 * 2, gu.shape[0], unrolled=True)) + gu.shape[0]
    assert jaxpr.count(f"unroll={T}") == 2  # the forward and the backward tile loops


def _loss_and_grads(cfg, seed=0):
    model = MoeLM(cfg, seed=seed)
    ids, mask = batch(3)
    ids, mask = jnp.asarray(ids % cfg.vocab_size), jnp.asarray(mask)
    graphdef, state = nnx.split(model)

    def loss(state):
        o = nnx.merge(graphdef, state)(ids, mask)
        return lm_loss(o.logits, ids, mask) + 0.01 * o.aux_loss + 0.001 * o.z_loss, o.logits

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(state)


@pytest.mark.parametrize("variant", [{"attention_impl": "xla"}, {"remat": True},
                                     {"attention_impl": "xla", "num_key_value_heads": 1, "remat": True}])
def test_fused_attention_and_remat_equal_the_plain_model(variant):
    """`jax.nn.dot_product_attention` (causal, padding from the mask; grouped-query heads) and per-layer
    rematerialisation give the einsum model's loss, logits and gradients in float32."""
    base = dict(vocab_size=50, hidden_size=24, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                num_experts=6, num_experts_per_tok=2, eos_token_id=None, initializer_range=0.2)
    base.update({k: v for k, v in variant.items() if k == "num_key_value_heads"})
    (l0, lg0), g0 = _loss_and_grads(MoeConfig(**base, attention_impl="einsum"))
    (l1, lg1), g1 = _loss_and_grads(MoeConfig(**{**base, **variant}))
    _, mask = batch(3)
    assert abs(float(l0) - float(l1)) <= 1e-5
    assert np.abs(np.asarray(lg0)[mask] - np.asarray(lg1)[mask]).max() <= 1e-5
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5
    assert float(jnp.abs(jax.tree.leaves(g1)[0]).max()) > 0  # gradients flow


def test_model_dense_and_ragged_agree_with_gradients():
    cfg = MoeConfig(vocab_size=50, hidden_size=24, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                    num_experts=6, num_experts_per_tok=2, eos_token_id=None, initializer_range=0.2)
    model = MoeLM(cfg, seed=0)
    # Layer 0's router strongly prefers experts 0-2, so some experts get few or no tokens (guaranteed empties are
    # covered at the block level above).
    params = get_params(model)
    params["layers"]["0"]["moe"]["router"] = params["layers"]["0"]["moe"]["router"].at[:, 3:].multiply(0.1)
    set_params(model, params)
    ids, mask = batch(3)
    ids = jnp.asarray(ids % cfg.vocab_size)
    mask = jnp.asarray(mask)
    from flax import nnx

    graphdef, state = nnx.split(model)

    def loss(state, impl):
        o = nnx.merge(graphdef, state)(ids, mask, moe_impl=impl)
        return lm_loss(o.logits, ids, mask) + 0.01 * o.aux_loss + 0.001 * o.z_loss, o.logits

    res = {impl: jax.jit(jax.value_and_grad(functools.partial(loss, impl=impl), has_aux=True))(state)
           for impl in ("dense", "ragged")}
    (ld, lgd), gd = res["dense"]
    (lr, lgr), gr = res["ragged"]
    assert abs(float(ld) - float(lr)) <= 1e-5
    assert np.abs(np.asarray(lgd) - np.asarray(lgr)).max() <= 1e-5
    for a, b in zip(jax.tree.leaves(gd), jax.tree.leaves(gr)):
        assert np.abs(np.asarray(a) - np.asarray(b)).max() <= 1e-5


# ---------------------------------------------------------------------------------------- controlled-study options
def small_cfg(**kw):
    return MoeConfig(vocab_size=40, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
                     num_experts=4, num_experts_per_tok=2, max_position_embeddings=12, moe_impl="dense", **kw)


def test_attention_without_qk_norm_or_rope_equals_torch_sdpa():
    import torch

    from moegrok.model.layers import Attention

    cfg = small_cfg(qk_norm=False, position_embedding="learned")
    attn = Attention(cfg, nnx.Rngs(0))
    assert attn.q_norm is None and attn.k_norm is None
    x = np.random.default_rng(0).normal(size=(3, 7, 16)).astype(np.float32)
    ours = np.asarray(attn(jnp.asarray(x), None, None, None))
    B, T, D, H, hd = 3, 7, 16, 2, 8
    tx = torch.from_numpy(x)
    q, k, v = (tx @ torch.from_numpy(np.asarray(w[...])) for w in (attn.wq, attn.wk, attn.wv))
    q, k, v = (a.reshape(B, T, H, hd).transpose(1, 2) for a in (q, k, v))
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    ref = ref.transpose(1, 2).reshape(B, T, D) @ torch.from_numpy(np.asarray(attn.wo[...]))
    np.testing.assert_allclose(ours, ref.numpy(), atol=2e-6)


def test_learned_positions_are_what_breaks_permutation_symmetry():
    # one layer: without positions its last output attends to the *set* of earlier tokens
    model = MoeLM(small_cfg(position_embedding="learned", qk_norm=False).replace(num_hidden_layers=1), seed=1)
    assert model.pos_embed[...].shape == (12, 16)
    tokens = jnp.asarray(np.random.default_rng(1).integers(2, 40, size=(1, 8)))
    perm = jnp.concatenate([tokens[:, :7][:, ::-1], tokens[:, 7:]], axis=1)  # earlier tokens reversed, last kept
    last = lambda m, t: np.asarray(m(t).logits[0, -1])  # noqa: E731
    assert np.abs(last(model, tokens) - last(model, perm)).max() > 1e-4  # positions are seen
    model.pos_embed[...] = jnp.zeros_like(model.pos_embed[...])
    # no positional signal left: causal attention is a set function of the prefix, so the last logits stay
    np.testing.assert_allclose(last(model, tokens), last(model, perm), atol=1e-5)


def test_learned_position_row_only_affects_later_positions():
    model = MoeLM(small_cfg(position_embedding="learned"), seed=2)
    tokens = jnp.asarray(np.random.default_rng(2).integers(2, 40, size=(2, 9)))
    before = np.asarray(model(tokens).logits)
    model.pos_embed[...] = model.pos_embed[...].at[5].add(0.5)
    after = np.asarray(model(tokens).logits)
    np.testing.assert_array_equal(before[:, :5], after[:, :5])
    assert np.abs(before[:, 5:] - after[:, 5:]).min(axis=-1).max() > 0
    with pytest.raises(MoegrokError, match="max_position_embeddings"):
        model(jnp.zeros((1, 13), jnp.int32))


def test_non_olmoe_options_refuse_conversion(tmp_path):
    from moegrok.convert.hf import save_olmoe

    for kw, needle in (({"position_embedding": "learned"}, "position_embedding"), ({"qk_norm": False}, "qk_norm")):
        with pytest.raises(MoegrokError, match=needle):
            save_olmoe(MoeLM(small_cfg(**kw)), tmp_path / "hf")
        assert not (tmp_path / "hf").exists()
    with pytest.raises(MoegrokError, match="position_embedding"):
        small_cfg(position_embedding="alibi")
