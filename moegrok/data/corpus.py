"""The one-epoch corpus: every batch is a pure function of (config, step).

``build_corpus(cfg)`` generates (or reads) every domain's documents once, in epoch order, as token tables. Step ``s``
takes rows ``[s*w_d, (s+1)*w_d)`` of each domain ``d`` (``w_d = docs_per_step``), so a batch is a few array slices
(microseconds), every training document is used exactly once, and the trainer's data state is just the next step.

Sample ids are unique over the corpus: domain ``d`` owns the block ``[offset_d, offset_d + size_d)``; a synthetic
domain numbers its training documents in epoch order and then its validation documents; a text domain uses
``offset + position of the document in its file``. Test items have string ids ``"<domain>/<n>"`` (synthetic:
``n`` = fact index) or the file's own ids.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import zlib
from typing import Any, Iterator

import numpy as np

from moegrok.data import documents as D
from moegrok.data.config import DataConfig, DomainConfig
from moegrok.data.synthetic import FactTable, make_facts
from moegrok.data.tokenizer import BuiltinTokenizer, encode_batch, load_tokenizer
from moegrok.data.user import read_documents, read_test_items
from moegrok.errors import MoegrokError

_PURPOSE = {"facts": 1, "stream": 2, "val": 3, "split": 4}
MAX_AUTO_SEQ_LEN = 4096


def domain_rng(seed: int, name: str, purpose: str) -> np.random.Generator:
    """Independent stream per (seed, domain name, purpose): adding a domain leaves the others' data unchanged."""
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(name.encode()), _PURPOSE[purpose]]))


@dataclasses.dataclass(frozen=True)
class DomainData:
    """One domain, fully materialised. Row order of ``train_*`` is epoch order.

    ``train_tokens_NxT`` (int16 when the vocabulary fits, else int32), ``train_len_N`` int32 (real tokens incl. BOS),
    ``train_ids_N`` int64; ``probe_pos_P`` int64 rows of the training table used as probes; ``val``/``test``: dicts
    of arrays (see :meth:`Corpus.val_set`, :meth:`Corpus.test_set`); ``stats``: JSON-ready numbers.
    """

    config: DomainConfig
    train_tokens_NxT: np.ndarray
    train_len_N: np.ndarray
    train_ids_N: np.ndarray
    probe_pos_P: np.ndarray
    probe_answer_mask_PxT: np.ndarray
    val: dict[str, Any]
    test: dict[str, Any]
    stats: dict[str, Any]


def _word_encoder(tok, where: str):
    """Encode word tuples (synthetic pieces). The built-in vocabulary maps words to ids directly; an HF tokenizer
    sees each piece with a leading space, as it would inside a document."""
    if isinstance(tok, BuiltinTokenizer):
        return lambda pieces: [tok.encode_symbols(p) for p in pieces]

    def enc(pieces):
        texts = [" " + " ".join(p) for p in pieces]
        ids = encode_batch(tok, texts)
        unk = getattr(tok, "unk_id", None)
        for t, x in zip(texts, ids):
            if unk is not None and unk in x:
                raise MoegrokError(f"tokenizer {tok.directory}: {where}: the piece {t.strip()!r} contains a word the "
                                   "tokenizer maps to its unknown token")
        return ids

    return enc


def _check_prompts_distinct(tables: dict[str, D.StatementTable], facts: dict[str, FactTable]) -> None:
    # A prompt shared by two domains would let a test item of one be trained as a fact of the other.
    owner: dict[tuple[int, ...], tuple[str, int]] = {}
    for name, st in tables.items():
        for k, p in enumerate(st.prompt_F):
            prev = owner.setdefault(p, (name, k))
            if prev != (name, k):
                other, j = prev
                raise MoegrokError(
                    f"data config: domains '{other}' and '{name}' produce the same prompt "
                    f"{' '.join(facts[name].prompts[k])!r} (as {' '.join(facts[other].prompts[j])!r}); two domains "
                    "of one kind need different twin settings or sizes that do not overlap")


