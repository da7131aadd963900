"""PyTorch routing capture: probe records from any Hugging Face mixture-of-experts causal LM, without converting it.

`probe_record` here returns the same fields, dtypes and shapes as `moegrok.probe.probe_record` (the JAX backend), for
every MoE family in `_FAMILIES`. The definitions below are shared with the JAX backend; both cite this docstring.

Per MoE layer (dense layers have no router and are skipped; L = the number of MoE layers, in layer order), per token:

- **g**, the routing distribution over all E routed experts (shared experts are not routed and are excluded), in
  float32, from the raw pre-activation logits the router computes (``F.linear(h, W)``, plus the router bias where the
  family has one, e.g. gpt_oss; after logit soft-capping where the family caps, e.g. laguna):
  - softmax routers: ``g = softmax(logits)`` over all E experts, also when the model itself renormalises over the
    top-k or applies its softmax only over the top-k logits (gpt_oss, granitemoe, aria, jetmoe), and without any
    selection bias (ernie4_5_moe's and longcat_flash's bias only affects the choice).
  - sigmoid routers (deepseek_v3, glm4_moe, dots1, llama4, ... any family whose router scores are sigmoids):
    ``g = sigmoid(logits) / sum_e sigmoid(logits)`` over all E, without the ``e_score_correction_bias``.
- **topk_ids** [k]: the experts the model actually used for the token (with bias, group-limited selection,
  sparsemixer, whatever the family does), read from the router's own output by forward hooks (DBRX: from its experts
  module's input, because its router returns logits only), ordered by g descending, ties to the lower expert index.
- **topk_weights** [k]: g at those ids (not the model's renormalised or scaled mixing weights).
- **route_probs** [L, E] per sample: g averaged over the sample's non-padding tokens.
- **router_weights** [L, E, d]: each MoE layer's router weight matrix, row e = expert e's router vector, float32
  (the bias of a biased router is not part of it).
- **sample_loss**: mean next-token NLL over the sample's real tokens (position t scores token t+1, valid where both
  are real), from the model's logits in float32 with a float32 log-softmax.

topk_ids / topk_weights are 0 at padding positions. Rows are right-padded (mask True, then False).

Family details the table (`_FAMILIES`) encodes: gemma4's router normalises and scales its input before the
projection and returns its softmax, which is g as it stands (router_weights is its `proj.weight`); inkling's router
matrix also scores its shared experts, whose rows are dropped; longcat_flash's E counts its zero-computation
(identity) experts, which the router chooses among like the others; deepseek_v4's hash-routed layers choose by a fixed
token-id table (topk_ids are those experts) while g comes from the learned gate like any sigmoid router; a family
whose score function is neither softmax nor sigmoid (deepseek_v4's default ``sqrtsoftplus``) is refused.

One forward per batch: eval mode (Mixtral/PhiMoE jitter and sampling act only in training mode), ``torch.no_grad()``,
``use_cache=False``; each module's train/eval flag is restored afterwards and the hooks are removed, also on error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np

from moegrok.errors import MoegrokError


class CaptureError(MoegrokError, ValueError):
    """A model or input this backend cannot capture; the message names the family or argument and why."""


# --- how to read each family's router ---------------------------------------------------------------------------------

def _read_std(router, out, k: int):
    """(router_logits, weights, indices, ...): the layout of nearly every router."""
    return out[0], out[2]


def _read_llama4(router, out, k: int):
    """Llama4Router returns (sigmoid scores scattered over the top-k, logits); the choice is `topk(logits, k)` on the
    very tensor the model ran it on, so repeating that op reproduces the model's choice exactly."""
    import torch

    logits = out[1]
    return logits, torch.topk(logits, k, dim=1).indices


def _read_jetmoe(router, out, k: int):
    """JetMoeTopKGating returns (index_sorted_experts, batch_index, batch_gates, expert_size, logits): the token-major
    choices sorted by expert. Undo that sort: sorted slot j belongs to expert `repeat_interleave(arange(E), sizes)[j]`
    and to flat (token, rank) position `index_sorted_experts[j]`."""
    import torch

    index_sorted, _, _, expert_size, logits = out
    sizes = torch.as_tensor(expert_size, device=index_sorted.device)
    expert_of_slot = torch.repeat_interleave(torch.arange(len(sizes), device=index_sorted.device), sizes)
    flat = torch.empty_like(index_sorted)
    flat[index_sorted] = expert_of_slot
    return logits, flat.view(-1, k)


