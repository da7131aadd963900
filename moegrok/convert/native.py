"""The project-native model checkpoint, and reading the model out of a training run directory.

Model directory::

    DIR/moegrok_model.json   {"format": "moegrok-model/1", "config": MoeConfig.to_dict()}
    DIR/params/              orbax StandardCheckpointer of `get_params(model)` (string-keyed nested dict)

Run directory (written by the trainer): the same `params` pytree is the item "params" of each orbax
CheckpointManager step, `RUN_DIR/checkpoints/<step>/params`, and the model config is `RUN_DIR/config.yaml`'s
section `model`.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moegrok.errors import MoegrokError
from moegrok.rundir import atomic_dir
from moegrok.model.config import DTYPES, MoeConfig

FORMAT = "moegrok-model/1"
MANIFEST = "moegrok_model.json"
PARAMS = "params"


def is_model_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def is_run_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "checkpoints").is_dir() and (Path(path) / "config.yaml").is_file()


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def save_model(model, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write `model` as a native model directory, atomically (temporary directory beside `path`, then rename)."""
    from moegrok.model.model import get_params

    target = Path(path)
    if target.exists() and not overwrite and (not target.is_dir() or any(target.iterdir())):
        raise MoegrokError(f"{target}: already exists and is not empty (pass overwrite=True / --overwrite)")
    with atomic_dir(target) as tmp:
        ck = _checkpointer()
        try:
            ck.save(tmp / PARAMS, get_params(model))
            ck.wait_until_finished()
        finally:
            ck.close()
        manifest = {"format": FORMAT, "config": model.cfg.to_dict()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    return target


def _read_manifest(path: Path) -> MoeConfig:
    mpath = path / MANIFEST
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise MoegrokError(f"{mpath}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise MoegrokError(f"{mpath}: field 'format' is {got!r}, expected {FORMAT!r}")
    if not isinstance(manifest.get("config"), dict):
        raise MoegrokError(f"{mpath}: field 'config' must be an object of MoeConfig fields")
    return _config_from(manifest["config"], f"{mpath}: field 'config'")


def _config_from(fields: dict, where: str) -> MoeConfig:
    try:
        return MoeConfig.from_dict(fields)
    except (MoegrokError, TypeError) as e:
        raise MoegrokError(f"{where}: {e}") from None


def _run_config(rd) -> MoeConfig:
    raw = rd.config
    if not isinstance(raw.get("model"), dict):
        raise MoegrokError(f"{rd.path / 'config.yaml'}: needs a section 'model' with the MoeConfig fields")
    return _config_from(raw["model"], f"{rd.path / 'config.yaml'}: section 'model'")


def _locate(path: Path, step: int | None) -> tuple[MoeConfig, Path]:
    if is_model_dir(path):
        if step is not None:
            raise MoegrokError(f"{path}: a model directory has a single checkpoint; step={step} applies to run "
                               f"directories only")
        return _read_manifest(path), path / PARAMS
    if is_run_dir(path):
        from moegrok.rundir import RunDir

        rd = RunDir(path)
        steps = rd.checkpoint_steps
        if not steps:
            raise MoegrokError(f"{path / 'checkpoints'}: no completed checkpoint step with a '{PARAMS}' item")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise MoegrokError(f"{path / 'checkpoints'}: no step {step}; available steps: {steps}")
        return _run_config(rd), rd.checkpoint_item(step, PARAMS)
    if not path.exists():
        raise MoegrokError(f"{path}: does not exist")
    raise MoegrokError(f"{path}: neither a moegrok model directory ({MANIFEST}) nor a run directory "
                       f"(config.yaml + checkpoints/)")


def _stored_shapes(ck, params_dir: Path) -> dict[str, tuple]:
    import jax

    try:
        meta = ck.metadata(params_dir)
    except Exception as e:  # orbax raises assorted types for a damaged directory: name the directory
        raise MoegrokError(f"{params_dir}: unreadable orbax checkpoint ({type(e).__name__}: {e})") from None
    tree = getattr(meta, "item_metadata", None) or getattr(meta, "tree", None) or meta
    out = {}
    for p, leaf in jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape")):
        if hasattr(leaf, "shape"):
            out[jax.tree_util.keystr(p)] = tuple(leaf.shape)
    return out


def load_model(path: str | os.PathLike, *, step: int | None = None, dtype: str | None = None,
               moe_impl: str | None = None):
    """A `MoeLM` from a native model directory or a run directory (latest checkpoint step unless `step`).

    dtype: "float32"/"bfloat16" converts parameters and activations; None keeps the stored config's.
    """
    import jax
    from flax import nnx

    from moegrok.model.model import MoeLM, get_params, set_params

    path = Path(path).absolute()
    cfg, params_dir = _locate(path, step)
    if dtype is not None and dtype not in DTYPES:
        raise MoegrokError(f"dtype must be one of {DTYPES} or None, got {dtype!r}")
    changes: dict[str, Any] = {}
    if dtype is not None:
        changes.update(dtype=dtype, param_dtype=dtype)
    if moe_impl is not None:
        changes["moe_impl"] = moe_impl
    cfg = cfg.replace(**changes) if changes else cfg
    model = nnx.eval_shape(lambda: MoeLM(cfg))
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), get_params(model))
    expected = {jax.tree_util.keystr(p): tuple(a.shape) for p, a in jax.tree_util.tree_leaves_with_path(abstract)}
    ck = _checkpointer()
    try:
        stored = _stored_shapes(ck, params_dir)
        missing = sorted(expected.keys() - stored.keys())
        extra = sorted(stored.keys() - expected.keys())
        if missing or extra:
            raise MoegrokError(f"{params_dir}: parameters do not match the model config (missing {missing[:3]}, "
                               f"unexpected {extra[:3]})")
        for k, shape in expected.items():
            if stored[k] != shape:
                raise MoegrokError(f"{params_dir}: parameter {k} has shape {stored[k]}, the model config implies "
                                   f"{shape}")
        try:
            params = ck.restore(params_dir, abstract)  # orbax casts to the target dtypes
        except Exception as e:
            raise MoegrokError(f"{params_dir}: cannot restore parameters ({type(e).__name__}: {e})") from None
    finally:
        ck.close()
    set_params(model, params)
    return model