def _probe_positions(n_train: int, n_probe: int) -> np.ndarray:
    """Evenly spread over the epoch, so probes are first seen early, mid and late in training."""
    p = min(n_probe, n_train)
    return np.floor((np.arange(p) + 0.5) * n_train / max(p, 1)).astype(np.int64)


def _texts(tok, tokens: np.ndarray, length: np.ndarray) -> list[str]:
    return [tok.decode(row[:n].tolist()) for row, n in zip(tokens, length)]


def _exposure_stats(rows_NxS: np.ndarray, train_facts: np.ndarray, n_facts: int) -> dict[str, float]:
    counts = np.bincount(rows_NxS.ravel(), minlength=n_facts)[train_facts]
    return {"exposures_per_fact_mean": float(counts.mean()), "exposures_per_fact_min": int(counts.min()),
            "exposures_per_fact_max": int(counts.max())}


def _synthetic_domain(cfg: DataConfig, d: DomainConfig, facts: FactTable, st: D.StatementTable, tok, seq_len: int,
                      num_steps: int, offset: int, dtype) -> DomainData:
    where = f"domain '{d.name}'"
    n_train = num_steps * d.docs_per_step
    S = cfg.statements_per_doc
    D.check_enough_documents(len(facts.train_facts), S, n_train + cfg.val_docs, where)
    rows = D.training_rows(facts.train_facts, n_train, S, domain_rng(cfg.seed, d.name, "stream"), where)
    tokens, length, _ = D.assemble(rows, st, tok.bos_id, tok.pad_id, seq_len, dtype)
    probe_pos = _probe_positions(n_train, cfg.probe_docs)
    _, _, probe_amask = D.assemble(rows[probe_pos], st, tok.bos_id, tok.pad_id, seq_len)
    vrows = D.validation_rows(facts.train_facts, cfg.val_docs, S, rows, domain_rng(cfg.seed, d.name, "val"), where)
    vtok, vlen, vamask = D.assemble(vrows, st, tok.bos_id, tok.pad_id, seq_len)
    val = {"tokens": vtok, "length": vlen, "answer_mask": vamask,
           "sample_ids": offset + n_train + np.arange(cfg.val_docs, dtype=np.int64), "texts": _texts(tok, vtok, vlen)}
    ttok, tlen, tamask, plen = D.item_rows(facts.test_facts, st, tok.bos_id, tok.pad_id)
    if ttok.shape[1] > seq_len:
        raise MoegrokError(f"{where}: test items need {ttok.shape[1]} tokens but seq_len is {seq_len}")
    fidx = facts.test_facts.tolist()
    test = {"tokens": ttok, "length": tlen, "answer_mask": tamask, "prompt_len": plen,
            "ids": [f"{d.name}/{k}" for k in fidx],
            "prompts": [" ".join(facts.prompts[k]) for k in fidx],
            "answers": [" ".join(facts.answers[k]) for k in fidx]}
    stats = {"kind": d.kind, "twin": d.twin, "docs_per_step": d.docs_per_step, "train_docs": n_train,
             "val_docs": cfg.val_docs, "probe_docs": len(probe_pos), "test_items": len(fidx),
             "facts": facts.num_facts, "train_facts": len(facts.train_facts),
             "heldout_facts": len(facts.heldout_facts), "chance_accuracy": 1.0 / facts.answer_space,
             "train_tokens": int(length.sum()), **_exposure_stats(rows, facts.train_facts, facts.num_facts)}
    return DomainData(d, tokens, length, offset + np.arange(n_train, dtype=np.int64), probe_pos, probe_amask,
                      val, test, stats)


@dataclasses.dataclass(frozen=True)
class _TextSource:
    docs: Any  # user.TextDocs
    encoded: list[list[int]]
    items: list | None
    item_ids: list[list[int]] | None  # per item: prompt ids, answer ids