def _read_logits_only(router, out, k: int):
    """DbrxRouter returns the logits alone; DbrxFFN chooses, and its experts module receives the choice."""
    return out, None


def _read_custom(router, out, k: int):
    """A router module of the user's own model: its output is the logits ([..., E]), or a tuple whose first item
    is the logits and whose third, if any, is the chosen experts (the layout transformers' routers use). Without a
    choice in the output the model is taken to use the top k of its logits (= the top k of g)."""
    import torch

    logits = out[0] if isinstance(out, (tuple, list)) else out
    logits = logits.reshape(-1, logits.shape[-1])
    ids = out[2] if isinstance(out, (tuple, list)) and len(out) > 2 and torch.is_tensor(out[2]) else None
    if ids is None:
        ids = torch.topk(logits, k, dim=-1).indices
    return logits, ids.reshape(-1, k)


def _router_weight(router):
    """The [E, d] router matrix: the router's own 2-D `weight` (nn.Linear subclasses, most TopKRouters), else that of
    its single nn.Linear child (dbrx `layer`, jetmoe `layer`, hunyuan `wg`, afmoe `gate`, longcat `classifier`,
    ergo `linear`, gemma4 `proj`)."""
    import torch

    w = getattr(router, "weight", None)
    if isinstance(w, torch.Tensor) and w.ndim == 2:
        return w
    linears = [m for m in router.children() if isinstance(m, torch.nn.Linear)]
    if len(linears) != 1:
        raise CaptureError(f"{type(router).__name__}: no router weight matrix (expected a 2-D `weight` or exactly one "
                           f"nn.Linear child, found {len(linears)})")
    return linears[0].weight


def _routed_rows(router):
    """Inkling's router matrix also scores the shared experts (its last rows); only the routed rows are routing."""
    return router.weight[: router.num_experts]


def _scoring_func(attr: str) -> Callable[[Any], str]:
    """A family whose score function is a config choice: softmax/sigmoid are captured, anything else refused."""
    def kind(cfg) -> str:
        fn = getattr(cfg, attr, None)
        if fn in ("softmax", "sigmoid"):
            return fn
        raise CaptureError(f"{cfg.model_type}: router score function {attr}={fn!r} is neither softmax nor sigmoid; "
                           "the routing distribution g is defined for those two only")
    return kind


@dataclasses.dataclass(frozen=True)
class _Family:
    router: str | tuple[str, ...]  # the router module's class name(s)
    kind: str | Callable[[Any], str]  # "softmax" | "sigmoid", or a function of the config (raises to refuse)
    read: Callable = _read_std  # (router, forward output, k) -> (scores [N, E], ids [N, k] or None)
    probs: bool = False  # the scores are already g (gemma4's router returns its softmax, not its logits)
    ids_from: str | None = None  # sibling module whose forward input `top_k_index` is the choice (dbrx)
    parent: str | None = None  # only routers whose parent module's class name ends with this (jetmoe: MLP, not MoA)
    weight: Callable = _router_weight  # router -> [E, d]
    top_k: Callable | None = None  # (router, parent, config) -> k; default router.top_k, else parent.top_k


