"""Tokenizers: the built-in symbol/byte vocabulary and a wrapper around a local Hugging Face tokenizer.

Both expose the same small interface the corpus and the trainer use: ``encode(text) -> list[int]`` (no special
tokens added), ``decode(ids, skip_special_tokens=True) -> str``, ``vocab_size``, ``pad_id``, ``bos_id``, ``eos_id``.
Both export to Hugging Face (:func:`hf_tokenizer`, :func:`save_hf_tokenizer`), so that a converted model directory
works with ``AutoTokenizer`` and ``pipeline`` (a run's tokenizer without its corpus:
`moegrok.data.corpus.corpus_tokenizer`).
"""
from __future__ import annotations

import functools
import json
import os
import re
import shutil
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

    def to_hf(self, model_max_length: int | None = None):
        """This vocabulary as a ``transformers.PreTrainedTokenizerFast`` that encodes every text to exactly
        :meth:`encode`'s ids (``add_special_tokens=False``; the default adds ``<bos>`` in front, as every training
        document starts) and decodes them back to the text. See :func:`hf_builtin_backend` for how."""
        from transformers import PreTrainedTokenizerFast

        kw = {} if model_max_length is None else {"model_max_length": int(model_max_length)}
        return PreTrainedTokenizerFast(
            tokenizer_object=hf_builtin_backend(self), pad_token=RESERVED_TOKENS[0], bos_token=RESERVED_TOKENS[1],
            eos_token=RESERVED_TOKENS[2], add_bos_token=True, add_eos_token=False,
            # A literal "<bos>" in a text is bytes, as in encode(); the ids 0-2 come only from add_special_tokens.
            split_special_tokens=True,
            clean_up_tokenization_spaces=False, **kw)


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


# ------------------------------------------------------------------------------------------ Hugging Face export
HF_SYMBOL_MARK = "\u2581"  # "▁": the exported vocabulary's entry for symbol s is "▁" + byte-level(s)
_HF_SYMBOL_END = "\u2582"  # "▂": decoder-internal end of a symbol token (neither mark is a byte-level character)
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                      "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                      "chat_template.json")


