"""The OLMoE-architecture decoder (Flax NNX) and its causal-LM loss."""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moegrok.errors import MoegrokError
from moegrok.model.config import MoeConfig
from moegrok.model.layers import Attention, DenseMLP, RMSNorm, dtype_of, normal_param, rope_cos_sin, rope_tables
from moegrok.model.moe import MoeBlock, load_balancing_loss, router_z_loss, routing_distribution


class ModelOutput(NamedTuple):
    logits: jax.Array  # [B, T, V], float32
    router_logits: jax.Array  # [L_moe, B, T, E], float32, pre-activation (MoE layers only)
    aux_loss: jax.Array  # Switch load balancing (HF form), scalar
    z_loss: jax.Array  # router z-loss, scalar


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: MoeConfig, rngs: nnx.Rngs, dense: bool = False):
        pd = dtype_of(cfg.param_dtype)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.moe = None if dense else MoeBlock(cfg, rngs)
        self.mlp = DenseMLP(cfg.hidden_size, cfg.dense_intermediate_size or cfg.intermediate_size,
                            cfg.initializer_range, pd, rngs) if dense else None

    def __call__(self, x_BxTxD, cos, sin, mask_BxT, moe_impl=None):
        """Returns (output, router logits [B, T, E] or None for a dense layer)."""
        h = x_BxTxD + self.attn(self.input_norm(x_BxTxD), cos, sin, mask_BxT)
        if self.moe is None:
            B, T, D = h.shape
            return h + self.mlp(self.post_attn_norm(h).reshape(B * T, D)).reshape(B, T, D), None
        y, router_logits_BxTxE = self.moe(self.post_attn_norm(h), impl=moe_impl)
        return h + y, router_logits_BxTxE