_S, _G = "softmax", "sigmoid"
# model_type -> how to find its routers and read them, or (a string) why the family is refused. Grouped by router
# behaviour; a family absent here is refused as unknown.
CUSTOM = "custom"  # the routers a caller names in their own model (`custom_spec`)
_FAMILIES: dict[str, _Family | str] = {
    CUSTOM: _Family(router=(), kind=_S, read=_read_custom),
    "olmoe": _Family("OlmoeTopKRouter", _S),
    "flex_olmo": _Family("FlexOlmoTopKRouter", _S),
    "mixtral": _Family("MixtralTopKRouter", _S),
    "minimax": _Family("MiniMaxTopKRouter", _S),
    "qwen2_moe": _Family("Qwen2MoeTopKRouter", _S),
    "qwen3_moe": _Family("Qwen3MoeTopKRouter", _S),
    "qwen3_next": _Family("Qwen3NextTopKRouter", _S),
    "qwen3_5_moe": _Family("Qwen3_5MoeTopKRouter", _S),
    "qwen3_5_moe_text": _Family("Qwen3_5MoeTopKRouter", _S),
    "qwen4_exp": _Family("Qwen4ExpTextTopKRouter", _S),
    "qwen4_exp_text": _Family("Qwen4ExpTextTopKRouter", _S),
    "mellum": _Family("MellumTopKRouter", _S),
    "lara_mini": _Family("LaraMiniTopKRouter", _S),
    "jamba": _Family("JambaTopKRouter", _S),
    "phimoe": _Family("PhimoeTopKRouter", _S),  # eval-mode sparsemixer: the two largest logits
    "hunyuan_v1_moe": _Family("HunYuanMoEV1Gate", _S),
    "aria_text": _Family("AriaTextTopKRouter", _S),
    "granitemoe": _Family("GraniteMoeTopKRouter", _S),
    "granitemoe_swa": _Family("GraniteMoeSWATopKRouter", _S),
    "granitemoeshared": _Family("GraniteMoeSharedTopKRouter", _S),
    "granitemoehybrid": _Family("GraniteMoeHybridTopKRouter", _S),
    "gpt_oss": _Family("GptOssTopKRouter", _S),  # biased router: its logits include the bias
    "ernie4_5_moe": _Family("Ernie4_5_MoeTopKRouter", _S),  # selection bias on the softmax
    "longcat_flash": _Family("LongcatFlashTopkRouter", _S),  # E includes the zero-computation experts
    "deepseek_v2": _Family("DeepseekV2TopkRouter", _S),  # greedy or group-limited greedy
    "cohere2_moe": _Family("Cohere2MoeTopKRouter", _scoring_func("expert_selection_fn")),
    "gemma4_text": _Family("Gemma4TextRouter", _S, probs=True, top_k=lambda r, p, cfg: cfg.top_k_experts),
    "dbrx": _Family("DbrxRouter", _S, read=_read_logits_only, ids_from="experts"),
    "jetmoe": _Family("JetMoeTopKGating", _S, read=_read_jetmoe, parent="MoE"),
    "llama4": _Family("Llama4Router", _G, read=_read_llama4),
    "llama4_text": _Family("Llama4Router", _G, read=_read_llama4),
    # sigmoid + e_score_correction_bias + group-limited top-k (the DeepSeek-V3 router and its copies)
    "deepseek_v3": _Family("DeepseekV3TopkRouter", _G),
    "deepseek_v32": _Family("DeepseekV32TopkRouter", _G),
    "glm4_moe": _Family("Glm4MoeTopkRouter", _G),
    "glm4_moe_lite": _Family("Glm4MoeLiteTopkRouter", _G),
    "glm_moe_dsa": _Family("GlmMoeDsaTopkRouter", _G),
    "dots1": _Family("Dots1TopkRouter", _G),
    "dots3_note": _Family("Dots3NoteTextTopkRouter", _G),
    "dots3_note_text": _Family("Dots3NoteTextTopkRouter", _G),
    "axk1": _Family("AXK1TopkRouter", _G),
    "axk2": _Family("AXK2TopkRouter", _G),
    "bailing_hybrid": _Family("BailingHybridTopkRouter", _G),
    "beam": _Family("BeamTopKRouter", _G),
    "exaone_moe": _Family("ExaoneMoeTopkRouter", _G),
    "hy_v4": _Family("HYV4TopkRouter", _G),
    "kimi_linear": _Family("KimiLinearTopkRouter", _G),
    "mimo_v2_flash": _Family("MiMoV2FlashTopkRouter", _G),
    "minicpm5_moe": _Family("MiniCPM5MoeTopkRouter", _G),
    "nemotron_h": _Family("NemotronHTopkRouter", _G),
    "solar_open": _Family("SolarOpenTopkRouter", _G),
    # sigmoid with a selection bias but no groups (the bias lives on the router or is passed in by its MoE block)
    "afmoe": _Family("AfmoeTokenChoiceRouter", _G),
    "ergo": _Family("ErgoTopkRouter", _G),
    "hy_v3": _Family("HYV3TopKRouter", _G),
    "minimax_m2": _Family("MiniMaxM2TopKRouter", _G),
    "minimax_m3_vl_text": _Family("MiniMaxM3VLTopKRouter", _G),
    "laguna": _Family("LagunaTopKRouter", _G),  # logits after its optional soft-capping
    "lfm2_moe": _Family("Lfm2MoeTopKRouter", _G),
    "kolibri1": _Family("Kolibri1TopKRouter", _G),  # bias added to the logits, scores are sigmoids
    "kolibri1_1": _Family("Kolibri1_1TopKRouter", _G),
    "flint": _Family("FlintTopKRouter", _G),
    "inkling_text": _Family("InklingTopkRouter", _G, weight=_routed_rows),  # its shared experts are scored too
    # hash-routed layers: the choice is a fixed token-id -> experts table, g still comes from the learned gate
    "deepseek_v4": _Family(("DeepseekV4TopKRouter", "DeepseekV4HashRouter"), _scoring_func("scoring_func")),
    "inkling2_text": _Family("Inkling2TopKRouter", _scoring_func("scoring_func")),
    # refused: routers the definitions above do not cover
    "switch_transformers": "an encoder-decoder model, not a causal LM (no next-token loss over one token stream)",
    "nllb_moe": "an encoder-decoder model, not a causal LM (no next-token loss over one token stream)",
    "doge": "a product-key router (2 x sqrt(E) keys mixed per token), not one router vector per expert",
    "zaya": "an MLP router over a down-projection with an extra 'skip' class: no [E, d] router matrix",
    "inkling2_loop_text": "loop layers run each router several times per forward; one routing per MoE layer is "
                          "assumed",
}


