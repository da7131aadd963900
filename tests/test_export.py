"""Exported models are usable as-is: `moegrok convert RUN DST --to hf` writes the run's tokenizer next to the
weights, `AutoTokenizer` encodes every text exactly as the built-in tokenizer does, and the exported model with it
greedily reproduces what the run memorized (checked against moegrok's own JAX decoding)."""
from __future__ import annotations

import json
import math
import random
import string
from pathlib import Path

import numpy as np
import pytest
import yaml

from moegrok.cli import main
from moegrok.data import DataConfig, build_corpus
from moegrok.data.corpus import corpus_tokenizer
from moegrok.data.tokenizer import BuiltinTokenizer, HFTokenizer, _byte_chars, _byte_level, save_hf_tokenizer
from moegrok.errors import MoegrokError

# Symbols that stress the export: prefixes of one another, regex metacharacters, non-ASCII, the export's own mark.
SYMBOLS = ([str(i) for i in range(13)] + ["+", "=", ";", "#", "~", "->", "~>", "in~", ":~", "e1", "e12", "r0", "a.b",
           "(x)", "a|b", "[", "]", "\\", "^", "$", "?", "*", "{2}", "\\K", "(?=x)", "é", "日本", "▁", "▁1", "<0x41>"]
           + list(string.punctuation))
SYMBOLS = list(dict.fromkeys(SYMBOLS))
SYMBOL_TEXTS = ["1 + 2 = 3 ;", "11 + 3 = 1 ; 2 + 2 = 4 ;", "e1 r0 = e12 ;", "3 -> 4 ~> 5", "日本 é ▁ ▁1 <0x41>",
                "(x) a|b [ ] \\ ^ $ ? * {2} \\K (?=x)", "1", "", "e12 e1 e12"]
BYTE_TEXTS = ["1  + 2", " 1 + 2 ", "1 +\t2\n=\r\n3", "12 + 1x ; e1 e12 e123", "e1e12 x1 1x", "a.b axb ab", "héllo 1",
              "日本語 1 😀 2", "1\u30002\u00a03\x1c4\u20285", "<bos> 1 <eos> <pad>", "▁1 ▁ ▁▁ \u2582 Ġ 1▁", "   ", "\n",
              "1 2  3   4\t\t5", "x", "<0x41> <0x42>"]


def exported(tok, path: Path):
    from transformers import AutoTokenizer

    path.mkdir()
    save_hf_tokenizer(tok, path)
    return AutoTokenizer.from_pretrained(str(path))


def random_texts(n, pieces, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12))) for _ in range(n)]


# ------------------------------------------------------------------------------------------------ tokenizer
def test_export_encodes_and_decodes_exactly_like_the_builtin_with_bytes(tmp_path):
    tok = BuiltinTokenizer(SYMBOLS, byte_fallback=True)
    hf = exported(tok, tmp_path / "tok")
    assert len(hf) == tok.vocab_size
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (tok.pad_id, tok.bos_id, tok.eos_id)
    assert hf.convert_ids_to_tokens(tok.encode("1 + e12")) == ["▁1", "▁+", "▁e12"]
    pieces = SYMBOLS * 2 + [" "] * 30 + ["  ", "\n", "\t", "\u3000", "\u00a0", "\x1c", "\x85", "é", "😀", "y", "x1",
                                         "<bos>", "Ġ", "▁", "\u2582", "ab", "."]
    texts = SYMBOL_TEXTS + BYTE_TEXTS + random_texts(3000, pieces)
    got = hf(texts, add_special_tokens=False)["input_ids"]
    for text, ids in zip(texts, got):
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == text
    for text in SYMBOL_TEXTS + BYTE_TEXTS:
        assert hf(text)["input_ids"] == [tok.bos_id] + tok.encode(text)  # as every training document starts
    # Any id sequence, specials kept, decodes as the built-in does (invalid UTF-8 included).
    rng = random.Random(1)
    for _ in range(2000):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(0, 10))]
        assert hf.decode(ids, skip_special_tokens=False) == tok.decode(ids, skip_special_tokens=False), ids
    ids = [tok.bos_id] + tok.encode("1 + 2 x") + [tok.eos_id, tok.pad_id]
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids) == "1 + 2 x"


def test_export_without_bytes_encodes_symbol_texts_and_refuses_the_rest(tmp_path):
    tok = BuiltinTokenizer(SYMBOLS, byte_fallback=False)
    hf = exported(tok, tmp_path / "tok")
    assert len(hf) == tok.vocab_size
    texts = SYMBOL_TEXTS + [" ".join(random.Random(i).choices(SYMBOLS, k=i % 9)) for i in range(500)]
    for text, ids in zip(texts, hf(texts, add_special_tokens=False)["input_ids"]):
        assert ids == tok.encode(text), text
        assert hf.decode(ids) == text
    for text in BYTE_TEXTS:
        with pytest.raises(MoegrokError):
            tok.encode(text)
        with pytest.raises(Exception, match="UNK"):
            hf(text, add_special_tokens=False)