class MoeLM(nnx.Module):
    """Pre-norm decoder: h = x + Attn(RMSNorm(x)); out = h + MoE(RMSNorm(h)); final RMSNorm; LM head.

    `model(tokens_BxT, mask_BxT)` returns a ModelOutput. Routing comes back with every call; under `jit` the parts a
    caller does not use (z-loss, aux loss, logits of unused layers) are removed by XLA, so they cost nothing.
    """

    def __init__(self, cfg: MoeConfig, *, rngs: nnx.Rngs | None = None, seed: int = 0):
        rngs = rngs or nnx.Rngs(seed)
        pd = dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.embed = normal_param(rngs, (cfg.vocab_size, cfg.hidden_size), cfg.initializer_range, pd)
        self.pos_embed = normal_param(rngs, (cfg.max_position_embeddings, cfg.hidden_size), cfg.initializer_range,
                                      pd) if cfg.position_embedding == "learned" else None
        self.layers = nnx.List([DecoderLayer(cfg, rngs, dense=i in cfg.dense_layers)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, pd)
        self.lm_head = None if cfg.tie_word_embeddings else \
            normal_param(rngs, (cfg.hidden_size, cfg.vocab_size), cfg.initializer_range, pd)

    def __call__(self, tokens_BxT: jax.Array, mask_BxT: jax.Array | None = None,
                 positions_BxT: jax.Array | None = None, *, moe_impl: str | None = None) -> ModelOutput:
        cfg = self.cfg
        dt = dtype_of(cfg.dtype)
        B, T = tokens_BxT.shape
        x = jnp.take(self.embed[...], tokens_BxT, axis=0).astype(dt)
        if self.pos_embed is not None:
            if T > cfg.max_position_embeddings:
                raise MoegrokError(f"sequence length {T} exceeds model field 'max_position_embeddings' "
                                   f"({cfg.max_position_embeddings}) of the learned position table")
            pos = jnp.arange(T)[None] if positions_BxT is None else positions_BxT
            x = x + jnp.take(self.pos_embed[...], pos, axis=0).astype(dt)
            cos = sin = None
        elif positions_BxT is None:
            # Constants, not ops: XLA:CPU fuses cos/sin into every q/k RoPE fusion (per head, per layer) and
            # recomputes them there; as tables the routing-capture forward ran 95 -> 86 ms (default positions).
            cos, sin = rope_tables(T, cfg.rotary_dim, cfg.rope_theta, dt)
        else:
            cos, sin = rope_cos_sin(positions_BxT, cfg.rotary_dim, cfg.rope_theta, dt)
        if mask_BxT is not None:
            mask_BxT = mask_BxT.astype(bool)
        router_logits = []
        for layer in self.layers:
            if cfg.remat:  # store only the layer's input; recompute its activations in the backward pass
                x, rl = nnx.remat(lambda lyr, x, m: lyr(x, cos, sin, m, moe_impl))(layer, x, mask_BxT)
            else:
                x, rl = layer(x, cos, sin, mask_BxT, moe_impl)
            if rl is not None:
                router_logits.append(rl)
        x = self.norm(x)
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        logits = jnp.dot(x, head.astype(dt), preferred_element_type=jnp.float32)
        rl_LxBxTxE = jnp.stack(router_logits)
        return ModelOutput(
            logits=logits,
            router_logits=rl_LxBxTxE,
            aux_loss=load_balancing_loss(rl_LxBxTxE, cfg.num_experts_per_tok, mask_BxT),
            z_loss=router_z_loss(rl_LxBxTxE, mask_BxT),
        )

    def router_weights(self) -> jax.Array:
        """Router weight matrices of the MoE layers [L, E, D] (row k = expert k's router vector), as METHOD §5
        uses them."""
        return jnp.stack([layer.moe.router[...].T for layer in self.layers if layer.moe is not None]
                         ).astype(jnp.float32)

    def routing(self, router_logits_LxBxTxE: jax.Array):
        """What a probe record stores of the routing (METHOD §4): (g [L, B, T, E], the routing distribution over
        all experts; topk_weights [L, B, T, k], g at the experts the model chose; topk_ids [L, B, T, k], those
        experts ordered by g, descending). For softmax routers the chosen experts are g's top k; for sigmoid
        routers the selection bias and group limit choose them, so they need not be g's top k."""
        cfg = self.cfg
        g = routing_distribution(router_logits_LxBxTxE, cfg.router)
        if cfg.router != "sigmoid":
            return (g, *jax.lax.top_k(g, cfg.num_experts_per_tok))
        L, B, T, E = g.shape
        chosen = []
        for logits, layer in zip(router_logits_LxBxTxE, (lyr for lyr in self.layers if lyr.moe is not None)):
            _, ids = layer.moe.select(logits.reshape(B * T, E))
            chosen.append(jnp.sum(jax.nn.one_hot(ids, E, dtype=jnp.int32), axis=1).reshape(B, T, E) > 0)
        topw, topi = jax.lax.top_k(jnp.where(jnp.stack(chosen), g, -1.0), cfg.num_experts_per_tok)
        return g, topw, topi


def token_nll(logits_BxTxV: jax.Array, tokens_BxT: jax.Array, mask_BxT: jax.Array | None = None):
    """Next-token NLL. Returns (nll [B, T-1], valid [B, T-1]): position t scores token t+1 given tokens <= t;
    valid where both are real tokens."""
    logp = jax.nn.log_softmax(logits_BxTxV[:, :-1].astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, tokens_BxT[:, 1:, None], axis=-1)[..., 0]
    if mask_BxT is None:
        valid = jnp.ones_like(nll, dtype=bool)
    else:
        m = mask_BxT.astype(bool)
        valid = m[:, 1:] & m[:, :-1]
    return nll, valid


def lm_loss_stats(logits_BxTxV, tokens_BxT, mask_BxT=None):
    """(sum of next-token NLL over valid positions, their count): `lm_loss`'s sums, additive over data shards."""
    nll, valid = token_nll(logits_BxTxV, tokens_BxT, mask_BxT)
    v = valid.astype(jnp.float32)
    return jnp.sum(nll * v), jnp.sum(v)


def lm_loss(logits_BxTxV, tokens_BxT, mask_BxT=None) -> jax.Array:
    """Mean next-token NLL over valid positions (HF's causal-LM loss with padding labels = -100)."""
    total, count = lm_loss_stats(logits_BxTxV, tokens_BxT, mask_BxT)
    return total / jnp.maximum(count, 1.0)


def sample_nll(logits_BxTxV, tokens_BxT, mask_BxT=None) -> jax.Array:
    """Per-sample mean next-token NLL [B] (METHOD §2's l_i)."""
    nll, valid = token_nll(logits_BxTxV, tokens_BxT, mask_BxT)
    v = valid.astype(jnp.float32)
    return jnp.sum(nll * v, axis=1) / jnp.maximum(jnp.sum(v, axis=1), 1.0)


def _stringify(tree):
    if isinstance(tree, dict):
        return {str(k): _stringify(v) for k, v in tree.items()}
    return tree


def get_params(model: MoeLM) -> dict:
    """All parameters as a nested dict with string keys (layer indices as "0", "1", ...): the pytree that
    checkpoints, optimizers and converters exchange."""
    return _stringify(nnx.state(model, nnx.Param).to_pure_dict())


def set_params(model: MoeLM, params: dict) -> None:
    """Inverse of `get_params` (in place). Keys and shapes must match the model exactly."""
    state = nnx.state(model, nnx.Param)
    ref = get_params(model)
    ref_paths = {jax.tree_util.keystr(p): v.shape for p, v in jax.tree_util.tree_leaves_with_path(ref)}
    got_paths = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    if ref_paths.keys() != got_paths.keys():
        missing, extra = sorted(ref_paths.keys() - got_paths.keys()), sorted(got_paths.keys() - ref_paths.keys())
        raise MoegrokError(f"parameters do not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, shape in ref_paths.items():
        if tuple(got_paths[k]) != tuple(shape):
            raise MoegrokError(f"parameter {k}: shape {tuple(got_paths[k])}, model expects {tuple(shape)}")

    def unstringify(ref_tree, tree):
        if isinstance(ref_tree, dict):
            return {k: unstringify(v, tree[str(k)]) for k, v in ref_tree.items()}
        return tree

    nnx.replace_by_pure_dict(state, unstringify(state.to_pure_dict(), params))
    nnx.update(model, state)
