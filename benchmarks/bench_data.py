"""Batch generation speed of moegrok.data vs a straightforward on-the-fly generator.

    python benchmarks/bench_data.py [--steps 7500]

ours: ``corpus.batch(step)`` of the default study corpus (16 math + 16 knowledge documents, 49 tokens), which
slices tables built once. reference: what a plain per-step generator does: draw 8 training facts per document,
format the text, tokenize it with the same built-in tokenizer, pad. Both produce the same kind of batch; the
trainer step it must stay far below is ~0.04-0.08 s on this machine (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from moegrok.data import DataConfig, build_corpus
from moegrok.data.corpus import domain_rng
from moegrok.data.synthetic import make_facts

TRAINER_STEP_S = 0.078


def reference_batch(step, facts, tok, seq_len, per_domain, statements, seed):
    rng = np.random.default_rng([seed, step])
    rows = []
    for f in facts:
        for _ in range(per_domain):
            ks = rng.choice(f.train_facts, size=statements)
            text = " ".join(" ".join(f.prompts[k] + f.answers[k]) + " ;" for k in ks)
            rows.append([tok.bos_id] + tok.encode(text))
    tokens = np.full((len(rows), seq_len), tok.pad_id, np.int32)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7500)
    ap.add_argument("--reps", type=int, default=2000)
    args = ap.parse_args()
    cfg = DataConfig(num_steps=args.steps)
    t0 = time.perf_counter()
    corpus = build_corpus(cfg)
    build_s = time.perf_counter() - t0

    steps = np.random.default_rng(0).integers(0, corpus.num_steps, size=args.reps)
    corpus.batch(0)
    t0 = time.perf_counter()
    for s in steps:
        corpus.batch(int(s))
    ours = (time.perf_counter() - t0) / args.reps

    facts = [make_facts(d, domain_rng(cfg.seed, d.name, "facts")) for d in cfg.domains]
    n_ref = max(args.reps // 20, 20)
    t0 = time.perf_counter()
    for s in steps[:n_ref]:
        reference_batch(int(s), facts, corpus.tokenizer, corpus.seq_len, 16, cfg.statements_per_doc, cfg.seed)
    ref = (time.perf_counter() - t0) / n_ref

    full = DataConfig.from_dict({"num_steps": args.steps, "domains": {
        k: {"docs_per_step": 4} for k in ("math", "math_twin", "knowledge", "knowledge_twin", "code", "code_twin",
                                          "retrieval", "retrieval_twin")}})
    t0 = time.perf_counter()
    build_corpus(full)
    build_all_s = time.perf_counter() - t0

    print(f"corpus: {corpus}")
    print(f"build (2 domains, {corpus.num_steps * corpus.batch_size:,} documents): {build_s:.2f} s; "
          f"build (8 domains x 4 docs/step, {args.steps * 32:,} documents, seq_len 65): {build_all_s:.2f} s")
    print(f"{'':28s}{'ours':>12s}{'reference':>12s}{'ratio':>10s}")
    print(f"{'batch [32 x 49] time':28s}{ours * 1e6:>10.1f}us{ref * 1e6:>10.0f}us{ref / ours:>9.0f}x")
    print(f"share of a {TRAINER_STEP_S * 1e3:.0f} ms trainer step: ours {ours / TRAINER_STEP_S:.2%}, "
          f"reference {ref / TRAINER_STEP_S:.1%}")


if __name__ == "__main__":
    main()
