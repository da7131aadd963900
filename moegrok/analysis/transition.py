"""Late, sharp generalization: when a domain's test accuracy turns *after* its training answers are memorized.

The definition (docs/METHOD.md, "Transitions"), fixed before any sweep was looked at:

- ``t_mem``: the first checkpoint from which the **median** over the domain's probe samples of the *answer* loss
  stays <= ``mem_loss`` (0.2 nats) at every later checkpoint. The median, so a few hard samples do not hold it back.
- gain ``G`` = final test accuracy - test accuracy at ``t_mem``.
- the 10 % point (the **onset**) and the 90 % point: the first checkpoint at or after ``t_mem`` whose accuracy is at
  least ``acc(t_mem) + 0.1 G`` (resp. ``0.9 G``).
- the transition is **late and sharp** when ``G >= min_gain`` (0.4), the onset is at least ``min_delay`` (3)
  checkpoints after ``t_mem``, and the steps from the 10 % to the 90 % point span at most ``max_rise`` (25 %) of the
  training steps. Partial generalization before ``t_mem`` is allowed; a slow creep is not a transition.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

MEM_LOSS = 0.2
MIN_GAIN = 0.4
MIN_DELAY = 3
MAX_RISE = 0.25


@dataclasses.dataclass(frozen=True)
class Transition:
    """One domain's accuracy curve judged by the definition above. Indices are checkpoint positions."""

    domain: str
    t_mem: int | None  # checkpoint index; None: never memorized
    gain: float  # G (NaN when never memorized)
    onset: int | None  # index of the 10 % point (None without a positive gain)
    end: int | None  # index of the 90 % point
    delay: int | None  # onset - t_mem, in checkpoints
    rise_frac: float  # (step[end] - step[onset]) / total_steps (NaN without both points)
    late_sharp: bool
    steps: tuple[int, ...] = ()

    @property
    def onset_step(self) -> int | None:
        return None if self.onset is None else self.steps[self.onset]

    @property
    def t_mem_step(self) -> int | None:
        return None if self.t_mem is None else self.steps[self.t_mem]

    def describe(self) -> str:
        if self.t_mem is None:
            return f"{self.domain}: answers never memorized (median answer loss > {MEM_LOSS})"
        s = f"{self.domain}: memorized at step {self.t_mem_step}, gain {self.gain:+.2f}"
        if self.onset is not None:
            s += (f", 10 % point at step {self.onset_step} ({self.delay} checkpoints later), "
                  f"10-90 % rise over {self.rise_frac:.0%} of training")
        return s + (" -> late and sharp" if self.late_sharp else " -> no late, sharp transition")


def memorized_since(median_loss: Sequence[float], mem_loss: float = MEM_LOSS) -> int | None:
    """First index from which every value is <= mem_loss (NaN counts as above); None if the last one is not."""
    x = np.asarray(median_loss, dtype=float)
    ok = np.where(np.isnan(x), False, x <= mem_loss)
    if not len(ok) or not ok[-1]:
        return None
    bad = np.flatnonzero(~ok)
    return int(bad[-1] + 1) if len(bad) else 0


def judge(domain: str, steps: Sequence[int], accuracy: Sequence[float], median_answer_loss: Sequence[float],
          total_steps: int, *, mem_loss: float = MEM_LOSS, min_gain: float = MIN_GAIN, min_delay: int = MIN_DELAY,
          max_rise: float = MAX_RISE) -> Transition:
    """Apply the definition to one domain's per-checkpoint accuracy and median answer loss."""
    steps = tuple(int(s) for s in steps)
    acc = np.asarray(accuracy, dtype=float)
    if not (len(steps) == len(acc) == len(median_answer_loss)):
        raise ValueError("steps, accuracy and median_answer_loss must have one value per checkpoint")
    nan = float("nan")
    t_mem = memorized_since(median_answer_loss, mem_loss)
    if t_mem is None:
        return Transition(domain, None, nan, None, None, None, nan, False, steps)
    gain = float(acc[-1] - acc[t_mem])
    if not gain > 0:
        return Transition(domain, t_mem, gain, None, None, None, nan, False, steps)
    after = acc[t_mem:]
    onset = t_mem + int(np.argmax(after >= acc[t_mem] + 0.1 * gain - 1e-12))
    end = t_mem + int(np.argmax(after >= acc[t_mem] + 0.9 * gain - 1e-12))
    delay = onset - t_mem
    rise = (steps[end] - steps[onset]) / float(total_steps)
    ok = gain >= min_gain and delay >= min_delay and rise <= max_rise
    return Transition(domain, t_mem, gain, onset, end, delay, rise, bool(ok), steps)


def domain_curves(run, domain: str) -> tuple[list[int], list[float], list[float]]:
    """(steps, test accuracy, median answer loss of the domain's probe samples) from a :class:`RunDir`."""
    steps, acc, med = [], [], []
    for s in run.steps:
        ev = run.eval(s)
        if domain not in ev.accuracy:
            continue
        pr = run.probe(s)
        al = pr.answer_loss
        if al is None:
            med.append(float("nan"))
        else:
            vals = al[(pr.domains == domain) & ~np.isnan(al)]
            med.append(float(np.median(vals)) if len(vals) else float("nan"))
        steps.append(s)
        acc.append(ev.accuracy[domain])
    return steps, acc, med


def run_transitions(run, **kw) -> dict[str, Transition]:
    """Every domain of a run directory (a :class:`RunDir` or a path) judged by the definition."""
    from moegrok.rundir import RunDir

    run = run if isinstance(run, RunDir) else RunDir(run)
    total = int(run.meta.get("total_steps") or (run.steps[-1] if run.steps else 1))
    out = {}
    for d in run.meta.get("domains", []):
        steps, acc, med = domain_curves(run, d)
        if steps:
            out[d] = judge(d, steps, acc, med, total, **kw)
    return out
