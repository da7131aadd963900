"""Hugging Face MoE checkpoints <-> `MoeLM`, for every family in `moegrok.families`.

A HF directory holds `config.json` and either `model.safetensors` or shards listed in `model.safetensors.index.json`.
Hub checkpoints (and `save_pretrained`) store experts one by one (`model.layers.N.mlp.experts.M.gate_proj.weight`,
Mixtral's `block_sparse_moe.experts.M.w1.weight`, torch Linear `[out, in]`); transformers 5 keeps them fused in
memory (`mlp.experts.gate_up_proj [E, 2I, D]`, gate half first, and `mlp.experts.down_proj [E, D, I]`), and we read
that layout too. Our parameters are `[in, out]`; experts are `gate_up [E, D, 2I]`, `down [E, I, D]`. Which tensor
goes where is `moegrok.families.tensor_map`, the one map the loader and the writer share.

Loading streams: the model is built abstractly and filled one parameter at a time from plain file reads, so peak
memory stays near one copy of the weights. Everything about the checkpoint (keys, shapes, dtypes, shards, byte
ranges) is validated from the headers before any tensor data is read.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from moegrok.convert import safetensors_io as st
from moegrok.errors import MoegrokError
from moegrok.families import config_from_hf, family, hf_config_kwargs, hf_config_object, tensor_map
from moegrok.families.base import ignored
from moegrok.model.config import DTYPES, MoeConfig
from moegrok.rundir import atomic_dir

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_CODES = ("F32", "BF16", "F16", "F64")
IGNORED_KEY = re.compile(r".*rotary_emb\.inv_freq$")  # a buffer some older exports carry; recomputed, never loaded


# ----------------------------------------------------------------------------------------------------- config
def moe_config_from_hf_json(d: Mapping[str, Any], where: str = CONFIG, **overrides: Any) -> MoeConfig:
    """A HF `config.json` dict of any JAX family -> MoeConfig."""
    return config_from_hf(d, where, **overrides)


def hf_config_dict(cfg: MoeConfig, dtype: str) -> dict[str, Any]:
    """The config.json we write: the family's transformers config as HF serialises it, plus architecture and
    dtype."""
    hf = hf_config_object(cfg)
    hf.architectures = [family(cfg.family).architecture]
    d = json.loads(hf.to_json_string(use_diff=True))
    d["dtype"] = dtype
    return d


def read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise MoegrokError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MoegrokError(f"{path}: not valid JSON ({e})") from None


# -------------------------------------------------------------------------------------------- tensor mapping
def fused_layers(cfg: MoeConfig, index: Mapping[str, Any]) -> frozenset[int]:
    """MoE layers whose checkpoint holds the experts fused (transformers 5's in-memory layout)."""
    m = family(cfg.family).moe_module
    return frozenset(i for i in cfg.moe_layer_ids if f"model.layers.{i}.{m}.experts.gate_up_proj" in index)


def param_maps(cfg: MoeConfig, fused: frozenset[int] = frozenset()):
    return tensor_map(cfg, family(cfg.family), fused)


def expected_hf_shapes(cfg: MoeConfig, fused: frozenset[int] = frozenset()) -> dict[str, tuple[int, ...]]:
    """Every HF tensor a checkpoint of `cfg` must hold, with its shape (torch `[out, in]` layout)."""
    return {part.key: part.hf_shape for pm in param_maps(cfg, fused) for part in pm.parts}


# ------------------------------------------------------------------------------------------- checkpoint files
def checkpoint_index(path: str | os.PathLike) -> dict[str, st.TensorInfo]:
    """{HF key: where its bytes are} over a single file or all shards, every header validated."""
    path = Path(path)
    if (path / INDEX).is_file():
        index_path = path / INDEX
        raw = read_json(index_path, "shard index")
        wmap = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(wmap, dict) or not all(isinstance(v, str) for v in wmap.values()):
            raise MoegrokError(f"{index_path}: field 'weight_map' must map tensor names to shard file names")
        by_file: dict[str, list[str]] = {}
        for key, fname in wmap.items():
            by_file.setdefault(fname, []).append(key)
        out: dict[str, st.TensorInfo] = {}
        for fname, keys in by_file.items():
            shard = path / fname
            if not shard.is_file():
                raise MoegrokError(f"{shard}: missing shard ({INDEX} lists {len(keys)} tensor(s) in it, e.g. "
                                   f"'{keys[0]}')")
            infos, _ = st.read_header(shard)
            for key in keys:
                if key not in infos:
                    raise MoegrokError(f"{shard}: has no tensor '{key}', but {INDEX} says it is there")
                out[key] = infos[key]
        return out
    if (path / SINGLE).is_file():
        return st.read_header(path / SINGLE)[0]
    if not path.is_dir():
        raise MoegrokError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    found = sorted(p.name for p in path.iterdir())[:10]
    raise MoegrokError(f"{path}: no {SINGLE} or {INDEX} (found {found}); only safetensors checkpoints are supported")


def _check_against_config(index: Mapping[str, st.TensorInfo], cfg: MoeConfig, fused: frozenset[int],
                          where: Path) -> None:
    fam = family(cfg.family)
    expected = expected_hf_shapes(cfg, fused)
    summary = (f"config.json says model_type={cfg.family!r}, num_hidden_layers={cfg.num_hidden_layers}, "
               f"num_experts={cfg.num_experts}, hidden_size={cfg.hidden_size}, "
               f"intermediate_size={cfg.intermediate_size}")
    missing = [k for k in expected if k not in index]
    if missing:
        raise MoegrokError(f"{where}: checkpoint lacks {len(missing)} tensor(s) the config needs, e.g. "
                           f"'{missing[0]}' (expected shape {expected[missing[0]]}); {summary}")
    for key, shape in expected.items():
        info = index[key]
        if info.shape != shape:
            raise MoegrokError(f"{info.file}: tensor '{key}' has shape {info.shape}, but config.json implies "
                               f"{shape}; {summary}")
        if info.dtype not in FLOAT_CODES:
            raise MoegrokError(f"{info.file}: tensor '{key}' has dtype {info.dtype}, expected a float type "
                               f"{FLOAT_CODES}")
    tolerated = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    extra = [k for k in index if k not in expected and k not in tolerated and not IGNORED_KEY.match(k)
             and not ignored(fam, cfg, k)]
    if extra:
        raise MoegrokError(f"{where}: checkpoint has {len(extra)} tensor(s) the config does not account for, e.g. "
                           f"'{extra[0]}' (config and weights disagree?); {summary}")
    if cfg.tie_word_embeddings and "lm_head.weight" in index and index["lm_head.weight"].shape != (
            cfg.vocab_size, cfg.hidden_size):
        raise MoegrokError(f"{where}: tensor 'lm_head.weight' has shape {index['lm_head.weight'].shape}, expected "
                           f"{(cfg.vocab_size, cfg.hidden_size)}")


def _resolve_dtype(dtype: str | None, cfg_json: Mapping, index: Mapping[str, st.TensorInfo]) -> str:
    if dtype is not None:
        if dtype not in DTYPES:
            raise MoegrokError(f"dtype must be one of {DTYPES} or None (keep the checkpoint's), got {dtype!r}")
        return dtype
    declared = cfg_json.get("dtype") or cfg_json.get("torch_dtype")
    if declared in DTYPES:
        return declared
    codes = {info.dtype for info in index.values()}
    return "bfloat16" if codes == {"BF16"} else "float32"


class _Reader:
    """Open handles on the shards, one buffered read per tensor."""

    def __init__(self, index: Mapping[str, st.TensorInfo], on_read: Callable[[], None] | None = None):
        self.index, self.on_read, self.files = index, on_read, {}
        self._scratch: dict[tuple, np.ndarray] = {}

    def __call__(self, key: str, aligned: bool = False, scratch: bool = False) -> np.ndarray:
        """scratch: read into a buffer reused for every tensor of the same shape and dtype (valid until the next
        such read). Thousands of per-expert tensors then cost one allocation, not thousands of fresh, page-faulting
        ones."""
        info = self.index[key]
        if info.file not in self.files:
            try:
                self.files[info.file] = open(info.file, "rb")
            except OSError as e:
                raise MoegrokError(f"{info.file}: cannot open ({e.strerror or e})") from None
        buf = None
        if scratch:
            buf = self._scratch.setdefault((info.shape, info.dtype), np.empty(info.shape, st.DTYPES[info.dtype]))
        out = st.read_tensor(info, self.files[info.file], aligned=aligned, out=buf)
        if self.on_read:
            self.on_read()
        return out

    def close(self):
        for f in self.files.values():
            f.close()
        self._scratch.clear()


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def _host_to_device(a: np.ndarray):
    """On CPU, adopt the (64-byte aligned) host buffer instead of copying it: this is what keeps peak memory near
    one copy of the weights. The caller must not write to `a` afterwards."""
    import jax

    return jax.device_put(a, may_alias=True)


def _assign(dst: np.ndarray, src: np.ndarray, transposed: bool = False) -> None:
    """dst[...] = src.T if transposed else src, for 2-D src. Same-dtype copies go through an unsigned-integer view
    (bit-identical; numpy copies ml_dtypes' bfloat16 ~2x slower than uint16), and transposes go tile by
    tile, which keeps both sides in cache (~4x faster than one strided copy)."""
    if dst.dtype == src.dtype:
        as_uint = np.dtype(f"u{dst.dtype.itemsize}")
        dst, src = dst.view(as_uint), src.view(as_uint)
    if not transposed:
        dst[...] = src
        return
    rows, cols = 128, 1024  # a 128 x 1024 tile of a 2-byte dtype is 256 KiB: both sides stay in L2
    for r in range(0, dst.shape[0], rows):
        for c in range(0, dst.shape[1], cols):
            dst[r:r + rows, c:c + cols] = src[c:c + cols, r:r + rows].T


def _read_in_place(pm, index: Mapping[str, st.TensorInfo], np_dtype) -> bool:
    """One tensor already in our layout and dtype: the read buffer itself becomes the parameter."""
    only = pm.parts[0]
    return len(pm.parts) == 1 and not only.transposed and index[only.key].dtype == st.CODES[np.dtype(np_dtype)]


def _temporary_bytes(pm, index: Mapping[str, st.TensorInfo], np_dtype) -> int:
    """Bytes read into a fresh buffer besides the parameter itself (per-expert parts reuse one scratch buffer)."""
    if _read_in_place(pm, index, np_dtype) or pm.experts:
        return 0
    return max(index[p.key].nbytes for p in pm.parts)


def _build_params(maps, read: _Reader, np_dtype, put: Callable[[np.ndarray], Any]) -> dict:
    """Our parameter pytree (string keys, as `get_params`), one parameter at a time through `put`. Every array
    handed to `put` is fresh, C-contiguous and 64-byte aligned; at most one staging buffer is alive at a time."""
    params: dict = {}
    # Parameters that need a temporary copy of a whole tensor (a transposed LM head: 98 MiB for OLMoE's vocabulary in
    # bf16) go first, while little else is resident: last, they raised the peak by that copy (1.18x -> 1.25x).
    for pm in sorted(maps, key=lambda pm: -_temporary_bytes(pm, read.index, np_dtype)):
        only = pm.parts[0]
        if _read_in_place(pm, read.index, np_dtype):
            arr = read(only.key, aligned=True)
        else:
            arr = st.aligned_empty(pm.shape, np_dtype)
            for part in pm.parts:
                src = read(part.key, scratch=pm.experts)
                dst = arr[part.index]
                if part.stacked:  # a fused [E, out, in] stack: transpose expert by expert
                    for e in range(src.shape[0]):
                        _assign(dst[e], src[e], transposed=True)
                elif src.ndim == 2:
                    _assign(dst, src, part.transposed)
                else:
                    dst[...] = src
                del src
        _set_path(params, pm.path, put(arr))
        del arr  # before the next staging buffer is allocated
    return params


def load_hf(path: str | os.PathLike, dtype: str | None = None, moe_impl: str = "auto", *, progress: bool = False):
    """Load a Hugging Face MoE checkpoint directory of any JAX family (`moegrok.families.FAMILIES`: olmoe,
    mixtral, qwen2_moe, qwen3_moe, glm4_moe) into a `MoeLM`, dispatching on config.json's `model_type`.

    `out = model(tokens_BxT)` gives `out.logits [B, T, V]` and `out.router_logits [L_moe, B, T, E]`: the routers'
    pre-activation scores of the MoE layers only (before softmax or sigmoid, without a selection bias).
    dtype: "float32" or "bfloat16" for parameters and activations; None keeps the checkpoint's (config.json's
    `dtype`/`torch_dtype`, else the tensors'). Per-expert and fused expert layouts are both accepted.
    Raises MoegrokError naming the file and tensor for any defect, before reading tensor data where possible.
    """
    from flax import nnx

    from moegrok.model.model import MoeLM, set_params

    path = Path(path)
    if not path.is_dir():
        raise MoegrokError(f"{path}: not a directory (expected a Hugging Face checkpoint directory)")
    cfg_json = read_json(path / CONFIG, "the model config")
    cfg = moe_config_from_hf_json(cfg_json, str(path / CONFIG), moe_impl=moe_impl)
    index = checkpoint_index(path)
    fused = fused_layers(cfg, index)
    _check_against_config(index, cfg, fused, path)
    dt = _resolve_dtype(dtype, cfg_json, index)
    cfg = cfg.replace(dtype=dt, param_dtype=dt)
    np_dtype = st.DTYPES["BF16" if dt == "bfloat16" else "F32"]
    maps = param_maps(cfg, fused)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(len(pm.parts) for pm in maps), desc=f"loading {path.name}", unit="tensor")
    reader = _Reader(index, on_read=bar.update if bar else None)
    try:
        params = _build_params(maps, reader, np_dtype, _host_to_device)
    finally:
        reader.close()
        if bar:
            bar.close()
    model = nnx.eval_shape(lambda: MoeLM(cfg))
    set_params(model, params)
    return model


