"""The routing monitor's overhead inside transformers' `Trainer` (`MoegrokCallback`; acceptance: <= 3 % of training
time at the default cadence, one record per checkpoint save).

    python benchmarks/bench_monitor.py [--rounds 6 --steps 30 --every 10 --warmup 2 --threads 1]
                                       [--d 256 --layers 4 --experts 16 --topk 2 --moe-inter 128 --seq 128 --batch 8]

A random `Qwen3MoeForCausalLM` (hidden 256, 4 layers, 16 experts top-2, moe_intermediate 128, 4 heads / 2 KV heads,
dense intermediate unused, float32, transformers' default experts implementation) is trained on a synthetic corpus of
128-token sequences (batch 8) with a word-level tokenizer of ~1k words built locally with `tokenizers`; the corpus
and the probe set are drawn from the same four synthetic "domains" (arithmetic, prose, code, lists). The probe set is
64 texts, 16 per domain, of 32-64 tokens each (the monitor's default probe batch 16, no multiple-choice tests).

Three measurements, interleaved in every round in one process (this VM's speed drifts by tens of percent between
minutes, so only same-round comparisons mean anything), with `torch.set_num_threads(--threads)` for all of them:

(a) plain: `Trainer.train()` for warmup + N optimizer steps, no moegrok callback. A timing callback takes the clock
    at `on_step_end` of the last warm-up step and of the last step, so Trainer/optimizer set-up and the first steps
    (AdamW state allocation) are outside the window. Save and logging are off (`save_strategy="no"`).
(b) monitored: the same with `MoegrokCallback(run_dir, probes, every=K)` placed before the timing callback, so the
    N / K records (steps K, 2K, ... inside the window, each including its run-directory write and the live
    indicators logged through `Trainer.log`) are inside the measured time. Each round uses a new run directory, so
    the first record's writer open is included too, as in a real run.
(c) record: `RoutingMonitor.record(step)` alone on the same model (a monitor kept across rounds, increasing steps),
    timed 3 times per round after one untimed warm-up record.

The rounds alternate the order of (a) and (b). Reported: seconds per training step (median over rounds of (a)),
seconds per record (median of (c), and the record time implied by (b) - (a)), and the overhead fraction
record_time / (cadence * step_time) at HF's default cadence (save_steps=500, one record per save) and at every 100
and every 50 steps; the same from the record / step ratio taken within each round (less exposed to the drift); and
the directly measured (b)/(a) - 1 per round, which is noisy on this box.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

DOMAINS = ("math", "prose", "code", "lists")
NUMBERS = "zero one two three four five six seven eight nine ten eleven twelve".split()
OPS = "plus minus times equals is than greater less half double".split()
PROSE = ("the a an cat dog bird man woman child house tree river road city sun moon rain wind sat ran saw "
         "took gave walked found said over under near with by from into on at quietly slowly never always "
         "and but because when while then after before old young small big red green").split()
CODE = "def return if else for in range while print import class self = ( ) : [ ] , + - * == != < > x y i n".split()
LISTS = "first second third next last item list apple pear plum milk bread salt tea rice egg fish and".split()


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def build_vocab(size: int) -> list[str]:
    words = list(dict.fromkeys(NUMBERS + OPS + PROSE + CODE + LISTS))
    syll = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]  # 70 syllables -> 4900 two-syllable words
    rng = random.Random(0)
    extra = sorted({a + b for a in syll for b in syll} - set(words))
    rng.shuffle(extra)
    return words + extra[:max(0, size - 2 - len(words))]


def tokenizer(vocab_words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(vocab_words)}}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, pad_token="<pad>", unk_token="<unk>")


def sentence(domain: str, rng: random.Random, rare: list[str]) -> list[str]:
    if domain == "math":
        a, b = rng.randrange(6), rng.randrange(6)
        return [NUMBERS[a], rng.choice(["plus", "times", "minus"]), NUMBERS[b], "equals", rng.choice(NUMBERS), "."]
    if domain == "prose":
        return [rng.choice(["the", "a"]), rng.choice(PROSE[3:15]), rng.choice(PROSE[15:24]), rng.choice(PROSE[24:33]),
                "the", rng.choice(PROSE[3:15] + rare[:200]), rng.choice(["quietly", "slowly", "."]), "."]
    if domain == "code":
        v = rng.choice(["x", "y", "i", "n"] + rare[200:300])
        return ["def", v, "(", "self", ")", ":", "return", v, rng.choice(["+", "-", "*"]), rng.choice(NUMBERS[:5])]
    return [rng.choice(["first", "second", "third", "next", "last"]), "item", ":",
            *rng.sample(LISTS[7:17] + rare[300:], 3), "."]


def text(domain: str, n_tokens: int, rng: random.Random, rare: list[str]) -> str:
    words: list[str] = []
    while len(words) < n_tokens:
        words += sentence(domain, rng, rare)
    return " ".join(words[:n_tokens])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=30, help="measured optimizer steps per run (N)")
    p.add_argument("--every", type=int, default=10, help="record cadence in (b) (K); N/K records in the window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of each run")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--topk", type=int, default=2)
    p.add_argument("--moe-inter", type=int, default=128)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--probes", type=int, default=64)
    p.add_argument("--record-repeats", type=int, default=3)
    args = p.parse_args()
    if args.every > args.warmup + args.steps or (args.warmup + args.steps) // args.every - args.warmup // args.every < 1:
        p.error("--every must put at least one record inside the measured window")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from moegrok.integrations.monitor import RoutingMonitor
    from moegrok.integrations.transformers import MoegrokCallback

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)

    words = build_vocab(args.vocab)
    tok = tokenizer(words)
    rare = words[len(dict.fromkeys(NUMBERS + OPS + PROSE + CODE + LISTS)):]
    rng = random.Random(1)
    probes = []
    for i in range(args.probes):
        dom = DOMAINS[i % len(DOMAINS)]
        probes.append({"id": i, "domain": dom, "text": text(dom, rng.randint(32, 64), rng, rare)})
    probe_lens = [len(tok(pr["text"])["input_ids"]) for pr in probes]

    class Corpus(torch.utils.data.Dataset):
        def __init__(self, n: int):
            r = random.Random(2)
            self.rows = [tok(text(DOMAINS[i % len(DOMAINS)], args.seq, r, rare))["input_ids"][:args.seq]
                         for i in range(n)]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return {"input_ids": self.rows[i]}

    ds = Corpus(max(256, args.batch * 32))
    assert all(len(r) == args.seq for r in ds.rows)

    cfg = transformers.Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=args.d, intermediate_size=2 * args.d, moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=2, head_dim=args.d // 4,
        num_experts=args.experts, num_experts_per_tok=args.topk, pad_token_id=0,
        max_position_embeddings=max(256, args.seq), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    collator = transformers.DataCollatorForLanguageModeling(tok, mlm=False)

    class Clock(TrainerCallback):
        def __init__(self, start: int, end: int):
            self.start, self.end, self.t0, self.t1 = start, end, None, None

        def on_step_end(self, a, state, control, **kw):
            if state.global_step == self.start:
                self.t0 = time.perf_counter()
            elif state.global_step == self.end:
                self.t1 = time.perf_counter()

    tmp = Path(tempfile.mkdtemp(prefix="bench_monitor_"))
    total = args.warmup + args.steps
    seed_counter = iter(range(10_000))

    def train(callback: bool, tag: str) -> tuple[float, int]:
        clock = Clock(args.warmup, total)
        cbs = []
        mcb = None
        if callback:
            mcb = MoegrokCallback(tmp / f"run_{tag}", probes, every=args.every)
            cbs.append(mcb)
        cbs.append(clock)  # after the monitor: the step-end clock reading includes the record
        targs = TrainingArguments(
            output_dir=str(tmp / f"out_{tag}"), max_steps=total, save_strategy="no", logging_strategy="no",
            per_device_train_batch_size=args.batch, learning_rate=1e-3, report_to=[], use_cpu=True,
            seed=next(seed_counter), disable_tqdm=True, dataloader_num_workers=0)
        trainer = Trainer(model=model, args=targs, train_dataset=ds, processing_class=tok, data_collator=collator,
                          callbacks=cbs)
        trainer.remove_callback(transformers.trainer_callback.PrinterCallback)  # no log lines in the output
        trainer.train()
        in_window = [s for s in (mcb.recorded if mcb else []) if s > args.warmup]
        shutil.rmtree(tmp / f"out_{tag}", ignore_errors=True)
        return clock.t1 - clock.t0, len(in_window)

    rec_monitor = RoutingMonitor(model, tmp / "run_record", probes, tok, producer="bench")
    rec_step = iter(range(1, 1_000_000))
    rec_monitor.record(next(rec_step))  # warm-up: writer open, first capture

    def record_once() -> float:
        t0 = time.perf_counter()
        rec_monitor.record(next(rec_step))
        return time.perf_counter() - t0

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, torch threads {torch.get_num_threads()}"
          f", cpu_count {os.cpu_count()}, experts impl {getattr(model.config, '_experts_implementation', None)}")
    print(f"model: Qwen3-MoE d={args.d} layers={args.layers} experts={args.experts} top-{args.topk} "
          f"moe_inter={args.moe_inter} vocab={len(tok)} params={n_params / 1e6:.2f}M; batch {args.batch} x "
          f"{args.seq} tokens")
    print(f"probes: {len(probes)} texts, {len(DOMAINS)} domains, {min(probe_lens)}-{max(probe_lens)} tokens "
          f"(mean {statistics.mean(probe_lens):.1f})")
    print(f"per run: {args.warmup} warm-up + {args.steps} timed steps; (b) records every {args.every} steps")
    print(f"load average at start: {loadavg()}", flush=True)

    plain, mon, rec, rec_implied, direct, ratio = [], [], [], [], [], []
    for r in range(args.rounds):
        order = ("plain", "mon") if r % 2 == 0 else ("mon", "plain")
        res = {}
        for which in order:
            res[which] = train(which == "mon", f"{which}{r}")
        recs = [record_once() for _ in range(args.record_repeats)]
        (tp, _), (tm, nrec) = res["plain"], res["mon"]
        sp, sm = tp / args.steps, tm / args.steps
        implied = (tm - tp) / nrec
        plain.append(sp)
        mon.append(sm)
        rec.extend(recs)
        rec_implied.append(implied)
        direct.append(tm / tp - 1)
        ratio.append(statistics.median(recs) / sp)  # record / step within one round: immune to the minute drift
        print(f"round {r + 1} ({'/'.join(order)}): plain {sp:.3f} s/step, monitored {sm:.3f} s/step "
              f"({nrec} records in window, direct overhead {100 * (tm / tp - 1):+.1f} %, implied record "
              f"{implied:.3f} s), record alone {' '.join(f'{x:.3f}' for x in recs)} s "
              f"(= {ratio[-1]:.2f} plain steps); "
              f"loadavg {loadavg()}", flush=True)
    rec_monitor.close()
    shutil.rmtree(tmp, ignore_errors=True)

    step = statistics.median(plain)
    record = statistics.median(rec)
    print()
    print(f"seconds per training step (a, median of {len(plain)} rounds): {step:.3f} "
          f"(min {min(plain):.3f}, max {max(plain):.3f})")
    print(f"seconds per training step with the monitor every {args.every} (b): {statistics.median(mon):.3f}")
    print(f"seconds per record (c, median of {len(rec)}): {record:.3f} (min {min(rec):.3f}, max {max(rec):.3f}); "
          f"implied by (b)-(a): median {statistics.median(rec_implied):.3f}")
    print()
    print("| cadence | records per steps | overhead = record / (cadence x step) |")
    print("|---|---|---|")
    for cad, label in ((500, "every 500 steps (HF default save_steps)"), (100, "every 100 steps"),
                       (50, "every 50 steps"), (args.every, f"every {args.every} steps (as in b)")):
        print(f"| {label} | 1 / {cad} | {100 * record / (cad * step):.2f} % |")
    print(f"| measured directly, (b)/(a) - 1 at every {args.every} (noisy) | 1 / {args.every} | median "
          f"{100 * statistics.median(direct):+.1f} % (rounds: {', '.join(f'{100 * d:+.1f}' for d in direct)}) |")
    rq = statistics.quantiles(ratio, n=4) if len(ratio) > 1 else [ratio[0]] * 3
    print(f"| same-round ratio record / step: median {statistics.median(ratio):.2f} steps (quartiles "
          f"{rq[0]:.2f}-{rq[2]:.2f}, range {min(ratio):.2f}-{max(ratio):.2f}) | at 500 / 100 / 50 | "
          f"{' / '.join(f'{100 * statistics.median(ratio) / c:.2f} %' for c in (500, 100, 50))} |")
    breakeven = record / (0.03 * step)
    print()
    print(f"overhead reaches 3 % at a cadence of one record per {breakeven:.0f} steps (medians of (c) and (a)); "
          f"per-round ratio: {statistics.median(ratio) / 0.03:.0f} steps (range {min(ratio) / 0.03:.0f}-"
          f"{max(ratio) / 0.03:.0f}); at the default (500): {'<=' if record / (500 * step) <= 0.03 else '>'} 3 % "
          f"(worst round: {100 * max(ratio) / 500:.2f} %)")
    print(f"load average at end: {loadavg()}")


if __name__ == "__main__":
    main()
