"""Synthetic documents: which facts each document states, and the token rows they become.

A document is BOS followed by ``statements_per_doc`` statements. Training documents are cut from a stream of
shuffled passes over the training facts, so every fact is stated equally often (+-1) and evenly over the epoch:
exposures per fact are what limits one-pass learning (docs/findings.md). Documents are made unique (within the epoch and
against the validation documents) by redrawing the rare duplicates.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

from moegrok.data.synthetic import END, FactTable
from moegrok.errors import MoegrokError


@dataclasses.dataclass(frozen=True)
class StatementTable:
    """Token ids of every fact's statement, right-padded.

    Attributes:
        tokens_FxL: int32 [F, L] statement tokens (prompt, answer, end).
        length_F: int32 [F] statement lengths.
        answer_start_F, answer_len_F: int32 [F] where the answer tokens sit inside the statement.
        prompt_F, answer_F: the prompt / answer token lists (test items are BOS + prompt + answer).
    """

    tokens_FxL: np.ndarray
    length_F: np.ndarray
    answer_start_F: np.ndarray
    answer_len_F: np.ndarray
    prompt_F: tuple[tuple[int, ...], ...]
    answer_F: tuple[tuple[int, ...], ...]


def encode_statements(facts: FactTable, encode_words, where: str) -> StatementTable:
    """``encode_words(list_of_word_tuples, leading_space) -> list[list[int]]`` turns word pieces into ids; the three
    pieces of a statement (prompt, answer, end) are encoded separately so answer positions are exact."""
    prompts = encode_words(facts.prompts)
    answers = encode_words(facts.answers)
    end = encode_words([(END,)])[0]
    F = facts.num_facts
    for k in range(F):
        if not prompts[k] or not answers[k]:
            raise MoegrokError(f"{where}: fact {' '.join(facts.prompts[k] + facts.answers[k])!r} encodes to no "
                               "tokens with this tokenizer")
    lens = np.array([len(p) + len(a) + len(end) for p, a in zip(prompts, answers)], dtype=np.int32)
    L = int(lens.max())
    table = np.zeros((F, L), dtype=np.int32)
    for k, (p, a) in enumerate(zip(prompts, answers)):
        row = p + a + end
        table[k, :len(row)] = row
    return StatementTable(
        tokens_FxL=table, length_F=lens,
        answer_start_F=np.array([len(p) for p in prompts], dtype=np.int32),
        answer_len_F=np.array([len(a) for a in answers], dtype=np.int32),
        prompt_F=tuple(tuple(p) for p in prompts), answer_F=tuple(tuple(a) for a in answers),
    )


def _row_keys(rows_NxS: np.ndarray) -> np.ndarray:
    """One opaque comparable key per row (equal keys <=> equal rows)."""
    rows = np.ascontiguousarray(rows_NxS.astype(np.int32))
    return rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()


def _redraw_duplicates(rows_NxS: np.ndarray, facts: np.ndarray, taken: np.ndarray | None, rng: np.random.Generator,
                       where: str) -> np.ndarray:
    """Replace every row equal to an earlier row (or to a row of ``taken``) with a fresh random draw."""
    rows = rows_NxS.copy()
    for _ in range(100):
        keys = _row_keys(rows)
        _, first = np.unique(keys, return_index=True)
        dup = np.ones(len(rows), dtype=bool)
        dup[first] = False
        if taken is not None and len(taken):
            dup |= np.isin(keys, _row_keys(taken))
        if not dup.any():
            return rows
        rows[dup] = rng.choice(facts, size=(int(dup.sum()), rows.shape[1]))
    raise MoegrokError(f"{where}: could not make the documents unique; too few facts for this many documents "
                       "(raise the domain size or statements_per_doc, or lower num_steps)")


def check_enough_documents(n_facts: int, statements: int, n_docs: int, where: str) -> None:
    # Keep the space of possible documents >> the number drawn, or redrawing duplicates would not terminate.
    if statements * math.log(max(n_facts, 1)) < math.log(4 * n_docs):
        raise MoegrokError(f"{where}: {n_facts} training facts and {statements} statements per document allow "
                           f"{n_facts}^{statements} distinct documents, too few for {n_docs} unique ones; raise the "
                           "domain size or statements_per_doc, or lower num_steps")


def training_rows(facts: np.ndarray, n_docs: int, statements: int, rng: np.random.Generator,
                  where: str) -> np.ndarray:
    """int64 [n_docs, statements] fact indices: consecutive shuffled passes over ``facts``, duplicates redrawn."""
    total = n_docs * statements
    passes = -(-total // len(facts))
    stream = np.concatenate([rng.permutation(facts) for _ in range(passes)])[:total]
    return _redraw_duplicates(stream.reshape(n_docs, statements), facts, None, rng, where)


def validation_rows(facts: np.ndarray, n_docs: int, statements: int, train_rows: np.ndarray,
                    rng: np.random.Generator, where: str) -> np.ndarray:
    """int64 [n_docs, statements]: independent uniform draws of training facts, none equal to a training document."""
    rows = rng.choice(facts, size=(n_docs, statements))
    return _redraw_duplicates(rows, facts, train_rows, rng, where)


def assemble(rows_NxS: np.ndarray, st: StatementTable, bos_id: int, pad_id: int, seq_len: int,
             dtype=np.int32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Token rows for documents given as fact indices.

    Returns ``tokens_NxT`` (dtype), ``length_N`` int32 (real tokens incl. BOS), ``answer_mask_NxT`` bool (True at
    answer tokens).
    """
    N, S = rows_NxS.shape
    lens_NxS = st.length_F[rows_NxS]
    length_N = 1 + lens_NxS.sum(axis=1, dtype=np.int64)
    if N and int(length_N.max()) > seq_len:
        raise MoegrokError(f"seq_len {seq_len} is too short: a document needs {int(length_N.max())} tokens "
                           "(BOS + statements); raise seq_len or lower statements_per_doc")
    # Flatten every statement token of every document, then place it at (document, 1 + offset in document):
    # O(total tokens) integer arithmetic, no [N, S, L] boolean masks (5x faster on 240k documents).
    facts = rows_NxS.ravel()
    lens = lens_NxS.ravel().astype(np.int64)
    total = int(lens.sum())
    stmt_of_tok = np.repeat(np.arange(len(facts)), lens)
    stmt_start = np.cumsum(lens) - lens
    within = np.arange(total) - stmt_start[stmt_of_tok]
    fact_of_tok = facts[stmt_of_tok]
    doc_of_tok = stmt_of_tok // S
    doc_start = np.cumsum(length_N - 1) - (length_N - 1)
    col = 1 + np.arange(total) - doc_start[doc_of_tok]
    tokens = np.full((N, seq_len), pad_id, dtype=dtype)
    tokens[:, 0] = bos_id
    tokens[doc_of_tok, col] = st.tokens_FxL[fact_of_tok, within]
    a0 = st.answer_start_F[fact_of_tok]
    is_ans = (within >= a0) & (within < a0 + st.answer_len_F[fact_of_tok])
    answer_mask = np.zeros((N, seq_len), dtype=bool)
    answer_mask[doc_of_tok[is_ans], col[is_ans]] = True
    return tokens, length_N.astype(np.int32), answer_mask


