"""The MoE feed-forward: fp32 softmax router over all experts, top-k, SwiGLU experts, and the auxiliary losses.

Expert paths, all dropless and equal in outputs and gradients to the dense reference (`tests/test_model.py`):
``dense`` (every expert on every token), ``ragged`` (CPU: the tiled grouped matmul of `grouped.py`; elsewhere
`lax.ragged_dot`), ``ragged_dot`` (`lax.ragged_dot` everywhere), ``blocked`` (per-expert padded blocks + batched GEMM),
``tokamax`` (`tokamax.ragged_dot`: Pallas Mosaic-GPU kernels on Hopper, Triton elsewhere; the `gpu` extra) and
``auto`` (the default), which picks by platform: the tiled path on CPU, tokamax (else blocked) on NVIDIA GPUs — XLA
rewrites `lax.ragged_dot` there into a dense dot over a masked, group-broadcast input, E x the useful FLOPs —, and
`lax.ragged_dot` on TPU, where it is a native grouped matmul."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from moegrok.model.config import MoeConfig
from moegrok.errors import MoegrokError
from moegrok.model import platform as _platform
from moegrok.model.grouped import expert_ranks, experts_tiled
from moegrok.model.layers import DenseMLP, dtype_of, normal_param


def route(logits_NxE: jax.Array, k: int, norm_topk_prob: bool):
    """Router logits (fp32) -> full softmax, top-k weights and ids (ids ordered by weight, descending)."""
    probs_NxE = jax.nn.softmax(logits_NxE.astype(jnp.float32), axis=-1)
    topw_Nxk, topi_Nxk = jax.lax.top_k(probs_NxE, k)
    if norm_topk_prob:
        topw_Nxk = topw_Nxk / jnp.sum(topw_Nxk, axis=-1, keepdims=True)
    return probs_NxE, topw_Nxk, topi_Nxk


def route_sigmoid(logits_NxE: jax.Array, bias_E: jax.Array, k: int, norm_topk_prob: bool, n_group: int,
                  topk_group: int):
    """DeepSeek-V3 / GLM-4.5 routing: sigmoid scores; the selection bias and the group limit decide which experts
    are chosen (each group scores the sum of its best two biased scores; only the best `topk_group` groups are
    eligible), while the mixing weights are the unbiased scores of the chosen ones. Returns (scores [N, E], weights
    [N, k], ids [N, k]); ids in the order top-k gives them, weights not yet scaled by routed_scaling_factor."""
    scores_NxE = jax.nn.sigmoid(logits_NxE.astype(jnp.float32))
    choice_NxE = scores_NxE + bias_E.astype(jnp.float32)
    if n_group > 1:
        N, E = choice_NxE.shape
        by_group = choice_NxE.reshape(N, n_group, E // n_group)
        group_score_NxG = jnp.sum(jax.lax.top_k(by_group, 2)[0], axis=-1)
        _, best_g = jax.lax.top_k(group_score_NxG, topk_group)
        eligible_NxG = jnp.sum(jax.nn.one_hot(best_g, n_group, dtype=jnp.int32), axis=1) > 0
        eligible_NxE = jnp.repeat(eligible_NxG, E // n_group, axis=1)
        choice_NxE = jnp.where(eligible_NxE, choice_NxE, -jnp.inf)
    _, topi_Nxk = jax.lax.top_k(choice_NxE, k)
    topw_Nxk = jnp.take_along_axis(scores_NxE, topi_Nxk, axis=-1)
    if norm_topk_prob:
        topw_Nxk = topw_Nxk / (jnp.sum(topw_Nxk, axis=-1, keepdims=True) + 1e-20)
    return scores_NxE, topw_Nxk, topi_Nxk


def routing_distribution(logits: jax.Array, router: str) -> jax.Array:
    """The per-token routing distribution g over all experts the probe record stores (METHOD §4): the softmax of
    the logits for softmax routers, the sigmoid scores normalised to sum 1 for sigmoid routers (selection bias
    excluded: it steers the choice, it is not a preference the router expresses)."""
    logits = logits.astype(jnp.float32)
    if router == "sigmoid":
        s = jax.nn.sigmoid(logits)
        return s / jnp.sum(s, axis=-1, keepdims=True)
    return jax.nn.softmax(logits, axis=-1)


def experts_dense(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk):
    """Every expert on every token, combined with a [N, E] weight that is zero off the top-k. Laid out as two
    GEMMs over the concatenated experts (the weight scales the hidden activation before the down projection, which
    is linear), which on CPU is ~4x faster than per-expert batched einsums."""
    E, D, I2 = gate_up_ExDx2I.shape
    I = I2 // 2
    w_NxE = jnp.sum(jax.nn.one_hot(topi_Nxk, E, dtype=topw_Nxk.dtype) * topw_Nxk[..., None], axis=1)
    h_NxEx2xI = (x_NxD @ jnp.transpose(gate_up_ExDx2I, (1, 0, 2)).reshape(D, E * I2)).reshape(-1, E, 2, I)
    a_NxExI = jax.nn.silu(h_NxEx2xI[:, :, 0]) * h_NxEx2xI[:, :, 1] * w_NxE[:, :, None].astype(x_NxD.dtype)
    return a_NxExI.reshape(-1, E * I) @ down_ExIxD.reshape(E * I, D)


def experts_ragged(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk, unroll: bool = False):
    """Dropless sorted experts. On CPU `lax.ragged_dot` lowers to a masked dense dot over all experts (slower than
    `experts_dense`), so there the tiled grouped SwiGLU of `grouped.py` runs instead (same result; `unroll`: unroll
    its short tile loops, see there)."""
    if _platform.current() == "cpu":
        return experts_tiled(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk, unroll=unroll)
    return experts_ragged_dot(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk)


def experts_ragged_dot(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk, ragged_dot=None):
    """Dropless: sort the N*k (token, expert) assignments by expert, two grouped matmuls, unsort by gathers
    (gathers instead of a scatter-add keep this valid under sharding). `ragged_dot`: the grouped matmul
    (default `lax.ragged_dot`; `tokamax.ragged_dot` has the same signature)."""
    ragged_dot = ragged_dot or jax.lax.ragged_dot
    N, k = topi_Nxk.shape
    E = gate_up_ExDx2I.shape[0]
    flat_e = topi_Nxk.reshape(-1)
    order = jnp.argsort(flat_e, stable=True)
    inverse = jnp.argsort(order)
    group_sizes = jnp.bincount(flat_e, length=E).astype(jnp.int32)
    xs_Mxd = x_NxD[order // k]
    gu = ragged_dot(xs_Mxd, gate_up_ExDx2I, group_sizes)
    gate, up = jnp.split(gu, 2, axis=-1)
    ys_MxD = ragged_dot(jax.nn.silu(gate) * up, down_ExIxD, group_sizes)
    y_NxkxD = ys_MxD[inverse].reshape(N, k, -1)
    return jnp.einsum("nk,nkd->nd", topw_Nxk.astype(y_NxkxD.dtype), y_NxkxD)


def experts_blocked(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk, block: int = 64):
    """Dropless block-sparse: group assignments by expert, pad each expert's run to a multiple of `block`, and run
    one batched matmul over blocks that each belong to a single expert. Work is N*k + E*block rows instead of
    the dense path's N*E, all in gathers and batched GEMMs, which XLA:CPU runs well (its `ragged_dot` lowering
    computes every group densely). Positions within each expert come from `grouped.expert_ranks`."""
    N, k = topi_Nxk.shape
    E, D, I2 = gate_up_ExDx2I.shape
    M = N * k
    nb = -(-M // block) + E  # static bound on the number of blocks after per-expert padding
    flat_e = topi_Nxk.reshape(-1).astype(jnp.int32)
    rank_M, sizes_E = expert_ranks(flat_e, E)
    padded_E = -(-sizes_E // block) * block
    pend_E = jnp.cumsum(padded_E)
    dest_M = (pend_E - padded_E)[flat_e] + rank_M  # padded slot of each (token, slot) assignment
    src_P = jnp.full((nb * block,), N, jnp.int32).at[dest_M].set(jnp.arange(M, dtype=jnp.int32) // k)
    xb = jnp.where((src_P < N)[:, None], x_NxD[jnp.minimum(src_P, N - 1)], 0).reshape(nb, block, D)
    e_B = jnp.minimum(jnp.searchsorted(pend_E, jnp.arange(nb, dtype=jnp.int32) * block, side="right"), E - 1)
    h = jnp.einsum("bcd,bdf->bcf", xb, gate_up_ExDx2I[e_B])
    gate, up = jnp.split(h, 2, axis=-1)
    y_PxD = jnp.einsum("bci,bid->bcd", jax.nn.silu(gate) * up, down_ExIxD[e_B]).reshape(nb * block, D)
    y_NxkxD = y_PxD[dest_M].reshape(N, k, D)
    return jnp.einsum("nk,nkd->nd", topw_Nxk.astype(y_NxkxD.dtype), y_NxkxD)


def tokamax_available() -> bool:
    try:
        import tokamax  # noqa: F401
    except ImportError:
        return False
    return True


def experts_tokamax(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk):
    try:
        import tokamax
        from absl import flags
    except ImportError:
        raise MoegrokError("model config: moe_impl 'tokamax' needs the tokamax package: "
                           "pip install 'moegrok[gpu]' (or moe_impl: auto / blocked)") from None
    # tokamax reads absl flags; unparsed, absl would parse sys.argv (moegrok's or pytest's options) and refuse them.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return experts_ragged_dot(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk, ragged_dot=tokamax.ragged_dot)


EXPERT_IMPLS = {"dense": experts_dense, "ragged": experts_ragged, "blocked": experts_blocked,
                "ragged_dot": experts_ragged_dot, "tokamax": experts_tokamax,
                # Not a config value: what the data-parallel CPU paths (train step, probe) run for "ragged".
                "ragged_unrolled": functools.partial(experts_ragged, unroll=True)}


def expert_impl_for(impl: str, platform: str | None = None) -> str:
    """The expert path config value `impl` runs on `platform` (default: the one being traced for)."""
    if impl != "auto":
        return impl
    platform = platform or _platform.current()
    if platform == "cpu":
        return "ragged"
    if platform == "tpu":
        return "ragged_dot"
    return "tokamax" if platform == "cuda" and tokamax_available() else "blocked"


def data_parallel_impl(impl: str) -> str | None:
    """The expert implementation to trace inside a per-device (shard_map) program for config value `impl`."""
    return "ragged_unrolled" if expert_impl_for(impl) == "ragged" and _platform.current() == "cpu" else None


class MoeBlock(nnx.Module):
    def __init__(self, cfg: MoeConfig, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        D, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_experts
        std = cfg.initializer_range
        self.router = normal_param(rngs, (D, E), std, pd)  # column e = expert e's router vector
        self.gate_up = normal_param(rngs, (E, D, 2 * I), std, pd)  # gate half first, as HF's gate_up_proj
        self.down = normal_param(rngs, (E, I, D), std, pd)
        # Sigmoid routers' selection bias (HF's e_score_correction_bias): a statistic the trainer of the original
        # model adjusted, kept in float32 like HF.
        self.selection_bias = nnx.Param(jnp.zeros((E,), jnp.float32)) if cfg.router == "sigmoid" else None
        S = cfg.shared_expert_intermediate_size
        self.shared = DenseMLP(D, S, std, pd, rngs) if S else None
        self.shared_gate = normal_param(rngs, (D, 1), std, pd) if cfg.shared_expert_gate else None
        self.k = cfg.num_experts_per_tok
        self.norm_topk_prob = cfg.norm_topk_prob
        self.impl = cfg.moe_impl
        self.router_kind, self.n_group, self.topk_group = cfg.router, cfg.n_group, cfg.topk_group
        self.scaling = cfg.routed_scaling_factor

    def select(self, logits_NxE: jax.Array):
        """(mixing weights [N, k], chosen expert ids [N, k]) exactly as the family's router decides them."""
        if self.router_kind == "sigmoid":
            _, topw, topi = route_sigmoid(logits_NxE, self.selection_bias[...], self.k, self.norm_topk_prob,
                                          self.n_group, self.topk_group)
        else:
            _, topw, topi = route(logits_NxE, self.k, self.norm_topk_prob)
        if self.scaling != 1.0:
            topw = topw * self.scaling
        return topw, topi

    def __call__(self, x_BxTxD: jax.Array, impl: str | None = None):
        """Returns (output [B, T, D], router logits [B, T, E] in float32)."""
        B, T, D = x_BxTxD.shape
        dt = x_BxTxD.dtype
        x_NxD = x_BxTxD.reshape(B * T, D)
        # Router logits in fp32 at full precision whatever the activation dtype (GPUs default to TF32 for fp32
        # matmuls, which can flip top-k choices against Hugging Face): routing statistics are the point here.
        logits_NxE = jnp.dot(x_NxD, self.router[...].astype(dt), preferred_element_type=jnp.float32,
                             precision=jax.lax.Precision.HIGHEST)
        topw, topi = self.select(logits_NxE)
        fn = EXPERT_IMPLS[expert_impl_for(impl or self.impl)]
        y = fn(x_NxD, self.gate_up[...].astype(dt), self.down[...].astype(dt), topw.astype(dt), topi)
        if self.shared is not None:  # not routed: every token, outside the routing statistics
            s = self.shared(x_NxD)
            if self.shared_gate is not None:
                s = jax.nn.sigmoid(x_NxD @ self.shared_gate[...].astype(dt)) * s
            y = y + s
        return y.reshape(B, T, D), logits_NxE.reshape(B, T, -1)


