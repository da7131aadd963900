"""`RoutingMonitor`: the test-free monitor inside any PyTorch training loop.

At a checkpoint, `monitor.record(step)` runs the fixed probe texts through the model being trained (eval mode, no
gradients, no cache; each module's mode is put back and no random number is drawn, so training continues exactly
as without it), captures the routing with the torch backend's router hooks (`moegrok.torch_capture`), writes the
probe record through `moegrok.writer.RunWriter`, and computes the live indicators of the same registry moegrok's own
trainer logs (`moegrok.analysis.indicators`), returned as ``{"moegrok/<indicator>/<domain>": value}``.

Models transformers built are found by their family's router class; any other `nn.Module` names its router modules
(`routers=[...]`, each returning logits) and how to call it (`forward=lambda model, ids, mask: ...`).

Under several processes (`torch.distributed`), every rank runs the probe forward — with FSDP or ZeRO-3 the
parameter gathers are collective — and rank 0 alone writes.
"""
from __future__ import annotations

import dataclasses
import types
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from moegrok.errors import MoegrokError

KEY = "moegrok/{name}/{domain}"


def read_probes(probes: str | Path | Sequence[Mapping[str, Any]]) -> list[dict]:
    """A probes.jsonl path or a list of {"id", "domain", "text"}."""
    from moegrok.trajectory import read_texts

    if isinstance(probes, (str, Path)):
        return [{"id": r["id"], "domain": r["domain"], "text": r["text"]} for r in read_texts(probes)]
    rows = []
    for i, r in enumerate(probes):
        if not isinstance(r, Mapping) or not all(k in r for k in ("id", "domain", "text")):
            raise MoegrokError(f"probes[{i}]: expected a mapping with 'id', 'domain' and 'text', got {r!r}"[:200])
        if not isinstance(r["text"], str) or not r["text"]:
            raise MoegrokError(f"probes[{i}]: 'text' must be a non-empty string")
        rows.append({"id": r["id"], "domain": str(r["domain"]), "text": r["text"]})
    if not rows:
        raise MoegrokError("probes: no probe texts")
    if len({str(r["id"]) for r in rows}) != len(rows):
        raise MoegrokError("probes: ids must be unique")
    return rows


class _Tokens:
    """A transformers tokenizer, or any callable text -> list of ids (then padding id 0)."""

    def __init__(self, tokenizer):
        if tokenizer is None:
            raise MoegrokError("monitor: a tokenizer is needed (a transformers tokenizer or a callable text -> ids)")
        self.tok = tokenizer
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else 0

    def __call__(self, text: str) -> dict:
        out = self.tok(text)
        ids = out["input_ids"] if hasattr(out, "keys") else out  # a transformers BatchEncoding, or plain ids
        return {"input_ids": [int(i) for i in ids]}