# --- the spec ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class RouterSpec:
    family: str  # config.model_type
    kind: str  # "softmax" | "sigmoid"
    layers: tuple[int, ...]  # decoder-layer index of each MoE layer, in order
    routers: tuple[Any, ...]  # the router modules, one per MoE layer
    names: tuple[str, ...]  # their qualified module names
    num_experts: int  # E
    top_k: int  # k
    d_model: int  # d (the router's input width)


_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|blocks|h)\.(\d+)(?:\.|$)")


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def router_spec(model) -> RouterSpec:
    """The routers of `model` (a transformers causal LM) and how to read them; `CaptureError` for a family this
    backend cannot capture, naming the model_type and why."""
    cfg = _text_config(model)
    family = getattr(cfg, "model_type", None) or type(model).__name__
    fam = _FAMILIES.get(family)
    if isinstance(fam, str):
        raise CaptureError(f"{family}: cannot capture routing: {fam}")
    if fam is None:
        recorders = getattr(type(model), "_can_record_outputs", None) or {}
        if "router_logits" in recorders:
            raise CaptureError(f"{family}: MoE family not in moegrok.torch_capture's family table; supported: "
                               f"{', '.join(sorted(k for k, v in _FAMILIES.items() if isinstance(v, _Family)))}")
        raise CaptureError(f"{family}: no MoE router found ({type(model).__name__} is not a mixture-of-experts model)")
    kind = fam.kind(cfg) if callable(fam.kind) else fam.kind
    modules = dict(model.named_modules())
    classes = (fam.router,) if isinstance(fam.router, str) else fam.router
    found = [(name, m) for name, m in modules.items() if type(m).__name__ in classes
             and (fam.parent is None or type(modules[_parent_name(name)]).__name__.endswith(fam.parent))]
    if not found:
        raise CaptureError(f"{family}: no MoE router found (no {' / '.join(classes)} module in {type(model).__name__}; "
                           "all layers dense?)")
    names = tuple(n for n, _ in found)
    routers = tuple(m for _, m in found)
    ks = {_top_k(fam, r, modules[_parent_name(n)], cfg) for n, r in found}
    shapes = {tuple(fam.weight(r).shape) for r in routers}
    if len(shapes) != 1 or len(ks) != 1:
        raise CaptureError(f"{family}: MoE layers differ in router shape {sorted(shapes)} or top-k {sorted(ks)}; "
                           "a probe record needs one E and one k")
    (E, d), (k,) = shapes.pop(), ks
    return RouterSpec(family=family, kind=kind, layers=_layer_indices(names), routers=routers, names=names,
                      num_experts=int(E), top_k=int(k), d_model=int(d))