def load_balancing_stats(router_logits_LxBxTxE: jax.Array, k: int, mask_BxT: jax.Array | None = None):
    """The load-balancing loss's sums over these tokens, pooled over layers: (top-k assignments per expert [E],
    router probability mass per expert [E], token count). Sums over data shards give the whole batch's statistics,
    which is how the data-parallel train step computes the same loss as one device."""
    L, B, T, E = router_logits_LxBxTxE.shape
    probs, _, topi = route(router_logits_LxBxTxE.reshape(-1, E), k, False)
    w = jnp.ones((L * B * T,), jnp.float32) if mask_BxT is None else \
        jnp.broadcast_to(mask_BxT.astype(jnp.float32)[None], (L, B, T)).reshape(-1)
    assigned_E = jnp.einsum("n,nke->e", w, jax.nn.one_hot(topi, E, dtype=jnp.float32))
    return assigned_E, jnp.einsum("n,ne->e", w, probs), jnp.sum(w)


def load_balancing_from_stats(assigned_E, prob_mass_E, total):
    return assigned_E.shape[-1] * jnp.sum((assigned_E / total) * (prob_mass_E / total))


def load_balancing_loss(router_logits_LxBxTxE: jax.Array, k: int, mask_BxT: jax.Array | None = None) -> jax.Array:
    """Switch load-balancing loss exactly as HF's `load_balancing_loss_func`: assignment fractions and mean router
    probabilities pooled over all layers' (non-padding) tokens, then E * sum_e f_e * P_e."""
    return load_balancing_from_stats(*load_balancing_stats(router_logits_LxBxTxE, k, mask_BxT))


def router_z_stats(router_logits_LxBxTxE: jax.Array, mask_BxT: jax.Array | None = None):
    """(sum over layers and non-padding tokens of logsumexp(logits)^2, their count): the z-loss's sums."""
    z = jax.nn.logsumexp(router_logits_LxBxTxE.astype(jnp.float32), axis=-1) ** 2
    w = jnp.ones_like(z) if mask_BxT is None else jnp.broadcast_to(mask_BxT.astype(jnp.float32)[None], z.shape)
    return jnp.sum(z * w), jnp.sum(w)


def router_z_loss(router_logits_LxBxTxE: jax.Array, mask_BxT: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss: mean over layers and (non-padding) tokens of logsumexp(logits)^2."""
    total, count = router_z_stats(router_logits_LxBxTxE, mask_BxT)
    return total / jnp.maximum(count, 1.0)
