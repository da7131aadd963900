"""User corpora: file formats, errors naming file and line, and text domains inside the one-epoch pipeline."""
from __future__ import annotations

import json

import numpy as np
import pytest

from moegrok.data import DataConfig, build_corpus
from moegrok.data.user import read_documents, read_test_items
from moegrok.errors import MoegrokError


def save_wordlevel_tokenizer(path, words):
    """A tiny local HF tokenizer: WordLevel over whitespace-split words, wrapped in PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<pad>", "<s>", "</s>", "<unk>"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    return vocab


def write(path, text: str | bytes):
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return str(path)


# ---------------------------------------------------------------- formats
def test_jsonl_documents(tmp_path):
    p = write(tmp_path / "d.jsonl", '{"text": "first doc", "meta": 1}\n\n{"text": "two\\nlines"}\n')
    docs = read_documents(p)
    assert docs.texts == ("first doc", "two\nlines") and docs.lines == (1, 3)


def test_txt_lines_and_paragraphs(tmp_path):
    p = write(tmp_path / "d.txt", "alpha beta\n\ngamma\r\ndelta\n\n\n  \nomega\n")
    lines = read_documents(p)
    assert lines.texts == ("alpha beta", "gamma", "delta", "omega") and lines.lines == (1, 3, 4, 8)
    paras = read_documents(p, "paragraphs")
    assert paras.texts == ("alpha beta", "gamma\ndelta", "omega") and paras.lines == (1, 3, 8)


def test_test_items(tmp_path):
    p = write(tmp_path / "t.jsonl", '{"id": 7, "prompt": "2 + 2 =", "answer": " 4"}\n'
                                    '{"id": "b", "prompt": "", "answer": "x"}\n')
    items = read_test_items(p)
    assert [(i.id, i.prompt, i.answer, i.line) for i in items] == [("7", "2 + 2 =", " 4", 1), ("b", "", "x", 2)]


@pytest.mark.parametrize("name,content,match", [
    ("e.jsonl", "", r"e.jsonl: no documents"),
    ("b.txt", "\n  \n\n", r"b.txt: no documents"),
    ("j.jsonl", '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n', r"j.jsonl:3: not valid JSON"),
    ("a.jsonl", '["text"]\n', r"a.jsonl:1: expected a JSON object, got list"),
    ("m.jsonl", '{"text": "ok"}\n{"body": "x"}\n', r"m.jsonl:2: field 'text' must be a string, got nothing"),
    ("n.jsonl", '{"text": 5}\n', r"n.jsonl:1: field 'text' must be a string, got int"),
    ("z.jsonl", '{"text": "  "}\n', r"z.jsonl:1: field 'text' is empty"),
    ("u.txt", b"fine\n\xff\xfe bad\n", r"u.txt:2: not valid UTF-8"),
])
def test_document_errors_name_file_and_line(tmp_path, name, content, match):
    p = write(tmp_path / name, content)
    with pytest.raises(MoegrokError, match=match):
        read_documents(p)


def test_missing_and_directory_paths(tmp_path):
    with pytest.raises(MoegrokError, match=r"nope.jsonl: no such file"):
        read_documents(str(tmp_path / "nope.jsonl"))
    with pytest.raises(MoegrokError, match=r"not a regular file"):
        read_documents(str(tmp_path))


@pytest.mark.parametrize("content,match", [
    ('{"id": 1, "prompt": "a"}\n', r"t.jsonl:1: missing field\(s\) \['answer'\]"),
    ('{"id": 1, "prompt": "a", "answer": "b"}\n{"id": "1", "prompt": "c", "answer": "d"}\n',
     r"t.jsonl:2: id '1' already used on line 1"),
    ('{"id": 1, "prompt": "a", "answer": ""}\n', r"t.jsonl:1: field 'answer' must be a non-empty string"),
    ('{"id": true, "prompt": "a", "answer": "b"}\n', r"t.jsonl:1: field 'id' must be a string or integer"),
    ('{"id": 1, "prompt": 3, "answer": "b"}\n', r"t.jsonl:1: field 'prompt' must be a string"),
    ("\n", r"t.jsonl: no test items"),
])
def test_test_item_errors(tmp_path, content, match):
    p = write(tmp_path / "t.jsonl", content)
    with pytest.raises(MoegrokError, match=match):
        read_test_items(p)


# ---------------------------------------------------------------- text domains in the corpus
def story_file(tmp_path, n=50):
    rows = [{"text": f"story number {i} ends here."} for i in range(n)]
    return write(tmp_path / "s.jsonl", "".join(json.dumps(r) + "\n" for r in rows)), [r["text"] for r in rows]


def test_text_domain_exactly_once_with_builtin_bytes(tmp_path):
    path, texts = story_file(tmp_path)
    cfg = DataConfig.from_dict({"num_steps": None, "val_docs": 6, "probe_docs": 4, "domains": {
        "math": {"docs_per_step": 2, "modulus": 11},
        "story": {"kind": "text", "docs_per_step": 4, "train_path": path}}})
    c = build_corpus(cfg)
    assert c.num_steps == (50 - 6) // 4  # derived from the text domain
    assert c.tokenizer.vocab_size == 3 + 11 + 3 + 256  # symbols + bytes
    offset = c.num_steps * 2 + 6  # math block: training then validation documents
    seen = []
    for s in range(c.num_steps):
        b = c.batch(s)
        for t, m, i, d in zip(b["tokens"], b["mask"], b["sample_ids"], b["domain_ids"]):
            if c.domains[d] == "story":
                assert t[0] == c.tokenizer.bos_id and t[m][-1] == c.tokenizer.eos_id
                assert c.tokenizer.decode(t[m]) == texts[i - offset]  # id -> position in the file
                seen.append(int(i) - offset)
    assert len(seen) == len(set(seen)) == c.num_steps * 4
    v = c.val_set("story")
    val_pos = (v["sample_ids"] - offset).tolist()
    assert len(val_pos) == 6 and not set(val_pos) & set(seen)
    assert v["texts"] == [texts[k] for k in val_pos]
    assert c.summary()["domains"]["story"]["unused_docs"] == 50 - 6 - len(seen)
    assert set(c.probe_set()["sample_ids"][c.probe_set()["domains"] == "story"] - offset) <= set(seen)
    assert len(c.test_set("story")["ids"]) == 0


def test_text_domain_truncation_and_too_few_documents(tmp_path):
    path, _ = story_file(tmp_path, n=20)
    base = {"val_docs": 4, "probe_docs": 2, "domains": {"story": {"kind": "text", "docs_per_step": 2,
                                                                  "train_path": path}}}
    c = build_corpus(DataConfig.from_dict({**base, "num_steps": None, "seq_len": 10}))
    assert c.seq_len == 10 and c.summary()["domains"]["story"]["truncated_docs"] == 20
    assert c.batch(0)["mask"].all()
    with pytest.raises(MoegrokError, match=r"s.jsonl: 20 documents supply 8 steps of domain 'story'.*num_steps is 9"):
        build_corpus(DataConfig.from_dict({**base, "num_steps": 9}))


def test_text_domain_with_local_hf_tokenizer(tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran"] + [str(i) for i in range(11)] + ["+", "=", ";"]
    vocab = save_wordlevel_tokenizer(tmp_path / "tok", words)
    docs = write(tmp_path / "d.txt", "\n".join(["the cat sat on the mat", "the dog ran", "cat sat"] * 10))
    tests = write(tmp_path / "t.jsonl", '{"id": "q1", "prompt": "the cat sat on the", "answer": "mat"}\n')
    cfg = DataConfig.from_dict({"num_steps": 12, "val_docs": 3, "probe_docs": 2, "tokenizer": str(tmp_path / "tok"),
                                "domains": {"math": {"docs_per_step": 2, "modulus": 11},
                                            "story": {"kind": "text", "docs_per_step": 2, "train_path": docs,
                                                      "test_path": tests}}})
    c = build_corpus(cfg)
    assert c.tokenizer.vocab_size == len(vocab)
    b = c.batch(0)
    # math documents: BOS then 8 statements spelled with the tokenizer's own ids
    row = b["tokens"][0][b["mask"][0]]
    assert row[0] == vocab["<s>"] and len(row) == 1 + 8 * 6
    stmt = [vocab[w] for w in c.tokenizer.decode(row[1:7]).split()]
    assert list(row[1:7]) == stmt and stmt[1] == vocab["+"] and stmt[5] == vocab[";"]
    t = c.test_set("story")
    np.testing.assert_array_equal(t["tokens"][0], [vocab[w] for w in "<s> the cat sat on the mat".split()])
    assert t["answer_mask"][0].tolist() == [False] * 6 + [True]
    m = c.test_set("math")
    assert all(len(p.split()) == 4 for p in m["prompts"])
    assert (m["tokens"][:, 2] == vocab["+"]).all()


def test_hf_tokenizer_missing_a_symbol_is_an_error(tmp_path):
    save_wordlevel_tokenizer(tmp_path / "tok", ["1", "+", "="])
    cfg = DataConfig.from_dict({"num_steps": 5, "tokenizer": str(tmp_path / "tok"),
                                "domains": {"math": {"docs_per_step": 2, "modulus": 3}}})
    with pytest.raises(MoegrokError, match=r"domain 'math'.*unknown token"):
        build_corpus(cfg)


def test_corpus_names_a_bad_user_file(tmp_path):
    bad = write(tmp_path / "bad.jsonl", '{"text": "ok"}\n{"text": 1}\n')
    cfg = DataConfig.from_dict({"num_steps": None, "domains": {"t": {"kind": "text", "train_path": bad}}})
    with pytest.raises(MoegrokError, match=r"bad.jsonl:2: field 'text'"):
        build_corpus(cfg)