def custom_spec(model, routers: Sequence[Any], top_k: int, kind: str = "softmax") -> RouterSpec:
    """The routers of a model transformers did not build: `routers` are its router modules (or their names), one per
    MoE layer in order, each returning the logits [..., E] (see `_read_custom`); `top_k` experts per token; `kind`
    says how g is normalised (METHOD §4)."""
    if kind not in (_S, _G):
        raise CaptureError(f"custom routers: kind must be 'softmax' or 'sigmoid', got {kind!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise CaptureError(f"custom routers: top_k must be a positive integer, got {top_k!r}")
    by_module = {id(m): n for n, m in model.named_modules()}
    mods, names = [], []
    for r in routers:
        if isinstance(r, str):
            try:
                r = model.get_submodule(r)
            except AttributeError:
                raise CaptureError(f"custom routers: the model has no module {r!r}") from None
        if id(r) not in by_module:
            raise CaptureError(f"custom routers: {type(r).__name__} is not a module of the model")
        mods.append(r)
        names.append(by_module[id(r)])
    if not mods:
        raise CaptureError("custom routers: name at least one router module")
    shapes = {tuple(_router_weight(r).shape) for r in mods}
    if len(shapes) != 1:
        raise CaptureError(f"custom routers: router weight shapes differ {sorted(shapes)}; one E and d for all")
    (E, d), = shapes
    if top_k > E:
        raise CaptureError(f"custom routers: top_k {top_k} exceeds the {E} experts")
    return RouterSpec(family=CUSTOM, kind=kind, layers=tuple(range(len(mods))), routers=tuple(mods),
                      names=tuple(names), num_experts=int(E), top_k=top_k, d_model=int(d))


def _parent_name(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def _top_k(fam: _Family, router, parent, cfg) -> int:
    if fam.top_k is not None:
        return int(fam.top_k(router, parent, cfg))
    for owner in (router, parent):
        k = getattr(owner, "top_k", None)
        if isinstance(k, int):
            return k
    raise CaptureError(f"{cfg.model_type}: {type(router).__name__} has no top_k (nor has its parent module)")


def _layer_indices(names: Sequence[str]) -> tuple[int, ...]:
    hits = [_LAYER_RE.search(n) for n in names]
    if all(hits):
        return tuple(int(h.group(1)) for h in hits)
    return tuple(range(len(names)))  # no layer number in the module path: MoE layers in module order


# --- one forward ------------------------------------------------------------------------------------------------------

class Capture(NamedTuple):
    logits_BxTxV: Any  # torch float32
    g_LxBxTxE: Any  # torch float32
    topk_ids_LxBxTxk: Any  # torch int64, ordered by g descending (ties: lower index)


@contextlib.contextmanager
def _inference(model) -> Iterator[None]:
    """Eval mode and no autograd for one forward; every module's own train/eval flag is put back afterwards (a
    blanket `model.train(was_training)` would also flip submodules the caller had set differently)."""
    import torch

    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training


def _device(model):
    import torch

    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _long(x, device):
    """NumPy or torch (any device) -> a torch.long tensor on `device`."""
    import torch

    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=torch.long)


def _forward_logits(model, input_ids_BxT, attention_mask_BxT, forward: Callable | None = None):
    """The model's logits; `forward(model, input_ids, attention_mask) -> logits` for models with another call
    signature than transformers' (a plain PyTorch MoE)."""
    dev = _device(model)
    if forward is not None:
        out = forward(model, _long(input_ids_BxT, dev), _long(attention_mask_BxT, dev))
        return (out.logits if hasattr(out, "logits") else out).float()
    out = model(input_ids=_long(input_ids_BxT, dev), attention_mask=_long(attention_mask_BxT, dev), use_cache=False)
    return out.logits.float()


def capture(model, input_ids_BxT, attention_mask_BxT, spec: RouterSpec | None = None,
            forward: Callable | None = None) -> Capture:
    """One forward of `model` with its routing recorded: float32 logits, g per MoE layer and token, and the
    experts the model used per token (see the module docstring)."""
    spec = spec or router_spec(model)
    fam = _FAMILIES[spec.family]
    seen: list[list] = [[] for _ in spec.routers]
    chosen: list[list] = [[] for _ in spec.routers]
    handles = []
    try:
        for i, (name, router) in enumerate(zip(spec.names, spec.routers, strict=True)):
            handles.append(router.register_forward_hook(_router_hook(fam, spec.top_k, seen[i])))
            if fam.ids_from is not None:
                src = model.get_submodule(f"{_parent_name(name)}.{fam.ids_from}".lstrip("."))
                handles.append(src.register_forward_pre_hook(_ids_hook(chosen[i]), with_kwargs=True))
        with _inference(model):
            logits_BxTxV = _forward_logits(model, input_ids_BxT, attention_mask_BxT, forward)
    finally:
        for h in handles:
            h.remove()
    B, T = logits_BxTxV.shape[:2]
    scores, ids = [], []
    for i, name in enumerate(spec.names):
        if len(seen[i]) != 1:
            raise CaptureError(f"{spec.family}: router {name} ran {len(seen[i])} times in one forward; exactly one "
                               "routing per MoE layer is assumed")
        s, idx = seen[i][0]
        if fam.ids_from is not None:
            idx = chosen[i][0] if len(chosen[i]) == 1 else None
        if idx is None or s.numel() != B * T * spec.num_experts or idx.numel() != B * T * spec.top_k:
            raise CaptureError(f"{spec.family}: router {name} routed {s.numel() // max(spec.num_experts, 1)} tokens "
                               f"(expected {B} x {T}) or gave no [tokens, {spec.top_k}] choice")
        scores.append(s.reshape(B, T, spec.num_experts))
        ids.append(idx.reshape(B, T, spec.top_k))
    g_LxBxTxE = _routing_distribution(spec, fam, _stack(scores))
    return Capture(logits_BxTxV, g_LxBxTxE, _order_by_g(g_LxBxTxE, _stack(ids)))


def _router_hook(fam: _Family, k: int, sink: list):
    def hook(module, args, out):
        s, idx = fam.read(module, out, k)
        sink.append((s.detach().float(), None if idx is None else idx.detach().long()))
    return hook


def _ids_hook(sink: list):
    def hook(module, args, kwargs):
        idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
        sink.append(idx.detach().long())
    return hook


def _stack(xs):
    import torch

    return torch.stack(xs)


def _routing_distribution(spec: RouterSpec, fam: _Family, scores_LxBxTxE):
    import torch

    if fam.probs:
        return scores_LxBxTxE
    if spec.kind == "softmax":
        return torch.softmax(scores_LxBxTxE, dim=-1)
    s = torch.sigmoid(scores_LxBxTxE)
    return s / s.sum(dim=-1, keepdim=True)


def _order_by_g(g_LxBxTxE, ids_LxBxTxk):
    """The chosen ids sorted by g descending, ties to the lower expert index (two stable sorts)."""
    import torch

    by_id, _ = torch.sort(ids_LxBxTxk, dim=-1, stable=True)
    w = torch.gather(g_LxBxTxE, -1, by_id)
    order = torch.sort(-w, dim=-1, stable=True).indices
    return torch.gather(by_id, -1, order)


# --- probe records ----------------------------------------------------------------------------------------------------

def _vocab_size(model) -> int:
    import torch

    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    n = getattr(emb, "num_embeddings", None)
    if n is None and not hasattr(model, "config"):  # a plain PyTorch model: its (first) embedding table
        n = next((m.num_embeddings for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return int(n if n is not None else _text_config(model).vocab_size)


def _rows(model, tokens_NxT, mask_NxT, where: str, **extra) -> tuple[np.ndarray, ...]:
    from moegrok.writer import check_rows

    return check_rows(tokens_NxT, mask_NxT, where, _vocab_size(model), CaptureError, right_padded=True, **extra)


def _token_nll(logits_BxTxV, tokens_BxT):
    """-log p(token t+1 | <= t), [B, T-1], with a float32 log-softmax."""
    import torch

    logp = torch.log_softmax(logits_BxTxV[:, :-1].float(), dim=-1)
    return -torch.gather(logp, -1, tokens_BxT[:, 1:, None]).squeeze(-1)


def _masked_mean(x_BxT, m_BxT):
    import torch

    return torch.where(m_BxT, x_BxT, 0.0).sum(1) / m_BxT.sum(1).clamp(min=1)


def _probe_batch(model, spec: RouterSpec, tokens_BxT: np.ndarray, mask_BxT: np.ndarray,
                 answer_BxT: np.ndarray, forward: Callable | None = None) -> dict[str, np.ndarray]:
    import torch

    cap = capture(model, tokens_BxT, mask_BxT, spec, forward)
    tok = torch.as_tensor(tokens_BxT, dtype=torch.long)
    m = torch.as_tensor(mask_BxT)
    nll = _token_nll(cap.logits_BxTxV.cpu(), tok)
    valid = m[:, 1:] & m[:, :-1]
    ans = valid & torch.as_tensor(answer_BxT)[:, 1:]
    answer_loss = torch.where(ans.any(1), _masked_mean(nll, ans), torch.nan)
    g = torch.where(m[None, :, :, None], cap.g_LxBxTxE.cpu(), 0.0)  # a fully padded row may carry NaN logits
    route_probs = torch.einsum("lbte->ble", g) / m.sum(1).clamp(min=1)[:, None, None]
    ids = cap.topk_ids_LxBxTxk.cpu()
    w = torch.gather(g, -1, ids)
    keep = m[:, :, None, None]
    return {
        "sample_loss": _masked_mean(nll, valid).numpy().astype(np.float32),
        "answer_loss": answer_loss.numpy().astype(np.float32),
        "route_probs": route_probs.numpy().astype(np.float32),
        "topk_ids": torch.where(keep, ids.permute(1, 2, 0, 3), 0).numpy().astype(np.int32),
        "topk_weights": torch.where(keep, w.permute(1, 2, 0, 3), 0.0).numpy().astype(np.float32),
    }


def _batches(n: int, batch_size: int) -> Iterator[slice]:
    for i in range(0, n, max(int(batch_size), 1)):
        yield slice(i, min(i + max(int(batch_size), 1), n))


def _empty_record(spec: RouterSpec, T: int) -> dict[str, np.ndarray]:
    L, E, k = len(spec.routers), spec.num_experts, spec.top_k
    return {"sample_loss": np.zeros((0,), np.float32), "answer_loss": np.zeros((0,), np.float32),
            "route_probs": np.zeros((0, L, E), np.float32), "topk_ids": np.zeros((0, T, L, k), np.int32),
            "topk_weights": np.zeros((0, T, L, k), np.float32)}


def router_weights(spec: RouterSpec) -> np.ndarray:
    """[L, E, d] float32: each MoE layer's router matrix, row e = expert e's router vector."""
    fam = _FAMILIES[spec.family]
    return np.stack([fam.weight(r).detach().float().cpu().numpy() for r in spec.routers]).astype(np.float32)


def probe_record(model, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, sample_ids: Sequence[int],
                 domains: Sequence[str], batch_size: int = 16, progress=None,
                 answer_mask_NxT: np.ndarray | None = None, *, spec: RouterSpec | None = None,
                 forward: Callable | None = None) -> dict[str, np.ndarray]:
    """`moegrok.probe.probe_record` for a transformers MoE causal LM: the fields of `moegrok.rundir.PROBE_FIELDS`
    (plus ``answer_loss`` when ``answer_mask_NxT`` is given: mean NLL over the answer tokens, NaN without any).
    A model transformers did not build: pass ``spec=custom_spec(...)`` and its ``forward``."""
    spec = spec or router_spec(model)
    with_answer = answer_mask_NxT is not None
    tokens, mask, answer = _rows(model, tokens_NxT, mask_NxT, "probe_record",
                                 answer_mask=answer_mask_NxT if with_answer else np.zeros(np.shape(tokens_NxT), bool))
    n = tokens.shape[0]
    if len(sample_ids) != n or len(domains) != n:
        raise CaptureError(f"probe_record: {n} token rows but {len(sample_ids)} sample_ids and {len(domains)} "
                           "domains; one of each per row")
    parts = []
    for sl in _batches(n, batch_size):
        parts.append(_probe_batch(model, spec, tokens[sl], mask[sl], answer[sl], forward))
        if progress is not None:
            progress.update(sl.stop - sl.start)
    rec = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else \
        _empty_record(spec, tokens.shape[1])
    if not with_answer:
        del rec["answer_loss"]
    rec.update(
        sample_ids=np.asarray(sample_ids, np.int64),
        domains=np.asarray(list(domains), dtype=str),
        router_weights=router_weights(spec),
        token_mask=mask,
        tokens=tokens,
    )
    return rec


def token_logprobs(model, tokens_NxT: np.ndarray, mask_NxT: np.ndarray, batch_size: int = 16, *,
                   forward: Callable | None = None) -> np.ndarray:
    """log p(token t+1 | tokens <= t) for every position, [N, T-1] float32 (multiple-choice scoring). Any causal LM,
    MoE or not."""
    tokens, mask = _rows(model, tokens_NxT, mask_NxT, "token_logprobs")
    import torch

    out = []
    for sl in _batches(tokens.shape[0], batch_size):
        with _inference(model):
            logits = _forward_logits(model, tokens[sl], mask[sl], forward).cpu()
        out.append((-_token_nll(logits, torch.as_tensor(tokens[sl], dtype=torch.long))).numpy().astype(np.float32))
    return np.concatenate(out) if out else np.zeros((0, max(tokens.shape[1] - 1, 0)), np.float32)


# --- loading ----------------------------------------------------------------------------------------------------------

_DTYPES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
           "float16": "float16", "fp16": "float16"}


def load_model(path: str | Path, dtype: str | Any | None = None):
    """A local transformers causal-LM checkpoint in eval mode (never the hub). ``dtype=None`` keeps the checkpoint's
    dtype; "float32" / "bfloat16" (or a torch dtype) convert."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    if not path.is_dir():
        raise CaptureError(f"{path}: not a directory (expected a transformers checkpoint directory)")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CaptureError(f"{cfg_path}: missing (is {path} a transformers checkpoint?)")
    try:
        model_type = json.loads(cfg_path.read_text()).get("model_type")
    except (json.JSONDecodeError, AttributeError) as e:
        raise CaptureError(f"{cfg_path}: not a JSON object ({e})") from None
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise CaptureError(f"{cfg_path}: model_type {model_type!r} is not a causal LM this transformers knows")
    if dtype is None:
        torch_dtype: Any = "auto"
    elif isinstance(dtype, torch.dtype):
        torch_dtype = dtype
    elif str(dtype) in _DTYPES:
        torch_dtype = getattr(torch, _DTYPES[str(dtype)])
    else:
        raise CaptureError(f"{path}: dtype {dtype!r} not understood (float32, bfloat16, float16 or None)")
    try:
        # Mismatched shapes are collected (and refused below, naming one) instead of a multi-line report.
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype,
                                                           output_loading_info=True, ignore_mismatched_sizes=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CaptureError(f"{path}: cannot load the checkpoint ({first})") from None
    _check_loading_info(path, info)
    return model.eval()


def _check_loading_info(path: Path, info: dict) -> None:
    """transformers fills missing weights with random values and skips unexpected ones, warning only: a checkpoint
    whose weights disagree with its config.json would give routing of a random model. Refuse it, naming a key."""
    for field, what in (("missing_keys", "lacks"), ("mismatched_keys", "has misshaped"),
                        ("unexpected_keys", "has unexpected")):
        keys = sorted(info.get(field) or [])
        if keys:
            first = keys[0][0] if isinstance(keys[0], tuple) else keys[0]
            raise CaptureError(f"{path}: checkpoint {what} tensor(s) for config.json's model, e.g. '{first}' "
                               f"({len(keys)} in all; config and weights disagree?)")