def _read_text_domain(d: DomainConfig, tok) -> _TextSource:
    docs = read_documents(d.train_path, d.text_format)
    encoded = encode_batch(tok, list(docs.texts))
    for k, ids in enumerate(encoded):
        if not ids:
            raise MoegrokError(f"{docs.path}:{docs.lines[k]}: document encodes to no tokens")
    items = item_ids = None
    if d.test_path is not None:
        items = read_test_items(d.test_path)
        prompts = encode_batch(tok, [it.prompt for it in items])
        answers = encode_batch(tok, [it.answer for it in items])
        for it, a in zip(items, answers):
            if not a:
                raise MoegrokError(f"{d.test_path}:{it.line}: answer {it.answer!r} encodes to no tokens")
        item_ids = list(zip(prompts, answers))
    return _TextSource(docs, encoded, items, item_ids)


def _text_domain(cfg: DataConfig, d: DomainConfig, src: _TextSource, tok, seq_len: int, num_steps: int,
                 offset: int, dtype) -> DomainData:
    n_docs = len(src.encoded)
    n_train = num_steps * d.docs_per_step
    perm = domain_rng(cfg.seed, d.name, "split").permutation(n_docs)  # files are often sorted: shuffle
    val_idx, train_idx = perm[:cfg.val_docs], perm[cfg.val_docs:cfg.val_docs + n_train]
    seqs = [[tok.bos_id] + ids + [tok.eos_id] for ids in src.encoded]
    truncated = sum(len(s) > seq_len for s in seqs)

    def table(idx, dt):
        return D.pad_rows([seqs[i][:seq_len] for i in idx.tolist()], tok.pad_id, seq_len)[0].astype(dt), \
            np.array([min(len(seqs[i]), seq_len) for i in idx.tolist()], dtype=np.int32)

    tokens, length = table(train_idx, dtype)
    vtok, vlen = table(val_idx, np.int32)
    probe_pos = _probe_positions(n_train, cfg.probe_docs)
    val = {"tokens": vtok, "length": vlen, "answer_mask": np.zeros(vtok.shape, bool),
           "sample_ids": offset + val_idx.astype(np.int64), "texts": [src.docs.texts[i] for i in val_idx.tolist()]}
    if src.items is not None:
        seq_items = [[tok.bos_id] + p + a for p, a in src.item_ids]
        plen = np.array([1 + len(p) for p, _ in src.item_ids], dtype=np.int32)
        for it, s in zip(src.items, seq_items):
            if len(s) > seq_len:
                raise MoegrokError(f"{d.test_path}:{it.line}: test item needs {len(s)} tokens (BOS + prompt + "
                                   f"answer) but seq_len is {seq_len}")
        ttok, tlen, tamask, plen = D.item_arrays(seq_items, plen, tok.pad_id)
        test = {"tokens": ttok, "length": tlen, "answer_mask": tamask, "prompt_len": plen,
                "ids": [it.id for it in src.items], "prompts": [it.prompt for it in src.items],
                "answers": [it.answer for it in src.items]}
    else:
        test = {"tokens": np.zeros((0, 1), np.int32), "length": np.zeros(0, np.int32),
                "answer_mask": np.zeros((0, 1), bool), "prompt_len": np.zeros(0, np.int32), "ids": [],
                "prompts": [], "answers": []}
    stats = {"kind": "text", "twin": False, "docs_per_step": d.docs_per_step, "train_docs": n_train,
             "val_docs": len(val_idx), "probe_docs": len(probe_pos), "test_items": len(test["ids"]),
             "file": src.docs.path, "docs_in_file": n_docs, "unused_docs": n_docs - cfg.val_docs - n_train,
             "truncated_docs": int(truncated), "train_tokens": int(length.sum()),
             # synthetic documents are unique by construction; a user's file may repeat itself
             "duplicate_docs": n_docs - len(set(src.docs.texts))}
    return DomainData(d, tokens, length, offset + train_idx.astype(np.int64), probe_pos,
                      np.zeros((len(probe_pos), seq_len), bool), val, test, stats)