def test_byte_table_is_the_one_tokenizers_uses():
    from tokenizers import decoders, normalizers, pre_tokenizers

    assert set(_byte_chars()) == set(pre_tokenizers.ByteLevel.alphabet()) and len(set(_byte_chars())) == 256
    text = "".join(map(chr, range(0x800))) + "日本語€\uffff😀\U0010ffff"  # every lead and continuation byte of UTF-8
    assert normalizers.ByteLevel().normalize_str(text) == _byte_level(text)
    assert decoders.ByteLevel().decode(list(_byte_level(text))) == text


def test_corpus_tokenizer_is_the_corpus_tokenizer(tmp_path):
    """The tokenizer rebuilt from a config alone is the one build_corpus made, and its export turns the corpus's
    own texts (probe documents, test prompts) back into the corpus's token rows."""
    story = tmp_path / "s.txt"
    story.write_text("\n".join(f"the {i} cat  sat ; é\tdone {i % 7} + 1" for i in range(40)))
    domains = {"math": {"docs_per_step": 2, "modulus": 7}, "knowledge": {"docs_per_step": 2, "entities": 6,
                                                                         "relations": 3},
               "code": {"docs_per_step": 2, "modulus": 3}, "retrieval": {"docs_per_step": 1, "items": 12,
                                                                        "categories": 3, "fields": 2, "values": 3},
               "math_twin": {"docs_per_step": 1, "modulus": 7}}
    for i, extra in enumerate(({}, {"story": {"kind": "text", "docs_per_step": 2, "train_path": str(story)}})):
        cfg = DataConfig.from_dict({"seed": 3, "num_steps": 8, "val_docs": 4, "probe_docs": 6,
                                    "domains": {**domains, **extra}})
        corpus = build_corpus(cfg)
        tok = corpus_tokenizer(cfg)
        assert (tok.symbols, tok.byte_fallback) == (corpus.tokenizer.symbols, bool(extra))
        hf = exported(tok, tmp_path / f"tok{i}")
        p = corpus.probe_set()
        assert len(p["texts"]) > 0
        for text, row, mask, domain in zip(p["texts"], p["tokens"], p["mask"], p["domains"]):
            eos = [tok.eos_id] if domain == "story" else []  # text documents end with EOS, synthetic ones do not
            assert hf(text)["input_ids"] + eos == row[mask].tolist(), text
        for d in corpus.domains:
            ts = corpus.test_set(d)
            for prompt, row, n in zip(ts["prompts"], ts["tokens"], ts["prompt_len"]):
                assert hf(prompt)["input_ids"] == row[:n].tolist()