def load_olmoe(path: str | os.PathLike, dtype: str | None = None, moe_impl: str = "auto", *,
               progress: bool = False):
    """`load_hf` (kept for the name OLMoE users know; loads every JAX family)."""
    return load_hf(path, dtype, moe_impl, progress=progress)


# ---------------------------------------------------------------------------------------------------- saving
def parse_size(size: int | str) -> int:
    """'5GB' -> 5 * 10**9, '500MiB' -> 500 * 2**20 (HF's convention: GB decimal, GiB binary)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(size), re.IGNORECASE)
    if not m:
        raise MoegrokError(f"max_shard_size {size!r}: expected a byte count or e.g. '5GB', '500MB', '2GiB'")
    unit = (m.group(2) or "B").upper()
    mult = 1 if unit == "B" else (1024 if "I" in unit else 1000) ** ("KMGT".index(unit[0]) + 1)
    n = int(float(m.group(1)) * mult)
    if n < 1:
        raise MoegrokError(f"max_shard_size {size!r} must be positive")
    return n


def _hf_specs(cfg: MoeConfig, params: Mapping, np_dtype) -> list[st.TensorSpec]:
    """Every HF tensor (per-expert layout) as a lazy spec reading from our pytree, parameter by parameter (so a
    parameter is fetched to the host once)."""
    cache: dict[str, Any] = {}

    def host(path: tuple[str, ...]) -> np.ndarray:
        # One parameter on the host at a time; on CPU np.asarray of a jax array is a view, elsewhere a copy.
        if cache.get("path") != path:
            node = params
            for p in path:
                node = node[p]
            cache.clear()
            cache.update(path=path, array=np.asarray(node))
        return cache["array"]

    scratch: dict[tuple, np.ndarray] = {}

    def export(pm, part) -> st.TensorSpec:
        # write_file consumes each tensor before producing the next, so one output buffer per shape suffices.
        def produce():
            out = scratch.setdefault(part.hf_shape, np.empty(part.hf_shape, np_dtype))
            src = host(pm.path)[part.index]
            if src.ndim == 2:
                _assign(out, src, part.transposed)
            else:
                out[...] = src
            return out
        return st.TensorSpec(part.key, np_dtype, part.hf_shape, produce)

    return [export(pm, part) for pm in param_maps(cfg) for part in pm.parts]


def _plan_shards(specs: list[st.TensorSpec], max_bytes: int) -> list[list[st.TensorSpec]]:
    """Greedy, in order: a new shard when the next tensor would overflow a non-empty one."""
    shards: list[list[st.TensorSpec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and size + s.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def save_hf(model, path: str | os.PathLike, max_shard_size: int | str = "5GB", *, dtype: str | None = None,
            overwrite: bool = False, progress: bool = False) -> Path:
    """Write `model` as a Hugging Face directory of its family (`AutoModelForCausalLM.from_pretrained` loads it).

    Per-expert keys, safetensors with metadata {"format": "pt"}, sharded with `model.safetensors.index.json` when
    larger than `max_shard_size`. dtype: None keeps the parameters' dtype. Atomic: written into a temporary
    directory beside `path` and renamed into place; an existing non-empty `path` needs `overwrite=True`.
    """
    from moegrok.model.model import get_params

    cfg: MoeConfig = model.cfg
    hf_config_kwargs(cfg)  # refuses switches the family's HF class cannot express, before anything is written
    out_dtype = dtype or cfg.param_dtype
    if out_dtype not in DTYPES:
        raise MoegrokError(f"dtype must be one of {DTYPES} or None, got {out_dtype!r}")
    np_dtype = st.DTYPES["BF16" if out_dtype == "bfloat16" else "F32"]
    target = Path(path)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise MoegrokError(f"{target}: already exists and is not empty (pass overwrite=True / --overwrite)")
    shards = _plan_shards(_hf_specs(cfg, get_params(model), np_dtype), parse_size(max_shard_size))
    config = hf_config_dict(cfg, out_dtype)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=sum(map(len, shards)), desc=f"writing {target.name}", unit="tensor")
    try:
        with atomic_dir(target) as tmp:
            names = [SINGLE] if len(shards) == 1 else \
                [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
            for name, shard in zip(names, shards):
                st.write_file(tmp / name, shard, {"format": "pt"}, on_tensor=(lambda _: bar.update(1)) if bar else None)
            if len(shards) > 1:
                index = {"metadata": {"total_size": sum(s.nbytes for sh in shards for s in sh)},
                         "weight_map": {s.name: name for name, sh in zip(names, shards) for s in sh}}
                (tmp / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
    finally:
        if bar:
            bar.close()
    return target


def save_olmoe(model, path: str | os.PathLike, max_shard_size: int | str = "5GB", **kw: Any) -> Path:
    """`save_hf` (kept for the name OLMoE users know)."""
    return save_hf(model, path, max_shard_size, **kw)


__all__ = ["load_hf", "save_hf", "load_olmoe", "save_olmoe", "moe_config_from_hf_json", "checkpoint_index",
           "expected_hf_shapes", "parse_size", "hf_config_dict"]
