"""Tokenizers: built-in symbol/byte vocabulary round trips, and a local Hugging Face tokenizer directory."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moegrok.data.tokenizer import BuiltinTokenizer, HFTokenizer
from moegrok.errors import MoegrokError

SYMBOLS = ["0", "1", "12", "+", "=", ";", "e3", "e31", "->", "~>"]


def test_builtin_ids_layout_and_symbol_round_trip():
    tok = BuiltinTokenizer(SYMBOLS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 3 + len(SYMBOLS))
    ids = tok.encode("12 + 1 = e31 ;")
    assert ids == [3 + SYMBOLS.index(w) for w in ["12", "+", "1", "=", "e31", ";"]]
    assert tok.decode(ids) == "12 + 1 = e31 ;"
    assert tok.decode([tok.bos_id] + ids + [tok.pad_id]) == "12 + 1 = e31 ;"
    assert tok.decode([tok.bos_id] + ids, skip_special_tokens=False) == "<bos> 12 + 1 = e31 ;"


def test_builtin_without_bytes_rejects_unknown_text():
    tok = BuiltinTokenizer(SYMBOLS)
    for bad in ("12 + x", "12  +", "12+1"):
        with pytest.raises(MoegrokError, match="cannot encode"):
            tok.encode(bad)
    with pytest.raises(MoegrokError, match="out of range"):
        tok.decode([tok.vocab_size])


def test_builtin_byte_fallback_hand_case():
    tok = BuiltinTokenizer(SYMBOLS, byte_fallback=True)
    assert tok.vocab_size == 3 + len(SYMBOLS) + 256
    base = 3 + len(SYMBOLS)
    # 'é' is two UTF-8 bytes; '12+' is not a whitespace-delimited symbol, so bytes too
    ids = tok.encode("1 é 12+")
    assert ids == [3 + 1, base + 32, base + 0xC3, base + 0xA9, base + 32, base + ord("1"), base + ord("2"),
                   base + ord("+")]
    assert tok.decode(ids) == "1 é 12+"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(SYMBOLS), st.sampled_from([" ", "  ", "\n", "\t", "x", "é", "🙂", "12+"])),
                max_size=20))
def test_builtin_text_round_trip_with_bytes(pieces):
    tok = BuiltinTokenizer(SYMBOLS, byte_fallback=True)
    text = "".join(pieces)
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(SYMBOLS), max_size=20))
def test_builtin_symbol_ids_round_trip(words):
    tok = BuiltinTokenizer(SYMBOLS, byte_fallback=True)
    ids = [tok.token_to_id(w) for w in words]
    assert tok.encode(tok.decode(ids)) == ids


def test_builtin_rejects_bad_symbols():
    for bad in (["a b"], [""], ["<bos>"], ["x", "x"]):
        with pytest.raises(MoegrokError):
            BuiltinTokenizer(bad)


def save_wordlevel_tokenizer(path, words):
    """A tiny local HF tokenizer: WordLevel over whitespace-split words, wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(str(path))
    return vocab


def test_hf_tokenizer_from_local_directory(tmp_path):
    vocab = save_wordlevel_tokenizer(tmp_path / "tok", ["the", "cat", "sat", "+", "1", "2"])
    tok = HFTokenizer(str(tmp_path / "tok"))
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, len(vocab))
    ids = tok.encode("the cat sat")
    assert ids == [vocab["the"], vocab["cat"], vocab["sat"]]
    assert tok.decode(ids) == "the cat sat"
    assert tok.decode([tok.bos_id] + ids) == "the cat sat"
    assert tok.encode_batch(["1 + 2", "cat"]) == [[vocab["1"], vocab["+"], vocab["2"]], [vocab["cat"]]]


def test_hf_tokenizer_errors(tmp_path):
    with pytest.raises(MoegrokError, match="not a local directory"):
        HFTokenizer("allenai/OLMoE-1B-7B-0924")  # a hub name is never downloaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(MoegrokError, match="cannot load"):
        HFTokenizer(str(tmp_path / "empty"))
