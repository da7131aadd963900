"""Converters: HF -> moegrok -> HF bit-identical (checked with the `safetensors` library, not our reader),
moegrok -> HF loads in `transformers` with equal logits, sharding, the fused expert layout, the native format and
run directories, atomic writes, and every kind of bad input (clear MoegrokError; CLI exit 1 with one line)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from moegrok.cli import main
from moegrok.convert import safetensors_io as st
from moegrok.convert.hf import (INDEX, load_olmoe, moe_config_from_hf_json, parse_size,
                                save_olmoe)
from moegrok.convert.native import load_model, save_model
from moegrok.errors import MoegrokError
from moegrok.families import config_from_hf
from moegrok.families.olmoe import DEFAULTS as HF_OLMOE_DEFAULTS
from moegrok.model.config import MoeConfig
from moegrok.model.model import MoeLM, get_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from safetensors.numpy import load_file, save_file  # noqa: E402  (the reference implementation)

V, D, I, L, E = 53, 16, 12, 2, 4
IDS = np.random.RandomState(0).randint(0, V, size=(2, 7))


def hf_config(**kw):
    from transformers import OlmoeConfig

    base = dict(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=2,
                num_key_value_heads=1, num_experts=E, num_experts_per_tok=2, eos_token_id=None, clip_qkv=None)
    return OlmoeConfig(**{**base, **kw})


def hf_random(dtype=None, seed=0, **kw):
    from transformers import OlmoeForCausalLM

    torch.manual_seed(seed)
    m = OlmoeForCausalLM(hf_config(**kw)).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            p.copy_(torch.randn(p.shape) * (0.3 if "norm" not in name else 0.2) + (1.0 if "norm" in name else 0.0))
    return m.to(dtype) if dtype is not None else m


def hf_logits(m, ids=IDS):
    with torch.no_grad():
        return m(torch.tensor(ids)).logits.float().numpy()


def our_logits(model, ids=IDS):
    from flax import nnx

    g, s = nnx.split(model)
    return np.asarray(jax.jit(lambda s, i: nnx.merge(g, s)(i).logits)(s, jnp.asarray(ids)))


def all_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a HF directory through the `safetensors` library."""
    files = sorted(path.glob("*.safetensors"))
    out = {}
    for f in files:
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf")
    hf_random().save_pretrained(path)
    return path


def assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert a[k].tobytes() == b[k].tobytes(), k


# ------------------------------------------------------------------------------------------------ round trips
@pytest.mark.parametrize("dtype", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_to_moegrok_to_hf_is_bit_identical(tmp_path, dtype):
    src = tmp_path / "src"
    hf_random(dtype).save_pretrained(src)
    model = load_olmoe(src)  # dtype=None keeps the checkpoint's
    assert model.cfg.param_dtype == ("bfloat16" if dtype else "float32")
    save_olmoe(model, tmp_path / "out")
    assert_bit_identical(all_tensors(src), all_tensors(tmp_path / "out"))
    for f in (tmp_path / "out").glob("*.safetensors"):
        from safetensors import safe_open

        with safe_open(f, "np") as h:
            assert h.metadata() == {"format": "pt"}


def test_tied_embeddings_round_trip(tmp_path):
    hf = hf_random(tie_word_embeddings=True)
    hf.save_pretrained(tmp_path / "src")
    model = load_olmoe(tmp_path / "src")
    assert model.lm_head is None
    save_olmoe(model, tmp_path / "out")
    out = all_tensors(tmp_path / "out")
    assert "lm_head.weight" not in out
    assert_bit_identical(all_tensors(tmp_path / "src"), out)
    from transformers import OlmoeForCausalLM

    np.testing.assert_allclose(hf_logits(OlmoeForCausalLM.from_pretrained(tmp_path / "out")), hf_logits(hf),
                               atol=1e-5)


def test_moegrok_to_hf_loads_in_transformers_with_equal_logits(tmp_path):
    from transformers import OlmoeForCausalLM

    cfg = MoeConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=2,
                    num_key_value_heads=1, num_experts=E, num_experts_per_tok=2, clip_qkv=2.0, rope_theta=300.0,
                    norm_topk_prob=True, eos_token_id=None, initializer_range=0.3)
    ours = MoeLM(cfg, seed=1)
    save_olmoe(ours, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["model_type"] == "olmoe" and config["architectures"] == ["OlmoeForCausalLM"]
    hf = OlmoeForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert hf.config.clip_qkv == 2.0 and hf.config.norm_topk_prob
    assert np.abs(hf_logits(hf) - our_logits(ours)).max() <= 1e-4


def test_sharded_save_and_load(tmp_path, hf_dir):
    model = load_olmoe(hf_dir)
    limit = 12_000
    save_olmoe(model, tmp_path / "sh", max_shard_size=limit)
    files = sorted((tmp_path / "sh").glob("*.safetensors"))
    assert len(files) > 2 and not (tmp_path / "sh" / "model.safetensors").exists()
    index = json.loads((tmp_path / "sh" / INDEX).read_text())
    tensors = all_tensors(tmp_path / "sh")
    assert set(index["weight_map"]) == set(tensors)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in tensors.values())
    for f in files:  # each shard under the limit unless it holds one oversized tensor
        held = load_file(f)
        assert sum(t.nbytes for t in held.values()) <= limit or len(held) == 1
    assert_bit_identical(all_tensors(hf_dir), tensors)
    from transformers import OlmoeForCausalLM

    np.testing.assert_allclose(hf_logits(OlmoeForCausalLM.from_pretrained(tmp_path / "sh")),
                               our_logits(load_olmoe(tmp_path / "sh")), atol=1e-4)