def _resolve_steps(cfg: DataConfig, sources: dict[str, _TextSource]) -> int:
    avail = {}
    for d in cfg.domains:
        if d.kind != "text":
            continue
        n = len(sources[d.name].encoded)
        avail[d.name] = (n - cfg.val_docs) // d.docs_per_step
        if avail[d.name] < 1:
            raise MoegrokError(f"{d.train_path}: {n} documents, but domain '{d.name}' needs val_docs={cfg.val_docs} "
                               f"plus at least docs_per_step={d.docs_per_step} for one step")
    steps = cfg.num_steps if cfg.num_steps is not None else min(avail.values())
    for d in cfg.domains:
        if d.kind == "text" and avail[d.name] < steps:
            n = len(sources[d.name].encoded)
            raise MoegrokError(f"{d.train_path}: {n} documents supply {avail[d.name]} steps of domain '{d.name}' "
                               f"(docs_per_step={d.docs_per_step}, val_docs={cfg.val_docs}) but num_steps is {steps}")
    return steps


def _facts(cfg: DataConfig) -> dict:
    return {d.name: make_facts(d, domain_rng(cfg.seed, d.name, "facts")) for d in cfg.domains if d.kind != "text"}


def corpus_tokenizer(cfg: DataConfig, facts: dict | None = None):
    """The corpus's tokenizer: the local Hugging Face tokenizer if ``cfg.tokenizer`` is set, else the built-in
    vocabulary of the synthetic domains' symbols, with byte fallback when a text domain is present. Without
    ``facts`` they are generated as :func:`build_corpus` generates them (so `moegrok convert` can rebuild a run's
    tokenizer from its config alone)."""
    facts = _facts(cfg) if facts is None else facts
    symbols = list(dict.fromkeys(s for f in facts.values() for s in f.symbols))
    return load_tokenizer(cfg.tokenizer, symbols, byte_fallback=any(d.kind == "text" for d in cfg.domains))


def build_corpus(cfg: DataConfig) -> "Corpus":
    """Generate/read every domain of ``cfg`` and return the epoch. Deterministic in ``cfg`` (seed included)."""
    if not isinstance(cfg, DataConfig):
        raise MoegrokError(f"build_corpus expects a DataConfig, got {type(cfg).__name__} (use DataConfig.from_dict)")
    synth = [d for d in cfg.domains if d.kind != "text"]
    facts = _facts(cfg)
    tok = corpus_tokenizer(cfg, facts)
    tables = {d.name: D.encode_statements(facts[d.name], _word_encoder(tok, f"domain '{d.name}'"), d.name)
              for d in synth}
    _check_prompts_distinct(tables, facts)
    sources = {d.name: _read_text_domain(d, tok) for d in cfg.domains if d.kind == "text"}

    need = [1 + cfg.statements_per_doc * int(tables[d.name].length_F.max()) for d in synth]
    if cfg.seq_len is None:
        longest = need + [2 + max(len(x) for x in s.encoded) for s in sources.values()]
        seq_len = max(longest)
        if seq_len > MAX_AUTO_SEQ_LEN:
            raise MoegrokError(f"data config: the longest document has {seq_len} tokens; set field 'seq_len' "
                               "(documents longer than it are truncated)")
    else:
        seq_len = cfg.seq_len
        for d, n in zip(synth, need):
            if n > seq_len:
                raise MoegrokError(f"data config: field 'seq_len' ({seq_len}) is too short for domain '{d.name}': "
                                   f"documents need up to {n} tokens (BOS + {cfg.statements_per_doc} statements)")
    num_steps = _resolve_steps(cfg, sources)
    dtype = np.int16 if tok.vocab_size <= np.iinfo(np.int16).max else np.int32

    out, offset = [], 0
    for d in cfg.domains:
        if d.kind == "text":
            dd = _text_domain(cfg, d, sources[d.name], tok, seq_len, num_steps, offset, dtype)
            offset += len(sources[d.name].encoded)
        else:
            dd = _synthetic_domain(cfg, d, facts[d.name], tables[d.name], tok, seq_len, num_steps, offset, dtype)
            offset += len(dd.train_ids_N) + cfg.val_docs
        out.append(dd)
    return Corpus(cfg, tok, seq_len, num_steps, tuple(out))


