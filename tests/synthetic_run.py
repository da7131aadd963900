"""Hand-made run directories for analysis tests: a plausible small run written through moegrok.rundir only.

Shape of the story it tells: probe losses fall and flatten (samples memorized at staggered checkpoints), test
accuracy rises a few checkpoints later, routing sharpens towards a per-domain pattern as training goes on.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from moegrok.rundir import write_jsonl, write_meta, write_record


@dataclasses.dataclass(frozen=True)
class SynthSpec:
    domains: tuple[str, ...] = ("math", "knowledge")
    samples_per_domain: int = 12
    tests_per_domain: int = 10
    num_checkpoints: int = 8
    step_every: int = 100
    num_layers: int = 3
    num_experts: int = 8
    top_k: int = 2
    d_model: int = 16
    seq_len: int = 10
    finished: bool = True
    seed: int = 0
    singleton_group: bool = False  # make exactly one math sample memorized at checkpoint 1 (a group of one)
    constant_val_loss: bool = False
    generalizes: bool = True  # False: a control run whose test accuracy stays at chance
    # Also write `answer_loss` (the memorization story above) and make `sample_loss` that plus a slow drift, as
    # for synthetic documents whose random operand tokens keep the whole-sample loss from ever settling.
    answer_loss: bool = False


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def make_run(path: str | Path, spec: SynthSpec = SynthSpec()) -> Path:
    rng = np.random.default_rng(spec.seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    D, n, m, T = len(spec.domains), spec.samples_per_domain, spec.tests_per_domain, spec.num_checkpoints
    L, E, d, S, k = spec.num_layers, spec.num_experts, spec.d_model, spec.seq_len, spec.top_k
    steps = [spec.step_every * (i + 1) for i in range(T)]
    N = D * n
    dom = np.repeat(np.array(spec.domains), n)

    # Memorization checkpoint per sample: staggered over the first half, a quarter never memorized.
    mem_at = rng.integers(1, max(2, T // 2 + 1), size=N)
    mem_at[rng.permutation(N)[: N // 4]] = T + 5
    if spec.singleton_group:
        mem_at[:n][mem_at[:n] == 1] = 2
        mem_at[0] = 1
    # Generalization checkpoint per test item: a lag of 2-3 checkpoints after its domain's memorization.
    gen_at = np.concatenate([rng.integers(min(T - 1, 3), T, size=m) for _ in range(D)])
    gen_at[rng.permutation(D * m)[: m // 3]] = T + 5

    probes = []
    for i in range(N):
        a, b = rng.integers(0, 47, size=2)
        text = (f"{a} + {b} = {(a + b) % 47} ;" if dom[i] == "math"
                else f"e{a % 20} r{b % 10} = e{(a * 7 + b) % 20} ;")
        probes.append({"id": i, "domain": str(dom[i]), "text": text})
    tests = []
    for j in range(D * m):
        dj = spec.domains[j // m]
        a, b = rng.integers(0, 47, size=2)
        if dj == "math":
            tests.append({"id": f"t{j}", "domain": dj, "prompt": f"{a} + {b} =", "answer": str((a + b) % 47)})
        else:
            tests.append({"id": f"t{j}", "domain": dj, "prompt": f"e{a % 20} r{b % 10} =",
                          "answer": f"e{(a * 7 + b) % 20}"})
    write_jsonl(path / "probes.jsonl", probes)
    write_jsonl(path / "tests.jsonl", tests)
    (path / "config.yaml").write_text("model: {num_layers: %d, num_experts: %d}\n" % (L, E))
    write_meta(path, producer="tests.synthetic_run", num_layers=L, num_experts=E, top_k=k, d_model=d,
               domains=list(spec.domains), finished=False)

    base_logits = rng.normal(size=(N, L, E))  # instance-specific routing at the start
    pattern = {dname: rng.normal(size=(L, E)) * 3 for dname in spec.domains}  # shared routing it converges to
    W0 = rng.normal(size=(L, E, d))
    shared_dir = rng.normal(size=(E, d))
    tokens = rng.integers(0, 82, size=(N, S))
    mask = np.ones((N, S), dtype=bool)
    mask[::3, -2:] = False
    # Final loss per sample: memorized ones plateau low (spread so the epsilon search has something to choose),
    # the others are still falling at the end.
    final = np.where(mem_at <= T, rng.uniform(0.03, 0.6, size=N), rng.uniform(0.8, 2.0, size=N))
    for c, step in enumerate(steps):
        frac = c / max(1, T - 1)
        ramp = np.clip(1 - c / np.minimum(mem_at, max(T - 1, 1)), 0, 1)
        loss = final + (3.0 - final) * ramp + 0.01 * rng.random(N)
        shared = np.stack([pattern[x] for x in dom])
        logits = (1 - frac) * base_logits + frac * shared
        route = _softmax(logits)
        # Router weights drift towards a shared direction per expert, so adjacent-layer cosines rise.
        W = (1 - 0.7 * frac) * W0 + 0.7 * frac * shared_dir[None]
        tok_logits = logits[:, None] + 0.5 * rng.normal(size=(N, S, L, E))
        tok_p = _softmax(tok_logits)
        order = np.argsort(-tok_p, axis=-1, kind="stable")[..., :k]
        probe = {
            "sample_ids": np.arange(N), "domains": dom, "sample_loss": loss.astype(np.float32),
            "route_probs": route.astype(np.float32), "router_weights": W.astype(np.float32),
            "topk_ids": order.astype(np.int32),
            "topk_weights": np.take_along_axis(tok_p, order, -1).astype(np.float32),
            "token_mask": mask, "tokens": tokens.astype(np.int32),
        }
        if spec.answer_loss:
            probe["answer_loss"] = probe["sample_loss"]
            probe["sample_loss"] = (loss + 1.3 + 0.2 * (T - c)).astype(np.float32)
        test = {}
        for di, dname in enumerate(spec.domains):
            g = gen_at[di * m:(di + 1) * m]
            correct = (c >= g).astype(int) if spec.generalizes else (rng.random(m) < 0.05).astype(int)
            test[dname] = {"accuracy": float(correct.mean()), "ids": [t["id"] for t in tests[di * m:(di + 1) * m]],
                           "correct": correct.tolist()}
        val = {dname: 2.0 if spec.constant_val_loss else float(2.5 - 0.5 * frac + 0.05 * rng.random())
               for dname in spec.domains}
        write_record(path, step, probe, {"val_loss": val, "test": test})
    if spec.finished:
        write_meta(path, finished=True)
    return path