def item_rows(facts: np.ndarray, st: StatementTable, bos_id: int, pad_id: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Test items ``BOS prompt answer`` as rows: tokens_NxT int32, length_N, answer_mask_NxT, prompt_len_N
    (prompt_len counts BOS)."""
    seqs = [(bos_id,) + st.prompt_F[k] + st.answer_F[k] for k in facts.tolist()]
    plen = np.array([1 + len(st.prompt_F[k]) for k in facts.tolist()], dtype=np.int32)
    return item_arrays(seqs, plen, pad_id)


def item_arrays(seqs, plen: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Pad ``BOS prompt answer`` sequences; answer_mask marks positions >= prompt_len (prompt_len counts BOS)."""
    tokens, length = pad_rows(seqs, pad_id)
    pos = np.arange(tokens.shape[1])
    answer_mask = (pos >= plen[:, None]) & (pos < length[:, None])
    return tokens, length, answer_mask, plen


def pad_rows(seqs, pad_id: int, width: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad token lists into int32 [N, width] and their lengths int32 [N]."""
    length = np.array([len(s) for s in seqs], dtype=np.int32)
    width = int(length.max()) if width is None and len(seqs) else (width or 1)
    out = np.full((len(seqs), width), pad_id, dtype=np.int32)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out, length
