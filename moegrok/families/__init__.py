"""Model families: one module per Hugging Face `model_type` moegrok runs in JAX, each a `Family` entry (config
translation both ways and checkpoint key names); `base.tensor_map` turns any of them into the parameter <-> tensor
map the loader and writer share. Families not listed here go through the PyTorch capture backend
(`moegrok.torch_capture`)."""
from __future__ import annotations

from typing import Any, Mapping

from moegrok.errors import MoegrokError
from moegrok.families import glm4_moe, mixtral, olmoe, qwen2_moe, qwen3_moe
from moegrok.families.base import Family, ParamMap, Part, tensor_map
from moegrok.model.config import MoeConfig

FAMILIES: dict[str, Family] = {m.FAMILY.model_type: m.FAMILY for m in (olmoe, mixtral, qwen2_moe, qwen3_moe,
                                                                        glm4_moe)}


def family(model_type: Any, where: str = "config.json") -> Family:
    if model_type not in FAMILIES:
        raise MoegrokError(f"{where}: model_type {model_type!r} has no JAX implementation (JAX families: "
                           f"{', '.join(FAMILIES)}); `moegrok trajectory --backend torch` captures any MoE family "
                           "transformers has")
    return FAMILIES[model_type]


def config_from_hf(d: Mapping[str, Any], where: str = "config.json", **overrides: Any):
    """A Hugging Face config.json dict of any JAX family -> MoeConfig (family set), validated."""
    if not isinstance(d, Mapping):
        raise MoegrokError(f"{where}: expected a JSON object")
    fam = family(d.get("model_type"), where)
    try:
        kw = fam.from_hf(d, where)
        kw["family"] = fam.model_type
        kw.update(overrides)
        return MoeConfig(**kw)
    except MoegrokError as e:
        msg = str(e)
        raise MoegrokError(msg if msg.startswith(where) else f"{where}: {msg}") from None
    except (TypeError, ValueError, KeyError, AttributeError) as e:
        raise MoegrokError(f"{where}: invalid value ({type(e).__name__}: {e})") from None


def hf_config_kwargs(cfg) -> dict[str, Any]:
    return family(cfg.family, "model config").to_hf(cfg)


def hf_config_object(cfg):
    """The transformers config object (imports transformers)."""
    import transformers

    fam = family(cfg.family, "model config")
    return getattr(transformers, fam.hf_config_class)(**fam.to_hf(cfg))


__all__ = ["FAMILIES", "Family", "ParamMap", "Part", "family", "config_from_hf", "hf_config_kwargs",
           "hf_config_object", "tensor_map"]