class Corpus:
    """One epoch of mixed-domain documents. Build with :func:`build_corpus`; read with the methods below."""

    def __init__(self, config: DataConfig, tokenizer, seq_len: int, num_steps: int, domains: tuple[DomainData, ...]):
        self.config = config
        self.tokenizer = tokenizer
        self.seq_len = int(seq_len)
        self.num_steps = int(num_steps)
        self._dom = domains
        self.domains: tuple[str, ...] = tuple(d.config.name for d in domains)
        self.batch_size = sum(d.config.docs_per_step for d in domains)
        self._w = [d.config.docs_per_step for d in domains]
        self._domain_ids_B = np.repeat(np.arange(len(domains), dtype=np.int32), self._w)
        self._positions_T = np.arange(self.seq_len, dtype=np.int32)
        self._fingerprint: str | None = None

    # ---- training batches ----
    def batch(self, step: int) -> dict[str, np.ndarray]:
        """Batch of ``step`` (0-based): ``tokens`` int32 [B, T], ``mask`` bool [B, T] (True on real tokens, BOS
        included), ``sample_ids`` int64 [B], ``domain_ids`` int32 [B] (index into :attr:`domains`). Rows are grouped
        by domain in config order. A pure function of (config, step). Next-token training: inputs ``tokens[:, :-1]``,
        targets ``tokens[:, 1:]`` where ``mask[:, 1:]`` (BOS is never a target; the model sees ``seq_len - 1``
        positions)."""
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or not 0 <= step < self.num_steps:
            raise MoegrokError(f"data: step {step!r} is outside the epoch [0, {self.num_steps})")
        step = int(step)
        sl = [slice(step * w, (step + 1) * w) for w in self._w]
        tokens = np.concatenate([d.train_tokens_NxT[s] for d, s in zip(self._dom, sl)]).astype(np.int32)
        length = np.concatenate([d.train_len_N[s] for d, s in zip(self._dom, sl)])
        return {"tokens": tokens, "mask": self._positions_T[None, :] < length[:, None],
                "sample_ids": np.concatenate([d.train_ids_N[s] for d, s in zip(self._dom, sl)]),
                "domain_ids": self._domain_ids_B.copy()}

    def batches(self, start: int = 0, stop: int | None = None) -> Iterator[dict[str, np.ndarray]]:
        """``batch(s)`` for s in [start, stop) (stop defaults to the end of the epoch): resume = start at the
        checkpointed next step."""
        for s in range(start, self.num_steps if stop is None else stop):
            yield self.batch(s)

    # ---- fixed evaluation sets ----
    def _domain(self, domain: str) -> DomainData:
        if domain not in self.domains:
            raise MoegrokError(f"data: unknown domain {domain!r}; domains: {list(self.domains)}")
        return self._dom[self.domains.index(domain)]

    def probe_set(self) -> dict[str, Any]:
        """The fixed probe documents of all domains (training documents, each also trained once, spread over the
        epoch). Arrays over N probes: ``tokens`` int32 [N, T], ``mask`` bool [N, T], ``answer_mask`` bool [N, T]
        (True on answer tokens of synthetic statements), ``sample_ids`` int64 [N], ``domain_ids`` int32 [N],
        ``domains`` str [N], ``steps`` int64 [N] (the step that trains it); ``texts``: list of N str."""
        parts = {k: [] for k in ("tokens", "mask", "answer_mask", "sample_ids", "domain_ids", "domains", "steps")}
        texts: list[str] = []
        for i, d in enumerate(self._dom):
            p = d.probe_pos_P
            tok, n = d.train_tokens_NxT[p].astype(np.int32), d.train_len_N[p]
            parts["tokens"].append(tok)
            parts["mask"].append(self._positions_T[None, :] < n[:, None])
            parts["answer_mask"].append(d.probe_answer_mask_PxT)
            parts["sample_ids"].append(d.train_ids_N[p])
            parts["domain_ids"].append(np.full(len(p), i, np.int32))
            parts["domains"].append(np.array([d.config.name] * len(p), dtype=str))
            parts["steps"].append(p // d.config.docs_per_step)
            texts += _texts(self.tokenizer, tok, n)
        out: dict[str, Any] = {k: np.concatenate(v) for k, v in parts.items()}
        out["texts"] = texts
        return out

    def val_set(self, domain: str) -> dict[str, Any]:
        """Validation documents of ``domain`` (never trained on): ``tokens`` int32 [N, T], ``mask`` bool [N, T],
        ``answer_mask`` bool [N, T], ``sample_ids`` int64 [N], ``texts`` list of N str."""
        v = self._domain(domain).val
        return {"tokens": v["tokens"].astype(np.int32), "mask": self._positions_T[None, :] < v["length"][:, None],
                "answer_mask": v["answer_mask"].copy(), "sample_ids": v["sample_ids"].copy(),
                "texts": list(v["texts"])}

    def test_set(self, domain: str) -> dict[str, Any]:
        """Held-out test items of ``domain`` as ``BOS prompt answer`` rows: ``tokens`` int32 [N, Tt] (Tt <= seq_len),
        ``mask`` bool [N, Tt], ``answer_mask`` bool [N, Tt] (True on answer tokens), ``prompt_len`` int32 [N]
        (BOS included); ``ids``, ``prompts``, ``answers``: lists of N str. Score: an item is correct when
        ``argmax logits[:, t-1] == tokens[:, t]`` at every answer position t (teacher-forced = greedy exact match).
        A text domain without ``test_path`` has N = 0."""
        t = self._domain(domain).test
        pos = np.arange(t["tokens"].shape[1])
        return {"tokens": t["tokens"].copy(), "mask": pos[None, :] < t["length"][:, None],
                "answer_mask": t["answer_mask"].copy(), "prompt_len": t["prompt_len"].copy(),
                "ids": list(t["ids"]), "prompts": list(t["prompts"]), "answers": list(t["answers"])}

    # ---- records for the run directory ----
    def probe_records(self) -> list[dict]:
        """Rows for ``probes.jsonl`` in probe-record order: ``{"id", "domain", "text"}``."""
        p = self.probe_set()
        return [{"id": int(i), "domain": str(d), "text": t}
                for i, d, t in zip(p["sample_ids"], p["domains"], p["texts"])]

    def test_records(self) -> list[dict]:
        """Rows for ``tests.jsonl``: ``{"id", "domain", "prompt", "answer"}`` over all domains."""
        rows = []
        for name in self.domains:
            t = self._domain(name).test
            rows += [{"id": i, "domain": name, "prompt": p, "answer": a}
                     for i, p, a in zip(t["ids"], t["prompts"], t["answers"])]
        return rows

    def summary(self) -> dict[str, Any]:
        """JSON-ready description: sizes, facts, exposures per fact, chance accuracy, truncation."""
        return {"num_steps": self.num_steps, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "vocab_size": self.tokenizer.vocab_size, "fingerprint": self.fingerprint,
                "domains": {d.config.name: dict(d.stats) for d in self._dom}}

    @property
    def fingerprint(self) -> str:
        """sha256 over the config and every training token: store it with a checkpoint, compare on resume."""
        if self._fingerprint is None:
            h = hashlib.sha256(json.dumps(self.config.to_dict(), sort_keys=True).encode())
            h.update(f"{self.seq_len}/{self.num_steps}/{self.tokenizer.vocab_size}".encode())
            for d in self._dom:
                for a in (d.train_tokens_NxT, d.train_len_N, d.train_ids_N):
                    h.update(np.ascontiguousarray(a).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def __repr__(self) -> str:
        return (f"Corpus(domains={list(self.domains)}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
                f"num_steps={self.num_steps}, vocab_size={self.tokenizer.vocab_size})")
