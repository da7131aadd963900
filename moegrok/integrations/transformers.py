"""`MoegrokCallback`: moegrok's routing monitor inside transformers' `Trainer`.

    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                      callbacks=[MoegrokCallback("runs/monitor", "probes.jsonl")])

At each checkpoint save (or every `every` steps) the probe texts go through the model being trained (see
`RoutingMonitor`: eval mode, no grad, no cache, modes and random state untouched), the record is written to the run
directory (`moegrok analyze` / `moegrok indicators` read it), and the live indicators are logged through the
Trainer's own `log` as ``moegrok/<indicator>/<domain>`` — so they reach whatever `report_to` names (TensorBoard,
W&B, ...) and `trainer.state.log_history`. Under several processes every rank runs the probe forward and rank 0
writes.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from moegrok.integrations.monitor import RoutingMonitor


def _calling_trainer():
    """The Trainer whose callback handler is calling us. A callback receives the model, tokenizer, optimizer and
    data loaders but not the Trainer, and logging "through the Trainer's own log" (so every reporting callback sees
    the values) needs it; every event is dispatched from a Trainer method a few frames up."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(12):
            frame = frame.f_back
            if frame is None:
                return None
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                return obj
    finally:
        del frame
    return None


class MoegrokCallback(TrainerCallback):
    """Write a moegrok run directory while a transformers Trainer trains an MoE model.

    run_dir: the run directory. probes: a probes.jsonl path or a list of {"id", "domain", "text"}. tokenizer: the
    Trainer's `processing_class` when not given. tests: optional multiple-choice items (list or JSONL path).
    every: record every N optimizer steps instead of at each checkpoint save. batch_size / max_len: the probe
    forward's batch and the longest probe in tokens (default: the model's context).
    """

    def __init__(self, run_dir: str | Path, probes, *, tokenizer=None, tests=None, every: int | None = None,
                 batch_size: int = 16, max_len: int | None = None):
        if every is not None and (not isinstance(every, int) or every < 1):
            raise ValueError(f"MoegrokCallback: every must be None (at each save) or a positive integer, got {every!r}")
        self.run_dir, self.probes, self.tokenizer, self.tests = Path(run_dir), probes, tokenizer, tests
        self.every, self.batch_size, self.max_len = every, batch_size, max_len
        self.monitor: RoutingMonitor | None = None
        self.trainer = None  # found on the first event; `bind(trainer)` sets it explicitly
        self.recorded: list[int] = []

    def bind(self, trainer) -> "MoegrokCallback":
        self.trainer = trainer
        return self

    def _monitor(self, model, processing_class, state) -> RoutingMonitor:
        if self.monitor is None:
            self.monitor = RoutingMonitor(model, self.run_dir, self.probes, self.tokenizer or processing_class,
                                          tests=self.tests, batch_size=self.batch_size, max_len=self.max_len,
                                          total_steps=int(state.max_steps) or None, producer="hf_trainer")
        return self.monitor

    def _record(self, state, model, processing_class) -> None:
        step = int(state.global_step)
        if step in self.recorded:
            return
        live = self._monitor(model, processing_class, state).record(step)
        self.recorded.append(step)
        if live and state.is_world_process_zero:
            trainer = self.trainer or _calling_trainer()
            if trainer is not None:
                trainer.log(dict(live))
            else:  # no Trainer found: the history still gets the row
                state.log_history.append({**live, "step": step})

    def on_save(self, args, state, control, model=None, processing_class=None, **kwargs: Any):
        if self.every is None:
            self._record(state, model, processing_class)

    def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs: Any):
        if self.every is not None and state.global_step % self.every == 0:
            self._record(state, model, processing_class)

    def on_train_end(self, args, state, control, **kwargs: Any):
        if self.monitor is not None:
            self.monitor.close(finished=True)
            self.monitor = None
