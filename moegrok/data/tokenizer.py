"""Tokenizers: the built-in symbol/byte vocabulary and a wrapper around a local Hugging Face tokenizer.

Both expose the same small interface the corpus and the trainer use: ``encode(text) -> list[int]`` (no special
tokens added), ``decode(ids, skip_special_tokens=True) -> str``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np

from moegrok.errors import MoegrokError

RESERVED_TOKENS = ("<pad>", "<bos>", "<eos>")
NUM_BYTES = 256


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str: ...


class BuiltinTokenizer:
    """Word-level symbols with an optional byte fallback.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, then the symbols in the given order, then (if ``byte_fallback``)
    the 256 byte values. A whitespace-delimited word that is a symbol becomes that symbol's id and the single space
    between two symbol words is implied (synthetic documents have no space tokens); every other character,
    whitespace included, becomes UTF-8 byte tokens. So ``decode(encode(text)) == text`` for any text when bytes are
    enabled, and ``encode(decode(ids)) == ids`` for symbol-only ids. Without bytes, text that is not a
    single-space-separated sequence of symbols is an error.
    """

    def __init__(self, symbols: Sequence[str], byte_fallback: bool = False):
        symbols = list(symbols)
        for s in symbols:
            if not s or any(c.isspace() for c in s) or s in RESERVED_TOKENS:
                raise MoegrokError(f"built-in tokenizer: symbol {s!r} must be non-empty, without whitespace, and not "
                                   f"one of {RESERVED_TOKENS}")
        if len(set(symbols)) != len(symbols):
            raise MoegrokError("built-in tokenizer: symbols must be unique")
        self.symbols = tuple(symbols)
        self.byte_fallback = bool(byte_fallback)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self._sym_base = len(RESERVED_TOKENS)
        self._byte_base = self._sym_base + len(symbols)
        self.vocab_size = self._byte_base + (NUM_BYTES if byte_fallback else 0)
        self._to_id = {s: self._sym_base + i for i, s in enumerate(symbols)}
        self._names = list(RESERVED_TOKENS) + list(symbols)
        # Longest first so that a symbol that is a prefix of another cannot shadow it.
        alts = "|".join(re.escape(s) for s in sorted(symbols, key=len, reverse=True))
        self._sym_re = re.compile(rf"(?<!\S)(?:{alts})(?!\S)") if symbols else None

    def token_to_id(self, symbol: str) -> int:
        if symbol not in self._to_id:
            raise MoegrokError(f"built-in tokenizer: unknown symbol {symbol!r}")
        return self._to_id[symbol]

    def encode_symbols(self, words: Sequence[str]) -> list[int]:
        return [self.token_to_id(w) for w in words]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos, prev_sym = 0, False
        matches = self._sym_re.finditer(text) if self._sym_re is not None else ()
        for m in matches:
            gap = text[pos:m.start()]
            if not (gap == " " and prev_sym):  # the one space between two symbols is implied
                ids += self._bytes(gap, text)
            ids.append(self._to_id[m.group()])
            pos, prev_sym = m.end(), True
        ids += self._bytes(text[pos:], text)
        return ids

    def _bytes(self, s: str, text: str) -> list[int]:
        if not s:
            return []
        if not self.byte_fallback:
            raise MoegrokError(f"built-in tokenizer: cannot encode {s[:40]!r} in {text[:80]!r}: not a symbol of the "
                               "vocabulary and byte fallback is off (symbols are separated by single spaces)")
        return [self._byte_base + b for b in s.encode("utf-8")]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        out: list[str] = []
        pending = bytearray()
        prev_sym = False
        for i in np.asarray(list(ids), dtype=np.int64).tolist():
            if not 0 <= i < self.vocab_size:
                raise MoegrokError(f"built-in tokenizer: id {i} out of range [0, {self.vocab_size})")
            if i >= self._byte_base:
                pending.append(i - self._byte_base)
                prev_sym = False
                continue
            if pending:
                out.append(pending.decode("utf-8", errors="replace"))
                pending.clear()
            if i < self._sym_base and skip_special_tokens:
                continue
            out.append((" " if prev_sym else "") + self._names[i])
            prev_sym = True
        if pending:
            out.append(pending.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_token(self, i: int) -> str:
        if i >= self._byte_base:
            return f"<0x{i - self._byte_base:02X}>"
        return self._names[i]


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory. BOS/EOS/PAD fall back to one another (many tokenizers
    define only ``<|endoftext|>``); the mask, not the pad id, marks real tokens, so pad == eos is harmless."""

    def __init__(self, directory: str):
        path = Path(directory).expanduser()
        if not path.is_dir():
            raise MoegrokError(f"tokenizer: {directory!r} is not a local directory (expected a saved Hugging Face "
                               "tokenizer; hub names are not downloaded)")
        try:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError/KeyError depending on what is missing
            raise MoegrokError(f"tokenizer: cannot load a Hugging Face tokenizer from {path} "
                               f"({type(e).__name__}: {str(e)[:300]})") from None
        self.directory = str(path)
        self._tok = tok
        bos, eos, pad = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
        bos = _first(bos, eos, getattr(tok, "cls_token_id", None))
        eos = _first(eos, getattr(tok, "sep_token_id", None), bos)
        pad = _first(pad, eos)
        if bos is None or eos is None:
            raise MoegrokError(f"tokenizer: {path} defines none of bos_token, eos_token, cls_token; add a special "
                               "token to mark document starts")
        self.bos_id, self.eos_id, self.pad_id = int(bos), int(eos), int(pad)
        self.unk_id = tok.unk_token_id
        self.vocab_size = len(tok)

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        return [list(x) for x in self._tok(list(texts), add_special_tokens=False)["input_ids"]]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)


def _first(*ids):
    return next((i for i in ids if i is not None), None)


def load_tokenizer(directory: str | None, symbols: Sequence[str], byte_fallback: bool):
    """The corpus tokenizer: the built-in vocabulary when ``directory`` is None, else the local HF tokenizer."""
    if directory is None:
        return BuiltinTokenizer(symbols, byte_fallback=byte_fallback)
    return HFTokenizer(directory)


def encode_batch(tok, texts: Sequence[str]) -> list[list[int]]:
    if hasattr(tok, "encode_batch"):
        return tok.encode_batch(texts)
    return [tok.encode(t) for t in texts]