def test_fused_expert_layout_loads(tmp_path, hf_dir):
    """transformers' in-memory layout (gate_up_proj [E, 2I, D], down_proj [E, D, I]) written as a checkpoint."""
    hf = hf_random()
    sd = {k: v.detach().numpy().copy() for k, v in hf.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in sd
    (tmp_path / "fused").mkdir()
    save_file(sd, tmp_path / "fused" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "fused" / "config.json").write_text(hf.config.to_json_string())
    np.testing.assert_allclose(our_logits(load_olmoe(tmp_path / "fused")), hf_logits(hf), atol=1e-4)
    # ... and converts to the per-expert layout that the Hub uses.
    save_olmoe(load_olmoe(tmp_path / "fused"), tmp_path / "per_expert")
    assert_bit_identical(all_tensors(hf_dir), all_tensors(tmp_path / "per_expert"))


def test_load_dtype_conversion(hf_dir):
    m16 = load_olmoe(hf_dir, dtype="bfloat16")
    assert m16.cfg.dtype == m16.cfg.param_dtype == "bfloat16"
    assert m16.layers[0].moe.gate_up[...].dtype == jnp.bfloat16
    ref = all_tensors(hf_dir)["model.layers.1.mlp.experts.3.up_proj.weight"]
    got = np.asarray(m16.layers[1].moe.gate_up[...][3, :, I:].T.astype(jnp.float32))
    np.testing.assert_array_equal(got, ref.astype(jnp.bfloat16).astype(np.float32))


def test_native_round_trip(tmp_path, hf_dir):
    model = load_olmoe(hf_dir)
    save_model(model, tmp_path / "native")
    manifest = json.loads((tmp_path / "native" / "moegrok_model.json").read_text())
    assert manifest["format"] == "moegrok-model/1" and manifest["config"]["num_experts"] == E
    back = load_model(tmp_path / "native")
    assert back.cfg == model.cfg
    for a, b in zip(jax.tree.leaves(get_params(model)), jax.tree.leaves(get_params(back))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # native -> HF through the CLI equals the original checkpoint
    assert main(["convert", str(tmp_path / "native"), str(tmp_path / "hf"), "--to", "hf"]) == 0
    assert_bit_identical(all_tensors(hf_dir), all_tensors(tmp_path / "hf"))


def test_load_model_from_run_directory(tmp_path):
    """The trainer's layout: orbax CheckpointManager steps with a 'params' item; config.yaml section 'model'."""
    import orbax.checkpoint as ocp

    cfg = MoeConfig(vocab_size=V, hidden_size=D, intermediate_size=I, num_hidden_layers=L, num_attention_heads=2,
                    num_experts=E, num_experts_per_tok=2, eos_token_id=None)
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict(), "train": {"seed": 0}}))
    from moegrok.rundir import write_meta

    write_meta(run, producer="train", num_layers=L, num_experts=E, top_k=2, d_model=D)
    models = {5: MoeLM(cfg, seed=5), 10: MoeLM(cfg, seed=10)}
    mngr = ocp.CheckpointManager((run / "checkpoints").absolute(),
                                 options=ocp.CheckpointManagerOptions(enable_async_checkpointing=False))
    for step, m in models.items():
        mngr.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(get_params(m)),
                                                data=ocp.args.JsonSave({"next_step": step})))
    mngr.wait_until_finished()
    mngr.close()
    (run / "checkpoints" / "15.orbax-checkpoint-tmp-123").mkdir()  # an interrupted save: ignored
    for step, want in ((None, 10), (5, 5)):
        got = load_model(run, step=step)
        np.testing.assert_array_equal(np.asarray(got.embed[...]), np.asarray(models[want].embed[...]))
    with pytest.raises(MoegrokError, match=r"no step 7; available steps: \[5, 10\]"):
        load_model(run, step=7)
    assert main(["convert", str(run), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    assert all(t.dtype == jnp.bfloat16 for t in all_tensors(tmp_path / "hf").values())


def test_cli_hf_to_moegrok(tmp_path, hf_dir, capsys):
    assert main(["convert", str(hf_dir), str(tmp_path / "m"), "--to", "moegrok", "--dtype", "bfloat16"]) == 0
    assert "wrote" in capsys.readouterr().out
    assert load_model(tmp_path / "m").cfg.param_dtype == "bfloat16"


# ------------------------------------------------------------------------------------------------- our I/O
def test_our_safetensors_reader_and_writer_agree_with_the_library(tmp_path):
    import ml_dtypes

    rng = np.random.RandomState(0)
    arrays = {"a": rng.randn(3, 5).astype(np.float32), "b": rng.randn(7).astype(ml_dtypes.bfloat16),
              "c": np.arange(6, dtype=np.int64).reshape(2, 3), "empty": np.zeros((0, 4), np.float32)}
    save_file(arrays, tmp_path / "lib.safetensors")
    infos, _ = st.read_header(tmp_path / "lib.safetensors")
    for k, a in arrays.items():
        got = st.read_tensor(infos[k])
        assert got.dtype == a.dtype and got.tobytes() == a.tobytes()
    specs = [st.TensorSpec(k, a.dtype, a.shape, lambda a=a: a) for k, a in arrays.items()]
    st.write_file(tmp_path / "ours.safetensors", specs, {"format": "pt"})
    back = load_file(tmp_path / "ours.safetensors")
    assert all(back[k].tobytes() == a.tobytes() and back[k].dtype == a.dtype for k, a in arrays.items())


def test_config_parsing_matches_transformers():
    from transformers import OlmoeConfig

    assert {k: getattr(OlmoeConfig(), k) for k in HF_OLMOE_DEFAULTS if k != "num_key_value_heads"} == {
        k: v for k, v in HF_OLMOE_DEFAULTS.items() if k != "num_key_value_heads"}
    cases = [
        {"model_type": "olmoe"},  # all defaults: OLMoE-1B-7B-like
        {"model_type": "olmoe", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 32, "rope_theta": 500.0, "rope_scaling": None, "clip_qkv": 8.0, "eos_token_id": [5],
         "norm_topk_prob": True, "tie_word_embeddings": True, "torch_dtype": "bfloat16"},  # pre-5.0 style
        json.loads(hf_config(rope_parameters={"rope_type": "default", "rope_theta": 77.0}).to_json_string()),
    ]
    for d in cases:
        ref = config_from_hf(OlmoeConfig(**{k: v for k, v in d.items() if k != "model_type"}).to_dict())
        assert moe_config_from_hf_json(d) == ref


def test_parse_size():
    assert parse_size("5GB") == 5 * 10 ** 9 and parse_size("2GiB") == 2 * 2 ** 30 and parse_size(123) == 123
    with pytest.raises(MoegrokError, match="max_shard_size"):
        parse_size("lots")


# ------------------------------------------------------------------------------------------------ bad input
def copy_dir(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def sharded_copy(hf_dir: Path, dst: Path) -> Path:
    save_olmoe(load_olmoe(hf_dir), dst, max_shard_size=12_000)
    return dst


def rewrite_tensor(path: Path, key: str, value: np.ndarray):
    tensors = load_file(path)
    tensors[key] = value
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(path: Path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _missing_shard(d: Path):
    victim = sorted(d.glob("model-*.safetensors"))[1]
    victim.unlink()
    return victim.name


def _truncated(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])


def _corrupt_header(d: Path):
    f = d / "model.safetensors"
    raw = bytearray(f.read_bytes())
    raw[8:20] = b"not json!!!!"
    f.write_bytes(bytes(raw))


def _garbage_length(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(struct.pack("<Q", 10 ** 12) + f.read_bytes()[8:])


def _tiny_file(d: Path):
    (d / "model.safetensors").write_bytes(b"abc")


BAD = {
    # name: (make it bad, pattern the message must contain)
    "missing shard": (_missing_shard, r"model-00002-of-\d+\.safetensors: missing shard .*lists \d+ tensor"),
    "truncated file": (_truncated, r"model\.safetensors: truncated safetensors file: tensor '.*' needs data bytes"),
    "corrupt header": (_corrupt_header, r"model\.safetensors: corrupt safetensors header \(not valid JSON"),
    "absurd header length": (_garbage_length, r"model\.safetensors: corrupt or truncated safetensors file"),
    "shorter than 8 bytes": (_tiny_file, r"truncated safetensors file \(3 bytes"),
    "wrong shape": (lambda d: rewrite_tensor(d / "model.safetensors", "model.layers.1.self_attn.k_proj.weight",
                                             np.zeros((8, D + 1), np.float32)),
                    r"tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \(8, 17\), but config\.json "
                    r"implies \(8, 16\)"),
    "missing key": (lambda d: save_file({k: v for k, v in load_file(d / "model.safetensors").items()
                                         if k != "model.layers.0.mlp.experts.2.down_proj.weight"},
                                        d / "model.safetensors"),
                    r"lacks 1 tensor\(s\) .*'model\.layers\.0\.mlp\.experts\.2\.down_proj\.weight' \(expected shape "
                    r"\(16, 12\)\)"),
    "unsupported model_type": (lambda d: edit_config(d, model_type="llama"),
                               r"config\.json: model_type 'llama' has no JAX implementation \(JAX families: olmoe, mixtral, "
                               r"qwen2_moe, qwen3_moe, glm4_moe\); .*--backend torch"),
    "config has more experts": (lambda d: edit_config(d, num_experts=E + 2),
                                r"lacks \d+ tensor\(s\).*experts\.4\..*num_experts=6"),
    "config has fewer layers": (lambda d: edit_config(d, num_hidden_layers=1),
                                r"tensor\(s\) the config does not account for, e\.g\. 'model\.layers\.1\..*"
                                r"num_hidden_layers=1"),
    "config hidden size": (lambda d: edit_config(d, hidden_size=32, num_attention_heads=4, num_key_value_heads=2),
                           r"has shape \(\d+, 16\), but config\.json implies \(\d+, 32\)"),
    "bad config value": (lambda d: edit_config(d, num_experts_per_tok=9),
                         r"config\.json: model config: field 'num_experts_per_tok'"),
    "config not json": (lambda d: (d / "config.json").write_text("{oops"), r"config\.json: not valid JSON"),
    "no weights": (lambda d: (d / "model.safetensors").unlink(), r"no model\.safetensors or model\.safetensors"),
    "no config": (lambda d: (d / "config.json").unlink(), r"config\.json: missing"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_raise_clear_errors(tmp_path, hf_dir, case, capsys):
    make_bad, pattern = BAD[case]
    d = sharded_copy(hf_dir, tmp_path / "bad") if case == "missing shard" else copy_dir(hf_dir, tmp_path / "bad")
    make_bad(d)
    with pytest.raises(MoegrokError, match=pattern):
        load_olmoe(d)
    capsys.readouterr()
    assert main(["convert", str(d), str(tmp_path / "out"), "--to", "moegrok"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("moegrok convert: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_bad_native_and_paths(tmp_path, hf_dir, capsys):
    with pytest.raises(MoegrokError, match="does not exist"):
        load_model(tmp_path / "nothing")
    save_model(load_olmoe(hf_dir), tmp_path / "nat")
    manifest = json.loads((tmp_path / "nat" / "moegrok_model.json").read_text())
    manifest["config"]["intermediate_size"] = I + 4
    (tmp_path / "nat" / "moegrok_model.json").write_text(json.dumps(manifest))
    with pytest.raises(MoegrokError, match=r"parameter \['layers'\]\['0'\]\['moe'\]\['down'\] has shape "
                                           r"\(4, 12, 16\), the model config implies \(4, 16, 16\)"):
        load_model(tmp_path / "nat")
    manifest["format"] = "something-else/9"
    (tmp_path / "nat" / "moegrok_model.json").write_text(json.dumps(manifest))
    with pytest.raises(MoegrokError, match="field 'format' is 'something-else/9'"):
        load_model(tmp_path / "nat")
    assert main(["convert", str(hf_dir), str(tmp_path / "x"), "--to", "hf", "--max-shard-size", "huge"]) == 1
    assert "max_shard_size" in capsys.readouterr().err


def test_save_is_atomic_and_refuses_to_clobber(tmp_path, hf_dir, monkeypatch):
    model = load_olmoe(hf_dir)
    target = tmp_path / "out"
    calls = {"n": 0}
    real = st.write_file

    def failing_write(path, specs, metadata=None, on_tensor=None):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(path, specs, metadata, on_tensor)

    monkeypatch.setattr(st, "write_file", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_olmoe(model, target, max_shard_size=12_000)
    assert os.listdir(tmp_path) == []  # neither the target nor a temporary directory is left behind
    monkeypatch.setattr(st, "write_file", real)

    save_olmoe(model, target)
    with pytest.raises(MoegrokError, match="already exists and is not empty"):
        save_olmoe(model, target)
    with pytest.raises(MoegrokError, match="already exists and is not empty"):
        save_model(model, target)
    save_olmoe(load_olmoe(hf_dir, dtype="bfloat16"), target, overwrite=True)
    assert load_olmoe(target).cfg.param_dtype == "bfloat16"
    assert sorted(os.listdir(tmp_path)) == ["out"]