# --------------------------------------------------------------------------------------- convert, HF tokenizer
def save_hf_wordlevel(path: Path, words) -> dict:
    """A local HF tokenizer with BOS/EOS and no pad token (moegrok pads with EOS)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>"] + list(words))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(path))
    return vocab


def fake_run(run: Path, data: dict | None):
    """A run directory as the trainer lays it out (config.yaml, meta.json, one orbax step), random weights."""
    import orbax.checkpoint as ocp

    from moegrok.model.config import MoeConfig
    from moegrok.model.model import MoeLM, get_params
    from moegrok.rundir import write_meta

    cfg = MoeConfig(vocab_size=40, hidden_size=16, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                    num_experts=2, num_experts_per_tok=1)  # pad 1, eos 50279: the defaults, not the tokenizer's
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict(), **({"data": data} if data else {})}))
    write_meta(run, producer="train", num_layers=1, num_experts=2, top_k=1, d_model=16)
    mngr = ocp.CheckpointManager((run / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    mngr.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave(get_params(MoeLM(cfg, seed=0)))))
    mngr.wait_until_finished()
    mngr.close()


def test_convert_run_with_a_local_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    words = [str(i) for i in range(5)] + ["+", "=", ";", "cat"]
    save_hf_wordlevel(tmp_path / "tok", words)
    src = HFTokenizer(str(tmp_path / "tok"))
    assert (src.bos_id, src.eos_id, src.pad_id) == (1, 2, 2)
    data = {"tokenizer": str(tmp_path / "tok"), "domains": {"math": {"docs_per_step": 2, "modulus": 5}}}
    fake_run(tmp_path / "run", data)
    assert main(["convert", str(tmp_path / "run"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert hf("1 + 2 = 3 ; cat", add_special_tokens=False)["input_ids"] == src.encode("1 + 2 = 3 ; cat")
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (1, 2, 2)  # pad: what moegrok padded with
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "tok")).pad_token is None  # the source is left alone

    # A run directory without a data section (not the trainer's) converts as before, without a tokenizer.
    fake_run(tmp_path / "bare", None)
    assert main(["convert", str(tmp_path / "bare"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    assert sorted(p.name for p in (tmp_path / "hf2").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "hf2" / "config.json").read_text())["pad_token_id"] == 1

    # A tokenizer that cannot be found fails the convert before anything is written.
    data["tokenizer"] = str(tmp_path / "gone")
    fake_run(tmp_path / "lost", data)
    assert main(["convert", str(tmp_path / "lost"), str(tmp_path / "hf3"), "--to", "hf"]) == 1
    assert not (tmp_path / "hf3").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------------------ end to end
def tiny_memorizing_config():
    from moegrok.training.train import RunConfig

    return RunConfig.from_dict({
        "model": {"vocab_size": 32, "hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
                  "num_attention_heads": 2, "num_experts": 4, "num_experts_per_tok": 2, "pad_token_id": 0,
                  "eos_token_id": None},
        "data": {"domains": {"math": {"docs_per_step": 8, "modulus": 5, "test_items": 4}}, "num_steps": 200,
                 "statements_per_doc": 4, "val_docs": 4, "probe_docs": 8},
        "train": {"learning_rate": 0.01, "warmup_steps": 10, "weight_decay": 0.0, "num_checkpoints": 1,
                  "log_every": 50, "tensorboard": False}})


def jax_greedy(model, prompts: list[list[int]], n: int) -> list[list[int]]:
    """moegrok's own decoding, the reference: n times the argmax of the JAX model's next-token logits. One jitted
    forward over right-padded rows per step (causal, dropless: padding changes no real position's logits)."""
    import jax.numpy as jnp
    from flax import nnx

    forward = nnx.jit(lambda m, x: m(x).logits)
    lens = [len(p) for p in prompts]
    rows = np.zeros((len(prompts), max(lens) + n), np.int32)
    for row, p in zip(rows, prompts):
        row[:len(p)] = p
    for _ in range(n):
        logits = np.asarray(forward(model, jnp.asarray(rows)))
        for i, row in enumerate(rows):
            row[lens[i]] = int(logits[i, lens[i] - 1].argmax())
            lens[i] += 1
    return [row[len(p):len(p) + n].tolist() for row, p in zip(rows, prompts)]


def test_exported_run_reproduces_its_memorized_answers(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    from moegrok import RunDir
    from moegrok.convert.native import load_model
    from moegrok.training.train import train

    cfg = tiny_memorizing_config()
    run, dst = tmp_path / "run", tmp_path / "hf"
    train(cfg, run, progress=False)
    assert main(["convert", str(run), str(dst), "--to", "hf"]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= {
        p.name for p in dst.iterdir()}

    # Memorized probe documents: mean answer NLL so low that every answer token is the argmax (p > 1/2).
    rd = RunDir(run)
    step = rd.checkpoint_steps[-1]
    rec = rd.probe(step)
    S = cfg.data.statements_per_doc
    memorized = [r["text"] for r, loss in zip(rd.probes, rec.answer_loss) if loss * S < math.log(2)]
    assert memorized, rec.answer_loss
    items = []  # (prompt: the document up to its last answer, answer)
    for text in memorized:
        words = text.split()
        cut = len(words) - 1 - words[::-1].index("=")
        items.append((" ".join(words[:cut + 1]), words[cut + 1]))

    tok = AutoTokenizer.from_pretrained(str(dst))
    model = AutoModelForCausalLM.from_pretrained(str(dst)).eval()
    jax_model = load_model(run, step=step)
    builtin = corpus_tokenizer(cfg.data)
    n_new = 2  # the answer, then ";" (after it the next operand is random: a near-tie, no reference)
    prompts = [tok(prompt)["input_ids"] for prompt, _ in items]
    reference = jax_greedy(jax_model, prompts, n_new)
    for (prompt, answer), ids, want in zip(items, prompts, reference):
        assert ids == [builtin.bos_id] + builtin.encode(prompt)
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n_new, do_sample=False)
        assert out[0, len(ids):].tolist() == want, prompt
        assert tok.decode(want).split()[0] == answer, (prompt, tok.decode(want))  # what the run memorized
    # transformers 5's pipeline appends the decoded new tokens to the prompt; the implied space between the
    # prompt's last symbol and the first new one is not there (decode(new) starts with a symbol, no space).
    gen = pipeline("text-generation", model=str(dst))
    for (prompt, answer), want in list(zip(items, reference))[:2]:
        out = gen(prompt, max_new_tokens=2, do_sample=False)[0]["generated_text"]
        assert out == prompt + tok.decode(want[:2]) and tok.decode(want[:2]).split()[0] == answer, out
        new = gen(prompt, max_new_tokens=2, do_sample=False, return_full_text=False)[0]["generated_text"]
        assert new == tok.decode(want[:2]), new

    # The exported directory converts on with its tokenizer (hf -> moegrok -> hf).
    assert main(["convert", str(dst), str(tmp_path / "nat"), "--to", "moegrok"]) == 0
    assert main(["convert", str(tmp_path / "nat"), str(tmp_path / "hf2"), "--to", "hf"]) == 0
    again = AutoTokenizer.from_pretrained(str(tmp_path / "hf2"))
    assert again(items[0][0])["input_ids"] == tok(items[0][0])["input_ids"]
    config = json.loads((dst / "config.json").read_text())
    assert [config[f"{k}_token_id"] for k in ("pad", "bos", "eos")] == [builtin.pad_id, builtin.bos_id, builtin.eos_id]
