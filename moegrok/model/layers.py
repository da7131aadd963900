"""Dense building blocks of the OLMoE decoder: RMSNorm, RoPE, attention with QK-norm (METHOD §8)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moegrok.model import platform as _platform
from moegrok.model.config import MoeConfig


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def normal_param(rngs: nnx.Rngs, shape, std: float, dtype) -> nnx.Param:
    return nnx.Param(jax.random.normal(rngs.params(), shape, jnp.float32).astype(dtype) * std)


class RMSNorm(nnx.Module):
    """Normalise in float32, cast back to the input dtype, then scale (HF's order: weight * x.to(dtype))."""

    def __init__(self, dim: int, eps: float, param_dtype):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype))
        self.eps = eps

    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        x32 = x_BxTxD.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(x_BxTxD.dtype) * x32.astype(x_BxTxD.dtype)


def rope_cos_sin(positions_BxT: jax.Array, head_dim: int, theta: float, dtype):
    """Half-split RoPE tables, float32 math as HF, cast to the activation dtype. Returns cos, sin [B, T, head_dim]."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs_BxTxH2, freqs_BxTxH2], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def rope_tables(T: int, head_dim: int, theta: float, dtype):
    """`rope_cos_sin` for positions 0..T-1 as NumPy constants [1, T, head_dim] (same float32 steps as HF)."""
    inv_freq = np.float32(1.0) / (np.float32(theta) ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    freqs_TxH2 = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]
    emb = np.concatenate([freqs_TxH2, freqs_TxH2], axis=-1)[None]
    return np.cos(emb).astype(dtype), np.sin(emb).astype(dtype)


def apply_rope(x_BxTxNxH: jax.Array, cos_BxTxR: jax.Array, sin_BxTxR: jax.Array) -> jax.Array:
    """Half-split RoPE on the first R dims of each head (R = head_dim unless the rotary factor is partial, as in
    GLM-4.5); the remaining dims pass through."""
    R = cos_BxTxR.shape[-1]
    if R < x_BxTxNxH.shape[-1]:
        return jnp.concatenate([apply_rope(x_BxTxNxH[..., :R], cos_BxTxR, sin_BxTxR), x_BxTxNxH[..., R:]], axis=-1)
    half = R // 2
    rotated = jnp.concatenate([-x_BxTxNxH[..., half:], x_BxTxNxH[..., :half]], axis=-1)
    return x_BxTxNxH * cos_BxTxR[:, :, None, :] + rotated * sin_BxTxR[:, :, None, :]


def attention_impl_for(impl: str, platform: str | None = None, dtype: str = "float32") -> str:
    """The attention path config value `impl` runs: ``auto`` = cuDNN's fused kernel on NVIDIA GPUs in bfloat16
    (it has no float32 kernel), else the einsum path (on CPU `dot_product_attention` measured slower)."""
    if impl != "auto":
        return impl
    platform = platform or _platform.current()
    return "cudnn" if platform == "cuda" and dtype == "bfloat16" else "einsum"


class Attention(nnx.Module):
    """Causal multi-head attention. QK-norm (unless `qk_norm` is off): RMSNorm over the whole q and k projections
    (all heads, OLMoE) or over each head (`qk_norm_per_head`: Qwen3-MoE, GLM-4.5), before RoPE; optional q/k/v
    biases (Qwen2-MoE, GLM-4.5), partial RoPE and a sliding window (Mixtral)."""

    def __init__(self, cfg: MoeConfig, rngs: nnx.Rngs):
        pd = dtype_of(cfg.param_dtype)
        D, hd = cfg.hidden_size, cfg.head_dim
        nq, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
        std = cfg.initializer_range
        self.wq = normal_param(rngs, (D, nq * hd), std, pd)
        self.wk = normal_param(rngs, (D, nkv * hd), std, pd)
        self.wv = normal_param(rngs, (D, nkv * hd), std, pd)
        self.wo = normal_param(rngs, (nq * hd, D), std, pd)
        if cfg.qkv_bias:
            self.bq, self.bk, self.bv = (nnx.Param(jnp.zeros((n * hd,), pd)) for n in (nq, nkv, nkv))
        else:
            self.bq = self.bk = self.bv = None
        per_head = cfg.qk_norm_per_head
        self.q_norm = RMSNorm(hd if per_head else nq * hd, cfg.rms_norm_eps, pd) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd if per_head else nkv * hd, cfg.rms_norm_eps, pd) if cfg.qk_norm else None
        self.per_head_norm = per_head
        self.nq, self.nkv, self.hd = nq, nkv, hd
        self.clip_qkv = cfg.clip_qkv
        self.window = cfg.sliding_window
        self.impl, self.dtype_name = cfg.attention_impl, cfg.dtype

    def __call__(self, x_BxTxD, cos, sin, mask_BxT) -> jax.Array:
        dt = x_BxTxD.dtype
        B, T, D = x_BxTxD.shape
        nq, nkv, hd = self.nq, self.nkv, self.hd
        # One [D, (nq + 2 nkv) hd] projection instead of three: at small widths XLA:CPU's cost is per op (each GEMM
        # and its two backward GEMMs), not per FLOP. Columns are the same, so results equal three separate GEMMs.
        w_qkv = jnp.concatenate([self.wq[...], self.wk[...], self.wv[...]], axis=1).astype(dt)
        qkv = x_BxTxD.reshape(B * T, D) @ w_qkv
        if self.bq is not None:
            qkv = qkv + jnp.concatenate([self.bq[...], self.bk[...], self.bv[...]]).astype(dt)
        q, k, v = jnp.split(qkv, [nq * hd, (nq + nkv) * hd], axis=1)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (jnp.clip(a, -self.clip_qkv, self.clip_qkv) for a in (q, k, v))
        q, k = q.reshape(B, T, nq, hd), k.reshape(B, T, nkv, hd)
        if self.q_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:  # None: positions come from a learned table added to the input instead
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        v = v.reshape(B, T, nkv, hd)
        impl = attention_impl_for(self.impl, None, self.dtype_name)
        if impl != "einsum" and self.window is None:
            out = fused_attention(q, k, v, mask_BxT, impl).reshape(B * T, nq * hd)
            return (out @ self.wo[...].astype(dt)).reshape(B, T, D)
        if nq != nkv:  # grouped-query attention: each kv head serves nq / nkv query heads (HF's repeat_kv)
            k, v = (jnp.repeat(a, nq // nkv, axis=2) for a in (k, v))
        # 4-D [B, heads, T, S] layout: the 5-D grouped einsum made XLA:CPU add layout copies in the backward pass.
        scores = jnp.einsum("bthd,bshd->bhts", q, k) * (hd ** -0.5)
        allowed = jnp.tril(jnp.ones((T, T), bool))
        if self.window is not None:  # HF's sliding window: key s is visible from query t when t - s < window
            allowed = allowed & ~jnp.tril(jnp.ones((T, T), bool), -self.window)
        allowed = allowed[None, None]
        if mask_BxT is not None:  # padding keys are never attended to
            allowed = allowed & mask_BxT[:, None, None, :]
        scores = jnp.where(allowed, scores.astype(jnp.float32), jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dt)
        out = jnp.einsum("bhts,bshd->bthd", probs, v).reshape(B * T, nq * hd)
        return (out @ self.wo[...].astype(dt)).reshape(B, T, D)


class DenseMLP(nnx.Module):
    """SwiGLU feed-forward for the layers a family keeps dense (and for shared experts): down(silu(gate x) * up x)."""

    def __init__(self, D: int, I: int, std: float, pd, rngs: nnx.Rngs):
        self.gate_up = normal_param(rngs, (D, 2 * I), std, pd)  # gate half first
        self.down = normal_param(rngs, (I, D), std, pd)

    def __call__(self, x_NxD: jax.Array) -> jax.Array:
        gate, up = jnp.split(x_NxD @ self.gate_up[...].astype(x_NxD.dtype), 2, axis=-1)
        return (jax.nn.silu(gate) * up) @ self.down[...].astype(x_NxD.dtype)


def fused_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_BxT, impl: str):
    """`jax.nn.dot_product_attention`, causal. ``cudnn`` takes padding as per-row key lengths (rows must be right
    padded, as every moegrok batch is); ``xla`` takes the key mask itself, so any padding works."""
    hd = q_BxTxNxH.shape[-1]
    if mask_BxT is None:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale=hd ** -0.5, is_causal=True,
                                            implementation=impl)
    if impl == "cudnn":
        lengths = jnp.sum(mask_BxT, axis=1).astype(jnp.int32)
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale=hd ** -0.5, is_causal=True,
                                            key_value_seq_lengths=lengths, implementation="cudnn")
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, scale=hd ** -0.5, is_causal=True,
                                        mask=mask_BxT[:, None, None, :], implementation=impl)
