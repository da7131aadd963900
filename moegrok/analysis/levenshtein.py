"""Exact unit-cost Levenshtein distance between integer sequences, bit-parallel in JAX (CPU and GPU).

Algorithm: Myers (1999) bit-vector edit distance in Hyyrö's block form (2003). One sequence (the *pattern*, length
m) is split into blocks of ``WORD_BITS = 31`` positions held in a uint32 word; the other (the *text*, length n) is
consumed one symbol per step. Per block the state is the pair of vertical-delta bit vectors (Pv, Mv) of the current
DP column; a step updates every block with ~20 bitwise ops, and a block passes its horizontal delta to the block
above. Distance = n + popcount(Pv) - popcount(Mv) over the m pattern rows after the last column. Exact for any
lengths and any symbols (they are remapped to dense codes first).

How it is laid out for a vector machine:

- Wavefront: block w processes text column ``t - w`` at step t, so at every step all blocks advance in parallel and
  the horizontal delta block w needs was produced by block w-1 one step earlier. Steps per pair: n + W - 1.
- The horizontal delta travels in bit 31 of the stored words (31 payload bits + 1 scratch bit): the match mask has
  bit 31 forced on, which makes bit 31 of the new Mv/Pv equal the block's outgoing +1/-1 delta. Carrying only
  (Pv, Mv) halves what XLA recomputes per step: a CPU loop fusion recomputes shared subexpressions per output.
- Match masks are bit-sliced: for R = ceil(log2 K) code bits, plane r of a pattern block has bit b set where the
  symbol at b has code bit r; the mask for text code c is ``~OR_r(plane_r XOR (c_r ? ~0 : 0))``. No gather, no
  [alphabet] table, any alphabet size (cost grows with log2 of the number of distinct symbols).
- Pairs are computed in tiles of P patterns x Q texts (state ``[W, Q, P]``, P minor), patterns and texts sorted by
  length so a tile's padding is small; W is rounded up to a few buckets to bound the number of compilations; the
  loop trip count is dynamic. Memory per tile is O(W*Q*P); the [N, M] result is the only large array.
- On CPU a tile's state (~32k words per array) stays in L2 and tiles run on one host thread per core: XLA:CPU
  runs calls from different threads concurrently, which scaled better than letting it split one call's fusions
  (measured). On GPU the tiles are large and issued from one thread.
- The step body is written so that XLA:CPU keeps few passes over memory: only (Pv, Mv) are carried, the
  incoming deltas are packed into one byte per block, and two steps run per loop iteration.

The match-mask idea and the block recurrence are textbook (Myers 1999, Hyyrö 2003); the wavefront layout, bit-31
carry and bit-sliced masks are this module's choices for XLA.
"""
from __future__ import annotations

import functools
import math
import os
import threading
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from moegrok.errors import MoegrokError

WORD_BITS = 31  # pattern rows per uint32 word; bit 31 carries the block's horizontal delta
_HIGH = 1 << 31

__all__ = ["LevenshteinError", "encode_text", "levenshtein_matrix", "levenshtein_pairs", "WORD_BITS"]


class LevenshteinError(MoegrokError, ValueError):
    """Malformed input to the edit-distance functions; the message names the argument and what was expected."""


# ----------------------------------------------------------------------------------------------------------------
# Input normalisation: every input becomes (flat int64 symbols, start offsets, lengths)


