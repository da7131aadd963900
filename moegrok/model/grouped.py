"""Dropless grouped SwiGLU over expert-sorted tokens, in fixed-size tiles: the CPU path of the ragged experts.

Why: on CPU, `lax.ragged_dot` lowers to a masked dense dot over every expert, so it costs E/k times the useful
work and is slower than computing all experts. Here the (token, expert) assignments are sorted by expert, each
expert's run is padded to a multiple of `b` rows, and a scan runs one [b, D] x [D, 2I] and [b, I] x [I, D] matmul per
tile with that tile's expert weights; tiles past the last used one are skipped. Work is the top-k work plus < b
padding rows per expert. The VJP is written by hand so the weight gradients accumulate in place per expert instead
of as a full [E, ...] zero-plus-add per tile (what autodiff of the scan would produce).

`unroll=True` unrolls the tile loops when they are short (<= UNROLL_UP_TO tiles). Measured on the default study
model: with one XLA device per CPU core (data parallel), the train step took 68 ms with rolled loops and 46 ms
unrolled; on a single device it makes no difference and costs compile time, so it is not the default. It is a
separate pair of functions, not a flag read at trace time, because JAX caches the traces of custom-VJP rules.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

UNROLL_UP_TO = 64


CACHED_EXPERT_BYTES = 1 << 20  # an expert's weights up to this size stay in cache from one tile to the next


def tile_rows(num_assignments: int, num_experts: int, unrolled: bool = False, expert_bytes: int = 0) -> int:
    """Rows per tile: large enough to keep matmuls efficient, small enough that the padding (< one tile per
    expert) stays a small fraction of the work. Unrolled loops take tiles up to twice as large: half as many
    tiles to compile (default study model on 2 devices: 11 vs 15-17 s) at the same step time (38-40 vs 40-41 ms).

    Experts too large for the cache (`expert_bytes`, e.g. OLMoE's 24 MiB in float32) are read from memory once per
    tile, and at 16 rows a tile's matmul is memory-bound: there tiles grow to about one per expert (the average
    assignments per expert, up to 128 rows), trading padding for reads. Measured for one OLMoE-shaped layer (1,024
    tokens, 64 experts x 2048 x 1024, top-8, 2-core CPU): 16 rows 3.2 s, 64 rows 2.0-2.6 s, 128 rows 2.0 s."""
    b = 8
    while b < 128 and 2 * b * num_experts * (2 if unrolled else 4) <= num_assignments:
        b *= 2
    if expert_bytes > CACHED_EXPERT_BYTES:
        while b < 128 and b < num_assignments / num_experts:
            b *= 2
    return b


def _forward(xs_TxbxD, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD, unroll):
    T, b, D = xs_TxbxD.shape
    two_i = gate_up_ExDx2I.shape[-1]

    def tile(x_bxD, e):
        gu_bx2I = x_bxD @ gate_up_ExDx2I[e]
        g, u = jnp.split(gu_bx2I, 2, axis=-1)
        return (jax.nn.silu(g) * u) @ down_ExIxD[e], gu_bx2I

    def skip(x_bxD, e):
        return jnp.zeros((b, D), xs_TxbxD.dtype), jnp.zeros((b, two_i), xs_TxbxD.dtype)

    def body(_, inp):
        t, x_bxD, e = inp
        return None, jax.lax.cond(t < n_used, tile, skip, x_bxD, e)

    _, (ys_TxbxD, gu_Txbx2I) = jax.lax.scan(body, None, (jnp.arange(T), xs_TxbxD, tile_e_T), unroll=unroll)
    return ys_TxbxD, gu_Txbx2I


def _backward(res, dys_TxbxD, unroll):
    xs, gu_all, tile_e, n_used, gate_up, down = res
    T = xs.shape[0]
    f32 = jnp.float32

    def tile(carry, x_bxD, gu_bx2I, e, dy_bxD):
        dgu_acc, dd_acc = carry
        g, u = jnp.split(gu_bx2I, 2, axis=-1)
        sig = jax.nn.sigmoid(g)
        silu = g * sig
        a_bxI = silu * u
        da = dy_bxD @ down[e].T
        dd_acc = dd_acc.at[e].add(jnp.dot(a_bxI.T, dy_bxD, preferred_element_type=f32))
        dg = da * u * (sig * (1 + g * (1 - sig)))  # d silu(g) / dg = sig * (1 + g (1 - sig))
        dgu = jnp.concatenate([dg, da * silu], axis=-1)
        dgu_acc = dgu_acc.at[e].add(jnp.dot(x_bxD.T, dgu, preferred_element_type=f32))
        return (dgu_acc, dd_acc), dgu @ gate_up[e].T

    def skip(carry, x_bxD, gu_bx2I, e, dy_bxD):
        return carry, jnp.zeros_like(x_bxD)

    def body(carry, inp):
        t, x, gu, e, dy = inp
        return jax.lax.cond(t < n_used, tile, skip, carry, x, gu, e, dy)

    init = (jnp.zeros(gate_up.shape, f32), jnp.zeros(down.shape, f32))
    (dgu_w, dd_w), dxs = jax.lax.scan(body, init, (jnp.arange(T), xs, gu_all, tile_e, dys_TxbxD), unroll=unroll)
    return dxs, None, None, dgu_w.astype(gate_up.dtype), dd_w.astype(down.dtype)


@functools.cache
def swiglu_tiles(unroll: bool):
    """The tile loop as a custom-VJP function `(xs_TxbxD, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD) -> ys`:
    per tile t < n_used, silu(x W_gu[e, :, :I]) * (x W_gu[e, :, I:]) @ W_down[e] with e = tile_e[t]; zeros after.
    `unroll`: unroll loops of at most UNROLL_UP_TO tiles."""
    def steps(T):
        return True if unroll and T <= UNROLL_UP_TO else 1

    @jax.custom_vjp
    def f(xs_TxbxD, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD):
        return _forward(xs_TxbxD, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD, steps(xs_TxbxD.shape[0]))[0]

    def fwd(xs_TxbxD, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD):
        ys, gu = _forward(xs_TxbxD, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD, steps(xs_TxbxD.shape[0]))
        return ys, (xs_TxbxD, gu, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD)

    def bwd(res, dys_TxbxD):
        return _backward(res, dys_TxbxD, steps(dys_TxbxD.shape[0]))

    f.defvjp(fwd, bwd)
    return f


COUNTING_SORT_UP_TO = 16


def expert_ranks(flat_e_M: jax.Array, num_experts: int):
    """(rank of each assignment among those to its expert, in order [M]; assignments per expert [E]).

    Small E: a counting sort (a cumsum over one-hot ids) -- on CPU a comparator sort of 4,096 ids cost 0.58 ms
    against 0.24 ms for the cumsum at E = 8; its O(M E) work loses past E = 16 (E = 64, M = 12,288: 4.0 vs
    1.9 ms), where one stable argsort, inverted by a scatter, runs instead."""
    M = flat_e_M.shape[0]
    if num_experts <= COUNTING_SORT_UP_TO:
        onehot_MxE = (flat_e_M[:, None] == jnp.arange(num_experts, dtype=jnp.int32)[None]).astype(jnp.int32)
        csum_MxE = jnp.cumsum(onehot_MxE, axis=0)
        return jnp.sum(csum_MxE * onehot_MxE, axis=1) - 1, csum_MxE[-1]
    order = jnp.argsort(flat_e_M, stable=True)  # sorted position -> assignment
    sizes_E = jnp.bincount(flat_e_M, length=num_experts).astype(jnp.int32)
    position_M = jnp.zeros((M,), jnp.int32).at[order].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    return position_M - (jnp.cumsum(sizes_E) - sizes_E)[flat_e_M], sizes_E


def experts_tiled(x_NxD, gate_up_ExDx2I, down_ExIxD, topw_Nxk, topi_Nxk, tile: int | None = None,
                  unroll: bool = False):
    """Same contract as `moe.experts_ragged`: sum_j topw[n, j] * SwiGLU_{topi[n, j]}(x[n]), dropless."""
    N, k = topi_Nxk.shape
    E = gate_up_ExDx2I.shape[0]
    M = N * k
    expert_bytes = (gate_up_ExDx2I[0].size + down_ExIxD[0].size) * gate_up_ExDx2I.dtype.itemsize
    b = tile or tile_rows(M, E, unrolled=unroll, expert_bytes=expert_bytes)
    T = -(-M // b) + E  # enough tiles for any routing: each expert wastes < one tile
    flat_e = topi_Nxk.reshape(-1).astype(jnp.int32)
    rank_M, sizes_E = expert_ranks(flat_e, E)
    tiles_E = (sizes_E + b - 1) // b
    tile_end_E = jnp.cumsum(tiles_E)
    tile_start_E = tile_end_E - tiles_E
    n_used = tile_end_E[-1]
    tile_e_T = jnp.minimum(jnp.searchsorted(tile_end_E, jnp.arange(T), side="right"), E - 1).astype(jnp.int32)

    # Assignment -> its tile slot, and back (a scatter of M ids; padding slots read row 0 and are zeroed).
    slot_M = tile_start_E[flat_e] * b + rank_M
    src = jnp.full((T * b,), M, jnp.int32).at[slot_M].set(jnp.arange(M, dtype=jnp.int32), unique_indices=True)
    valid = src < M
    xs = jnp.where(valid[:, None], x_NxD[jnp.where(valid, src, 0) // k], 0).reshape(T, b, -1)

    ys = swiglu_tiles(unroll)(xs, tile_e_T, n_used, gate_up_ExDx2I, down_ExIxD).reshape(T * b, -1)
    y_NxkxD = ys[slot_M].reshape(N, k, -1)
    return jnp.einsum("nk,nkd->nd", topw_Nxk.astype(y_NxkxD.dtype), y_NxkxD)