def _rank() -> tuple[int, int]:
    try:
        import torch.distributed as dist
    except ImportError:
        return 0, 1
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def torch_param_norms(model, spec) -> dict[str, float]:
    """L2 norms of all parameters, the routers, the routed experts and the attention, as the trainer's
    `param_norms` groups them (names: `experts`, `attn`/`attention`)."""
    import torch

    router_ids = {id(p) for r in spec.routers for p in r.parameters()}
    sq = dict.fromkeys(("all", "router", "experts", "attention"), 0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            s = float(p.detach().double().pow(2).sum())
            sq["all"] += s
            if id(p) in router_ids:
                sq["router"] += s
            elif ".experts." in f".{name}." or name.startswith("experts."):
                sq["experts"] += s
            elif "attn" in name or "attention" in name:
                sq["attention"] += s
    return {k: float(np.sqrt(v)) for k, v in sq.items()}


class RoutingMonitor:
    """Capture routing for a fixed probe set and write a run directory, from any PyTorch loop.

    model: the module being trained (a transformers MoE causal LM, or any `nn.Module` with `routers=` and
    `forward=`). probes: a probes.jsonl path or a list of {"id", "domain", "text"}. tokenizer: a transformers
    tokenizer or a callable text -> ids. tests: optional multiple-choice items {"id", "domain", "question",
    "choices", "answer"} (or a JSONL path), scored by log-likelihood at each record. total_steps: the last step
    training will reach (meta.json). The writer lock is held from the first `record` until `close()`.
    """

    def __init__(self, model, run_dir: str | Path, probes, tokenizer=None, *, routers: Sequence[Any] | None = None,
                 top_k: int | None = None, router: str = "softmax", forward: Callable | None = None, tests=None,
                 batch_size: int = 16, max_len: int | None = None, total_steps: int | None = None,
                 producer: str = "torch_loop"):
        from moegrok import torch_capture as tc

        self.model, self.run_dir = model, Path(run_dir)
        self.probes = read_probes(probes)
        self.tok = _Tokens(tokenizer)
        if routers is not None:
            if top_k is None:
                raise MoegrokError("monitor: with routers=..., say top_k (experts per token)")
            self.spec = tc.custom_spec(model, routers, top_k, router)
        else:
            self.spec = tc.router_spec(model)
        self.forward = forward
        self.tests = self._tests(tests)
        self.batch_size, self.max_len = int(batch_size), max_len
        self.total_steps, self.producer = total_steps, producer
        self.rank, self.world = _rank()
        self.writer = None

    @staticmethod
    def _tests(tests) -> list[dict]:
        from moegrok.trajectory import read_tests

        if tests is None:
            return []
        if isinstance(tests, (str, Path)):
            return read_tests(tests)
        return [dict(t) for t in tests]

    # -- the run directory --
    def _open(self):
        from moegrok.trajectory import test_records
        from moegrok.writer import RunWriter

        if self.writer is None and self.rank == 0:
            cfg = getattr(self.model, "config", None)
            self.writer = RunWriter(self.run_dir, producer=self.producer, probes=self.probes,
                                    tests=test_records(self.tests), meta=dict(
                    num_layers=len(self.spec.routers), num_experts=self.spec.num_experts, top_k=self.spec.top_k,
                    d_model=self.spec.d_model, domains=sorted({r["domain"] for r in self.probes}),
                    model_type=getattr(cfg, "model_type", None) or self.spec.family, router=self.spec.kind,
                    backend="torch", total_steps=self.total_steps, finished=False))
        return self.writer

    def record(self, step: int) -> dict[str, float]:
        """Capture, write (rank 0) and return the live indicators as {"moegrok/<indicator>/<domain>": value}."""
        from moegrok.analysis import indicators
        from moegrok.trajectory import record_for, sample_id, score_multiple_choice, tokenize, torch_backend

        out = self._open()
        backend = dataclasses.replace(torch_backend(), probe_record=self._probe_record,
                                      token_logprobs=self._token_logprobs)
        limit = self.max_len or _context(self.model)
        seqs = tokenize(self.tok, [r["text"] for r in self.probes], limit, False, "probe text")
        rec = record_for(self.model, seqs, [sample_id(r["id"], i) for i, r in enumerate(self.probes)],
                         [r["domain"] for r in self.probes], self.batch_size, self.tok.pad_id, None, backend)
        test = score_multiple_choice(self.model, self.tok, self.tests, limit, self.batch_size, self.tok.pad_id,
                                     "sum", backend) if self.tests else {}
        norms = torch_param_norms(self.model, self.spec)
        live = {}
        if self.rank == 0:
            out.write_checkpoint(step, rec, {"val_loss": {}, "test": test, "param_norms": norms})
            domains = sorted({r["domain"] for r in self.probes})
            values = indicators.compute(indicators.Checkpoint(
                step, types.SimpleNamespace(**rec), {}, norms), domains)
            out.log_indicators(step, values)
            live = {KEY.format(name=n, domain=d): v for n, vs in values.items() for d, v in vs.items()
                    if np.isfinite(v)}
        return live

    def _probe_record(self, model, *args, **kw):
        from moegrok import torch_capture as tc

        return tc.probe_record(model, *args, spec=self.spec, forward=self.forward, **kw)

    def _token_logprobs(self, model, *args, **kw):
        from moegrok import torch_capture as tc

        return tc.token_logprobs(model, *args, forward=self.forward, **kw)

    def log(self, step: int, scalars: Mapping[str, float]) -> None:
        """Training scalars into metrics.jsonl (rank 0)."""
        out = self._open()
        if out is not None:
            out.log(step, scalars)

    def close(self, finished: bool = True) -> None:
        if self.writer is not None:
            if finished:
                self.writer.finish()
            self.writer.close()
            self.writer = None

    def __enter__(self) -> "RoutingMonitor":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(finished=exc_type is None)


def _context(model) -> int:
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    return int(getattr(cfg, "max_position_embeddings", None) or 2048)


__all__ = ["RoutingMonitor", "read_probes", "torch_param_norms"]