def encode_text(strings: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Map strings to their Unicode code points: ``(codes_NxL int32 padded with -1, lengths_N int32)``.

    Any injective char -> int map gives the same edit distances; code points need no shared alphabet, so two
    calls on different string sets stay comparable.
    """
    if isinstance(strings, str):
        raise LevenshteinError("encode_text: expected a sequence of strings, got one str")
    arrs = []
    for k, s in enumerate(strings):
        if not isinstance(s, str):
            raise LevenshteinError(f"encode_text: item {k} is {type(s).__name__}, expected str")
        arrs.append(_codepoints(s))
    lengths = np.array([a.size for a in arrs], np.int32)
    out = np.full((len(arrs), int(lengths.max(initial=0))), -1, np.int32)
    for k, a in enumerate(arrs):
        out[k, : a.size] = a
    return out, lengths


def _codepoints(s: str) -> np.ndarray:
    return np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)


def _int_array(x: Any, what: str) -> np.ndarray:
    """`x` as int64, refusing floats, bools and values outside int64."""
    arr = np.asarray(x)
    if arr.size == 0:
        return np.zeros(arr.shape, np.int64)
    if arr.dtype.kind == "u":
        if arr.dtype.itemsize == 8 and int(arr.max()) >= 2**63:
            raise LevenshteinError(f"{what}: symbol {int(arr.max())} does not fit in int64")
        return arr.astype(np.int64)
    if arr.dtype.kind != "i":
        raise LevenshteinError(f"{what}: expected integer symbols (or a str), got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _normalise(x: Any, lengths: Any, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (symbols flat int64, starts int64 [N], lengths int64 [N]) for a list of sequences or a padded array."""
    if isinstance(x, (str, bytes)):
        raise LevenshteinError(f"{name}: expected a sequence of sequences (e.g. a list of str), got one {type(x).__name__}")
    if isinstance(x, (np.ndarray, jax.Array)) and x.ndim == 2:
        arr = _int_array(x, f"{name} (padded array [N, L])")
        n, width = arr.shape
        if lengths is None:
            lens = np.full(n, width, np.int64)
        else:
            lens = _int_array(lengths, f"{name}_lengths")
            if lens.shape != (n,):
                raise LevenshteinError(f"{name}_lengths: shape {lens.shape}, expected ({n},) to match {name} {arr.shape}")
            if n and (lens.min() < 0 or lens.max() > width):
                raise LevenshteinError(f"{name}_lengths: values must lie in [0, {width}] (the padded width of {name}), "
                                       f"got range [{lens.min()}, {lens.max()}]")
        keep = np.arange(width)[None, :] < lens[:, None]
        starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if n else np.zeros(0, np.int64)
        return arr[keep], starts, lens
    if lengths is not None:
        raise LevenshteinError(f"{name}_lengths is only valid with a padded 2-D integer array {name}; "
                               f"got {name} of type {type(x).__name__}")
    if isinstance(x, (np.ndarray, jax.Array)) and x.ndim != 1:
        raise LevenshteinError(f"{name}: an array must be 2-D [N, L] (padded, with {name}_lengths) or 1-D of "
                               f"sequences; got shape {x.shape}")
    try:
        items = list(x)
    except TypeError:
        raise LevenshteinError(f"{name}: expected a sequence of sequences, got {type(x).__name__}") from None
    parts = []
    for k, s in enumerate(items):
        if isinstance(s, str):
            parts.append(_codepoints(s))
            continue
        a = _int_array(s, f"{name}[{k}]")
        if a.ndim != 1:
            raise LevenshteinError(f"{name}[{k}]: expected a 1-D sequence of integers or a str, got shape {a.shape}")
        parts.append(a)
    lens = np.array([p.size for p in parts], np.int64)
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64) if parts else np.zeros(0, np.int64)
    flat = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    return flat, starts, lens


class _Seqs:
    """A set of sequences as dense codes: flat codes, starts, lengths (all NumPy)."""

    def __init__(self, codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray):
        self.codes, self.starts, self.lengths = codes, starts, lengths

    def __len__(self) -> int:
        return self.lengths.size

    def padded(self, idx: np.ndarray, width: int, offset: int = 0) -> np.ndarray:
        """Codes of sequences `idx` as [len(idx), width] int32, sequence placed at column `offset`, rest 0."""
        out = np.zeros((idx.size, width), np.int32)
        lens = self.lengths[idx]
        col = np.arange(width - offset)
        mask = col[None, :] < lens[:, None]
        src = (self.starts[idx][:, None] + col[None, :])[mask]
        out[:, offset:][mask] = self.codes[src]
        return out


def _code_bits(num_symbols: int) -> int:
    """Bit planes for `num_symbols` dense codes, rounded up to a few sizes to bound the compilations (a spare
    plane is all zeros on both sides and never changes a match)."""
    need = max(1, math.ceil(math.log2(max(num_symbols, 1))))
    return next(b for b in (4, 6, 8, 12, 16, 24, 32) if b >= need)