@functools.cache
def _byte_chars() -> tuple[str, ...]:
    """Byte value -> the character `tokenizers`' ByteLevel normalizer/decoder uses for it (GPT-2's table)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), ord("\xff") + 1)]
    out, extra = {b: chr(b) for b in keep}, 0
    for b in range(NUM_BYTES):
        if b not in out:
            out[b], extra = chr(NUM_BYTES + extra), extra + 1
    return tuple(out[b] for b in range(NUM_BYTES))


def _byte_level(s: str) -> str:
    table = _byte_chars()
    return "".join(table[b] for b in s.encode("utf-8"))


def _onig_escape(s: str) -> str:
    """Literal text in an Oniguruma (Ruby syntax) pattern: its metacharacters escaped."""
    return "".join("\\" + c if c in "\\^$.|?*+()[]{}" else c for c in s)


@functools.cache
def _whitespace_alternatives() -> str:
    """Every character Python's ``\\s`` matches (what separates the built-in tokenizer's words), byte-level encoded,
    as an Oniguruma alternation (longest first)."""
    ws = re.findall(r"\s", "".join(map(chr, range(0x110000))))
    return "|".join(_onig_escape(w) for w in sorted({_byte_level(c) for c in ws}, key=lambda w: (-len(w), w)))


def _trie_pattern(words: Sequence[str]) -> str:
    """An Oniguruma group matching exactly `words`, factored by common prefixes (a flat alternation of thousands of
    symbols is tried one by one at every word)."""
    trie: dict = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = {}

    def emit(node: dict) -> str:
        alts = [_onig_escape(c) + emit(child) for c, child in sorted(node.items()) if c]
        if not alts:
            return ""
        if len(alts) == 1 and "" not in node:
            return alts[0]
        return "(?:" + "|".join(alts) + ")" + ("?" if "" in node else "")

    return "(?:" + emit(trie) + ")"


def hf_builtin_backend(tok: BuiltinTokenizer):
    """A ``tokenizers.Tokenizer`` with ``tok``'s ids, reproducing ``tok.encode`` exactly on every text.

    Vocabulary: ``<pad>`` ``<bos>`` ``<eos>``, then symbol s as ``"▁" + byte_level(s)`` (``"▁12"``, ``"▁+"``), then
    byte b as its byte-level character (``"Ġ"`` for the space, ``"a"`` for 0x61; GPT-2's table).
    Encoding: (1) the ByteLevel normalizer rewrites the text as byte-level characters, so no text can contain "▁"
    any more; (2) a regex inserts "▁" in front of every whitespace-delimited word that is a symbol (whitespace:
    Python's ``\\s``, as in :meth:`BuiltinTokenizer.encode`); (3) the pre-tokenizer drops each single space between
    two marked words (the space ``encode`` implies), then splits into marked words and single characters; (4) a
    WordLevel model looks each piece up: a symbol or a byte. So every other character, whitespace included, becomes
    its UTF-8 bytes. Without byte fallback there are no byte entries and any other text fails ("Missing [UNK]
    token"), as ``encode`` raises.
    Decoding: special tokens get a "▁" too; every "▁" token gets an end mark, the tokens are joined, an end mark
    directly followed by "▁" (two symbols in a row) becomes a space, the marks are removed, and the ByteLevel
    decoder turns the characters back into UTF-8 (invalid sequences -> U+FFFD, as Python's errors="replace"). Equal
    to ``tok.decode`` for every id sequence, but with ``skip_special_tokens`` the bytes on both sides of a skipped
    special token are decoded as one run, not two. Like ``tok.decode``, decoding a continuation on its own gives no
    space in front of its first symbol (transformers 5's text-generation pipeline appends it to the prompt so).
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    mark, end = HF_SYMBOL_MARK, _HF_SYMBOL_END
    vocab = {t: i for i, t in enumerate(RESERVED_TOKENS)}
    for s in tok.symbols:
        vocab[mark + _byte_level(s)] = tok.token_to_id(s)
    if tok.byte_fallback:
        vocab.update({c: tok._byte_base + b for b, c in enumerate(_byte_chars())})
    if len(vocab) != tok.vocab_size or sorted(vocab.values()) != list(range(tok.vocab_size)):
        raise MoegrokError("built-in tokenizer: cannot export the vocabulary (ids are not 0..vocab_size-1)")
    space = _onig_escape(_byte_level(" "))
    norm = [normalizers.ByteLevel()]
    if tok.symbols:
        ws = _whitespace_alternatives()
        syms = _trie_pattern([_byte_level(s) for s in tok.symbols])
        norm.append(normalizers.Replace(Regex(rf"(?<=\A|{ws})(?={syms}(?:{ws}|\z))"), mark))
        word = rf"{mark}(?:(?!{ws}).)+"  # a marked word runs to the next whitespace: it is the symbol
        pre = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(rf"{word}\K{space}(?={mark})"), "removed"),
            pre_tokenizers.Split(Regex(rf"{word}|."), "isolated")])
    else:
        pre = pre_tokenizers.Split(Regex("."), "isolated")
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))  # "<unk>" is no entry: an unknown piece fails
    backend.normalizer = normalizers.Sequence(norm)
    backend.pre_tokenizer = pre
    specials = "|".join(_onig_escape(t) for t in RESERVED_TOKENS)
    backend.decoder = decoders.Sequence([
        decoders.Replace(Regex(rf"\A(?=(?:{specials})\z)"), mark),
        decoders.Replace(Regex(rf"\A{mark}.*\K\z"), end),
        decoders.Fuse(),
        decoders.Replace(Regex(end + mark), _byte_level(" ")),
        decoders.Replace(Regex(f"[{mark}{end}]"), ""),
        decoders.ByteLevel()])
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in RESERVED_TOKENS])
    bos = RESERVED_TOKENS[tok.bos_id]
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tok.bos_id)])
    return backend


def hf_tokenizer(tok):
    """``tok`` (built-in or :class:`HFTokenizer`) as a ``transformers`` tokenizer whose pad/bos/eos ids are
    ``tok``'s. A Hugging Face tokenizer is reloaded from its directory (the caller's object is left alone) and
    given a pad token when it has none (the one moegrok padded with)."""
    if isinstance(tok, BuiltinTokenizer):
        return tok.to_hf()
    if isinstance(tok, HFTokenizer):
        from transformers import AutoTokenizer

        out = AutoTokenizer.from_pretrained(tok.directory, local_files_only=True)
        if out.pad_token_id is None:
            out.pad_token = out.convert_ids_to_tokens(tok.pad_id)
        return out
    raise MoegrokError(f"cannot export a tokenizer of type {type(tok).__name__}")


def save_hf_tokenizer(tok, directory: str | os.PathLike, hf=None) -> list[str]:
    """Write ``tok`` (built-in or :class:`HFTokenizer`) as Hugging Face tokenizer files into the existing
    ``directory`` (a model directory under construction: the caller makes the whole directory atomic). ``hf``:
    ``hf_tokenizer(tok)`` if already built. Returns the names of the files written."""
    directory = Path(directory)
    if not directory.is_dir():
        raise MoegrokError(f"{directory}: not a directory")
    hf = hf_tokenizer(tok) if hf is None else hf
    before = set(os.listdir(directory))
    hf.save_pretrained(str(directory))
    if isinstance(tok, BuiltinTokenizer):
        # transformers 5 names its generic class TokenizersBackend; the older alias loads in 4.x and 5.x alike
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return sorted(set(os.listdir(directory)) - before)


def copy_hf_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files of the model directory ``src`` (those of :data:`HF_TOKENIZER_FILES` it has) into
    ``dst``; returns their names (none: ``src`` has no tokenizer)."""
    src, dst = Path(src), Path(dst)
    names = [n for n in HF_TOKENIZER_FILES if (src / n).is_file()]
    for n in names:
        shutil.copyfile(src / n, dst / n)
    return names