def _dense(*sets: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[list[_Seqs], int]:
    """Remap the symbols of all sets jointly to codes 0..K-1; returns the sets and the number of code bits."""
    flat = np.concatenate([s[0] for s in sets])
    uniq, inv = np.unique(flat, return_inverse=True)
    bits = _code_bits(uniq.size)
    out, pos = [], 0
    for sym, starts, lens in sets:
        out.append(_Seqs(inv[pos: pos + sym.size].astype(np.int32), starts, lens))
        pos += sym.size
    return out, bits


# ----------------------------------------------------------------------------------------------------------------
# The kernel


def _advance(Pv, Mv, Eq, active):
    """One wavefront step of every block. Pv, Mv, Eq: uint32 [W, ...]; active: bool broadcastable to them.

    Eq must have bit 31 set: then bit 31 of the new Mv (Pv) is the block's outgoing +1 (-1) horizontal delta,
    which block w+1 reads as its incoming delta at the next step. Block 0's incoming delta is +1 (row 0 of the
    DP matrix is 0, 1, 2, ...: global distance)."""
    head = Pv.shape[1:]
    # Incoming deltas packed in one byte per block (bit 0: -1, bit 1: +1): XLA materialises this shifted array
    # between steps, and a byte is a quarter of the memory traffic of two uint32 arrays.
    h = ((Pv[:-1] >> 31) | ((Mv[:-1] >> 31) << 1)).astype(jnp.uint8)
    h = jnp.concatenate([jnp.full((1, *head), 2, jnp.uint8), h], axis=0)
    hin_n = (h & 1).astype(jnp.uint32)
    hin_p = (h >> 1).astype(jnp.uint32)
    Xv = Eq | Mv
    Eq = Eq | hin_n
    Xh = (((Eq & Pv) + Pv) ^ Pv) | Eq
    Ph = Mv | ~(Xh | Pv)
    Mh = Pv & Xh
    Ph = (Ph << 1) | hin_p
    Mh = (Mh << 1) | hin_n
    new_Pv = Mh | ~(Xv | Ph)
    new_Mv = Ph & Xv
    return jnp.where(active, new_Pv, Pv), jnp.where(active, new_Mv, Mv)


def _match_mask(planes_WRx, codes, expand_codes):
    """Bit-sliced match mask: bit b of block w is set where pattern symbol (w, b) has the text symbol's code."""
    R = planes_WRx.shape[1]
    x = None
    for r in range(R):
        rep = jnp.uint32(0) - ((codes >> r) & 1).astype(jnp.uint32)  # all ones where code bit r is set
        y = planes_WRx[:, r] ^ expand_codes(rep)
        x = y if x is None else x | y
    return ~x | jnp.uint32(_HIGH)


def _scan_texts(planes_WRx, low_Wx, text_SxT, tlen_T, n_steps, expand_codes):
    """Run the wavefront over the texts and read the distances off the final state."""
    W = planes_WRx.shape[0]
    widx = jnp.arange(W, dtype=jnp.uint32)
    state_shape = jnp.broadcast_shapes(planes_WRx[:, 0].shape, expand_codes(jnp.zeros((W, *text_SxT.shape[1:]),
                                                                                     jnp.uint32)).shape)

    def body(t, carry):
        Pv, Mv = carry
        # text_SxT row W-1+j holds column j: rows t..t+W-1 reversed give block w the column t-w.
        codes = jnp.flip(jax.lax.dynamic_slice_in_dim(text_SxT, t, W, axis=0), axis=0)
        Eq = _match_mask(planes_WRx, codes, expand_codes)
        col = t.astype(jnp.uint32) - widx  # negative columns wrap to huge values: inactive
        active = expand_codes(col.reshape((W,) + (1,) * (text_SxT.ndim - 1)) < tlen_T.astype(jnp.uint32)[None])
        return _advance(Pv, Mv, Eq, active)

    def two_steps(k, carry):  # two steps per iteration: measured ~10% faster for long patterns (fewer copies)
        return body(2 * k + 1, body(2 * k, carry))

    init = (jnp.full(state_shape, 0xFFFFFFFF, jnp.uint32), jnp.zeros(state_shape, jnp.uint32))
    # An extra step past the last column is a no-op: every block is inactive there.
    Pv, Mv = jax.lax.fori_loop(0, (n_steps + 1) // 2, two_steps, init)
    pc = lambda v: jax.lax.population_count(v & low_Wx).astype(jnp.int32).sum(0)
    return pc(Pv) - pc(Mv)


def _grid_kernel(planes_WRP, low_WP, text_SQ, tlen_Q, n_steps):
    """Distances of P patterns x Q texts: int32 [Q, P]."""
    expand = lambda a: a[..., None]  # [W, Q] -> [W, Q, 1]
    diff = _scan_texts(planes_WRP[:, :, None, :], low_WP[:, None, :], text_SQ, tlen_Q, n_steps, expand)
    return diff + tlen_Q[:, None]


def _pair_kernel(planes_WRB, low_WB, text_SB, tlen_B, n_steps):
    """Distances of B (pattern, text) pairs: int32 [B]."""
    return _scan_texts(planes_WRB, low_WB, text_SB, tlen_B, n_steps, lambda a: a) + tlen_B


@functools.lru_cache(maxsize=None)
def _compiled(kind: str, platform: str):
    fn = {"grid": _grid_kernel, "pair": _pair_kernel}[kind]
    # 512-bit vectors: the body is pure integer logic, AVX-512 halves the instruction count where available.
    opts = {"xla_cpu_prefer_vector_width": 512} if platform == "cpu" else None
    return jax.jit(fn, compiler_options=opts)


# ----------------------------------------------------------------------------------------------------------------
# Host-side tiling


def _bucket(w: int) -> int:
    """Round up: exact to 16, then to an eighth of the enclosing power of two (<= 12.5% padding, few shapes)."""
    if w <= 16:
        return max(w, 1)
    step = (1 << (w.bit_length() - 1)) // 8
    return -(-w // step) * step


def _planes(seqs: _Seqs, idx: np.ndarray, W: int, R: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit planes uint32 [W, R, len(idx)] and valid-row masks uint32 [W, len(idx)] of the patterns `idx`."""
    codes = seqs.padded(idx, W * WORD_BITS).reshape(idx.size, W, WORD_BITS)
    weights = (np.uint32(1) << np.arange(WORD_BITS, dtype=np.uint32))
    planes = np.empty((W, R, idx.size), np.uint32)
    for r in range(R):
        planes[:, r] = (((codes >> r) & 1).astype(np.uint32) * weights).sum(-1, dtype=np.uint32).T
    rows = seqs.lengths[idx][None, :] - WORD_BITS * np.arange(W)[:, None]  # valid rows per block
    low = ((np.uint64(1) << np.clip(rows, 0, WORD_BITS).astype(np.uint64)) - np.uint64(1)).astype(np.uint32)
    return planes, low


def _texts(seqs: _Seqs, idx: np.ndarray, W: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Text codes laid out for the wavefront: int32 [rows, len(idx)], column j at row W-1+j; lengths int32."""
    return seqs.padded(idx, rows, offset=W - 1).T.copy(), seqs.lengths[idx].astype(np.int32)


def _platform() -> str:
    return jax.default_backend()


def _cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def _workers(platform: str) -> int:
    """Host threads issuing kernel calls. XLA:CPU runs calls from different threads concurrently, and that
    scales better than its own splitting of one call's fusions (measured); a GPU needs one stream of big tiles."""
    return _cores() if platform == "cpu" else 1


# Tiling constants. CPU: a tile's state (2 x W*P*Q uint32) should stay in L2 and one tile runs per core;
# GPU: tiles large enough to fill the device.
_CPU_TILE_WORDS = 1 << 15
_GPU_TILE_WORDS = 1 << 24
_CPU_MAX_P = 64
_GPU_MAX_P = 1024


def _pairs_per_tile(W: int, chunk: int | None, platform: str) -> int:
    if chunk is not None:
        if chunk < 1:
            raise LevenshteinError(f"chunk must be a positive number of pairs, got {chunk}")
        return int(chunk)
    return max(8, (_CPU_TILE_WORDS if platform == "cpu" else _GPU_TILE_WORDS) // W)


def _pow2_at_least(n: int, lo: int = 1) -> int:
    return max(lo, 1 << max(0, (int(n) - 1).bit_length()))


def _coarse_at_least(n: int, lo: int) -> int:
    """Smallest lo * 8**k >= n: tile sides come in few sizes (few compilations) yet small inputs get small tiles."""
    size = lo
    while size < n:
        size *= 8
    return size


def _pow2_at_most(n: int) -> int:
    return 1 << (max(int(n), 1).bit_length() - 1)


def _run(kernel, jobs, platform: str) -> None:
    """Run jobs, each ``build() -> (arrays, n_steps, write)``: one kernel call per job, ``write(result)`` stores
    the tile's distances. ``_workers(platform)`` threads take jobs in order (writes touch disjoint entries, or
    entries that get the same value twice)."""
    lock = threading.Lock()
    cursor = [0]
    errors: list[BaseException] = []

    def take():
        with lock:
            if cursor[0] >= len(jobs) or errors:
                return None
            cursor[0] += 1
            return jobs[cursor[0] - 1]

    def worker() -> None:
        try:
            while (build := take()) is not None:
                arrays, n_steps, write = build()
                write(np.asarray(kernel(*arrays, np.int32(n_steps))))
        except BaseException as e:  # re-raised in the caller once every worker has stopped
            with lock:
                errors.append(e)

    n = min(_workers(platform), len(jobs))
    if n <= 1:
        worker()
    else:
        threads = [threading.Thread(target=worker, daemon=True) for _ in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]


def _grid(pat: _Seqs, txt: _Seqs, R: int, out: np.ndarray, symmetric: bool, chunk: int | None) -> None:
    """Fill out[i, j] = d(pat_i, txt_j) (and out[j, i] when symmetric: then pat is txt, upper triangle only)."""
    platform = _platform()
    p_order = np.argsort(pat.lengths, kind="stable")
    t_order = np.argsort(txt.lengths, kind="stable")
    max_text = int(txt.lengths.max(initial=0))
    # Consecutive patterns in length order share a tile: similar lengths, so few padded words per tile.
    P = min(_coarse_at_least(p_order.size, 8), _CPU_MAX_P if platform == "cpu" else _GPU_MAX_P,
            _pow2_at_most(_pairs_per_tile(1, chunk, platform)))
    jobs = []
    for p0 in range(0, p_order.size, P):
        pi = p_order[p0: p0 + P]
        W = _bucket(-(-int(pat.lengths[pi].max()) // WORD_BITS))
        Q = min(_coarse_at_least(t_order.size, 8), max(1, _pow2_at_most(_pairs_per_tile(W, chunk, platform)) // P))
        rows = _pow2_at_least(max_text + 2 * W + 1, 64)  # text height: a power of two, few compilations
        # Symmetric (pat is txt, same order): texts from the tile's first pattern on cover the upper triangle.
        for q0 in range(p0 if symmetric else 0, t_order.size, Q):
            build = functools.partial(_grid_tile, pat, txt, pi, t_order[q0: q0 + Q], W, R, P, Q, rows, out,
                                      symmetric)
            jobs.append(build)
    _run(_compiled("grid", platform), jobs, platform)


def _grid_tile(pat, txt, pi, ti, W, R, P, Q, rows, out, symmetric):
    pad_p = np.concatenate([pi, np.full(P - pi.size, pi[0])])
    pad_t = np.concatenate([ti, np.full(Q - ti.size, ti[0])])
    planes, low = _planes(pat, pad_p, W, R)
    text, tlen = _texts(txt, pad_t, W, rows)

    def write(d_QP: np.ndarray) -> None:
        d_QP = d_QP[: ti.size, : pi.size]
        out[np.ix_(pi, ti)] = d_QP.T
        if symmetric:
            out[np.ix_(ti, pi)] = d_QP

    return (planes, low, text, tlen), int(tlen.max()) + W - 1, write


def levenshtein_matrix(a: Any, b: Any = None, *, a_lengths: Any = None, b_lengths: Any = None,
                       chunk: int | None = None) -> np.ndarray:
    """Exact Levenshtein (unit-cost insert/delete/substitute) distance matrix, int32 ``[N, M]``.

    Args:
      a: N sequences: a list of str / 1-D integer sequences (symbols are arbitrary ints; a str is its code
        points), or a padded integer array ``[N, La]`` with `a_lengths`.
      b: M sequences in the same forms, or None for all pairs of `a` (the full symmetric ``[N, N]`` matrix, zero
        diagonal; each unordered pair is computed once).
      a_lengths, b_lengths: int ``[N]`` / ``[M]`` valid lengths of padded arrays (default: the full width).
      chunk: work per kernel call, in pairs (default: backend dependent). Peak memory is O(chunk * words), never
        ``[N, M, length]``.

    Strings and integer sequences may be mixed (a str is compared through its code points). Runs on JAX's
    default backend; compiled kernels are cached per (word bucket, tile shape, code bits).
    """
    A = _normalise(a, a_lengths, "a")
    if b is None:
        (sa,), R = _dense(A)
        out = np.zeros((len(sa), len(sa)), np.int32)
        if len(sa):
            _grid(sa, sa, R, out, symmetric=True, chunk=chunk)
            np.fill_diagonal(out, 0)
        return out
    B = _normalise(b, b_lengths, "b")
    (sa, sb), R = _dense(A, B)
    out = np.zeros((len(sa), len(sb)), np.int32)
    if len(sa) == 0 or len(sb) == 0:
        return out
    # The pattern side costs ceil(m/31) words per step: put the shorter sequences there.
    if sa.lengths.mean() <= sb.lengths.mean():
        _grid(sa, sb, R, out, symmetric=False, chunk=chunk)
    else:
        out_t = np.zeros((len(sb), len(sa)), np.int32)
        _grid(sb, sa, R, out_t, symmetric=False, chunk=chunk)
        out[:] = out_t.T
    return out


def levenshtein_pairs(a: Any, i: Any, j: Any, b: Any = None, *, a_lengths: Any = None, b_lengths: Any = None,
                      chunk: int | None = None) -> np.ndarray:
    """Distances of listed pairs: int32 ``[P]`` with ``out[k] = d(a[i[k]], (b or a)[j[k]])``.

    Same input forms as :func:`levenshtein_matrix`. Use it for a sparse set of pairs (e.g. a sampled subset);
    for all pairs the matrix form is faster.
    """
    A = _normalise(a, a_lengths, "a")
    sets = [A] if b is None else [A, _normalise(b, b_lengths, "b")]
    dense, R = _dense(*sets)
    sa = dense[0]
    sb = dense[-1]
    ii = _int_array(i, "i").reshape(-1)
    jj = _int_array(j, "j").reshape(-1)
    if ii.shape != jj.shape:
        raise LevenshteinError(f"i and j must have the same length, got {ii.size} and {jj.size}")
    for name, idx, n in (("i", ii, len(sa)), ("j", jj, len(sb))):
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise LevenshteinError(f"{name}: indices must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
    out = np.zeros(ii.size, np.int32)
    if ii.size == 0:
        return out
    # Shorter sequence of each pair on the pattern side; gather both into one joint set to index rows.
    la, lb = sa.lengths[ii], sb.lengths[jj]
    swap = la > lb
    platform = _platform()
    joint = _Seqs(np.concatenate([sa.codes, sb.codes]), np.concatenate([sa.starts, sb.starts + sa.codes.size]),
                  np.concatenate([sa.lengths, sb.lengths]))
    a_row, b_row = ii, jj + len(sa)
    p_row = np.where(swap, b_row, a_row)
    t_row = np.where(swap, a_row, b_row)
    pat_len = np.where(swap, lb, la)
    words = np.array([_bucket(-(-int(m) // WORD_BITS)) for m in pat_len], np.int64)
    order = np.lexsort((np.maximum(la, lb), words))
    max_text = int(np.maximum(la, lb).max())
    jobs = []
    start = 0
    while start < order.size:
        W = int(words[order[start]])
        stop = start + int(np.searchsorted(words[order[start:]], W, side="right"))
        batch = min(_coarse_at_least(stop - start, 64), _pow2_at_most(_pairs_per_tile(W, chunk, platform)))
        rows = _pow2_at_least(max_text + 2 * W + 1, 64)
        for k0 in range(start, stop, batch):
            ks = order[k0: min(k0 + batch, stop)]
            jobs.append(functools.partial(_pair_batch, joint, p_row, t_row, ks, W, R, batch, rows, out))
        start = stop
    _run(_compiled("pair", platform), jobs, platform)
    return out


def _pair_batch(joint, p_row, t_row, ks, W, R, batch, rows, out):
    ks_pad = np.concatenate([ks, np.full(batch - ks.size, ks[0])])
    planes, low = _planes(joint, p_row[ks_pad], W, R)
    text, tlen = _texts(joint, t_row[ks_pad], W, rows)

    def write(d_B: np.ndarray) -> None:
        out[ks] = d_B[: ks.size]

    return (planes, low, text, tlen), int(tlen.max()) + W - 1, write
