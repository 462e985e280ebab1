"""Preflight checks: KV-cache arithmetic, memory budget messages, model/tokenizer/data files,
mesh divisibility, and a workdir checkpoint from another architecture."""

import json
import os
import re

import jax
import numpy as np
import pytest

from configs import arith_tiny
from migjax.checkpointing import Checkpointer
from migjax.data.tokenizer import build_arith_tokenizer
from migjax.models import ModelConfig, init_model, split
from migjax.models.loading import save_params
from migjax.preflight import (
    default_device_memory,
    kv_cache_bytes,
    memory_plan,
    preflight,
)
from migjax.train_state import init_state, make_optimizer, place_state

SCRATCH = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2, num_kv_heads=1,
               head_dim=16)


def tiny_config(**overrides):
    """configs/arith_tiny.py shrunk to the scratch shape used throughout the tests."""
    c = arith_tiny.get_config()
    c.model.scratch.update(SCRATCH)
    c.rl.batch_prompts, c.rl.group_size, c.rl.minibatches = 2, 2, 1
    c.sampler.max_new_tokens, c.eval.max_new_tokens = 16, 16
    c.eval.batch_size, c.eval.pass_k = 2, 0
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok"))
    tok = build_arith_tokenizer(path, vocab_size=256)
    return path, len(tok)


def random_params(cfg: ModelConfig, seed: int = 0) -> dict:
    """Parameters of the decoder `cfg` describes, random numpy values (nothing compiles)."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: split(init_model(cfg, 0))[1])
    return {k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in shapes.items()}


def model_dir(root, tokenizer_path, *, vocab_size=256, **fields):
    """A Hugging Face directory (config.json, model.safetensors, tokenizer) of a tiny qwen2."""
    from migjax.data.tokenizer import load_tokenizer

    cfg = ModelConfig(vocab_size=vocab_size, hidden_size=16, intermediate_size=32, num_layers=1,
                      num_heads=2, num_kv_heads=1, head_dim=8, **fields)
    params = random_params(cfg)
    path = os.path.join(str(root), "model")
    save_params(params, cfg, path, tokenizer=load_tokenizer(tokenizer_path))
    return path


# ---------------------------------------------------------------------------- arithmetic


def test_kv_cache_bytes_by_hand():
    # 2 (k, v) x 2 layers x 16 sequences x 80 slots x 1 head x 16 dims x 4 bytes
    assert kv_cache_bytes(num_layers=2, num_seqs=16, seq_len=80, num_kv_heads=1, head_dim=16,
                          dtype_bytes=4) == 327_680
    # split over 4 devices: 4 sequences each
    assert kv_cache_bytes(num_layers=2, num_seqs=16, seq_len=80, num_kv_heads=1, head_dim=16,
                          dtype_bytes=4, batch_shards=4) == 81_920
    # over 3 devices a device holds ceil(16 / 3) = 6 whole sequences
    assert kv_cache_bytes(num_layers=2, num_seqs=16, seq_len=80, num_kv_heads=1, head_dim=16,
                          dtype_bytes=4, batch_shards=3) == 122_880
    # Qwen2.5-1.5B (28 layers, 2 KV heads of 128) in bfloat16, 32 x 8 samples of 384 + 512:
    # 2 * 28 * 256 * 896 * 2 * 128 * 2 = 6_576_668_672 bytes (6.125 GiB)
    assert kv_cache_bytes(num_layers=28, num_seqs=256, seq_len=896, num_kv_heads=2,
                          head_dim=128, dtype_bytes=2) == 6_576_668_672


def test_memory_plan_by_hand():
    c = tiny_config(**{"task.max_prompt_len": 64, "rl.batch_prompts": 4, "rl.group_size": 4,
                       "eval.batch_size": 8, "eval.pass_k": 2, "eval.max_new_tokens": 48})
    cfg = ModelConfig(vocab_size=256, **SCRATCH)
    plan = memory_plan(c, cfg, device_count=1)
    # parameters, by hand: attention 32*16*(2+2) + 2*16*32 + biases 16*(2+2) = 3136, MLP
    # 3*32*64 = 6144, norms 2*32: 9344 per layer; 2 layers + final norm 32 + tied embedding
    # 256*32 = 26_912 parameters; float32, times 3 (parameters and two AdamW moments)
    assert plan["params"] == 26_912 * 4 * 3
    # rollout: 16 sequences of 64 + 16 slots; evaluation: 8 prompts x pass_k 2 of 64 + 48
    assert plan["rollout_kv"] == 2 * 2 * 16 * 80 * 1 * 16 * 4
    assert plan["eval_kv"] == 2 * 2 * 16 * 112 * 1 * 16 * 4
    # two data shards halve the caches; a frozen reference model adds a copy of the parameters
    c.loss.kl_coef = 0.1
    plan2 = memory_plan(c, cfg, device_count=2)
    assert plan2["rollout_kv"] == plan["rollout_kv"] // 2
    assert plan2["params"] == 26_912 * 4 * 4


def test_memory_errors_say_need_available_and_settings():
    c = tiny_config()
    plan = memory_plan(c, ModelConfig(vocab_size=256, **SCRATCH), 1)
    # enough for the state, not for the rollout cache
    avail = plan["params"] + plan["rollout_kv"] // 2
    with pytest.raises(MemoryError) as info:
        preflight(c, device_memory_bytes=avail, device_count=1)
    msg = str(info.value)
    need = plan["params"] + plan["rollout_kv"]
    assert f"needs at least {need / 2**30:.2f} GiB ({need:,} bytes) per device" in msg
    assert f"({avail:,} bytes) is available" in msg
    for knob in ("rl.batch_prompts", "rl.group_size", "sampler.max_new_tokens",
                 "task.max_prompt_len"):
        assert knob in msg
    assert "rollout" in msg
    # the evaluation cache: many pass@k samples
    c2 = tiny_config(**{"eval.pass_k": 64, "eval.batch_size": 64})
    with pytest.raises(MemoryError, match=r"evaluation sampler .* lower eval\.batch_size"):
        preflight(c2, device_memory_bytes=avail + plan["rollout_kv"], device_count=1)
    # the state alone does not fit
    with pytest.raises(MemoryError, match=r"train state alone .*\(mesh\.fsdp, mesh\.tensor\)"):
        preflight(c, device_memory_bytes=plan["params"] - 1, device_count=1)
    # everything fits
    preflight(c, device_memory_bytes=avail + plan["rollout_kv"], device_count=1)


class FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_memory_limit_comes_from_the_device(monkeypatch):
    huge = tiny_config(**{"rl.batch_prompts": 4096, "rl.group_size": 64})
    # a backend that reports no limit (CPU): not checked unless given
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice(None)])
    assert default_device_memory() is None
    preflight(huge, device_count=1)
    with pytest.raises(MemoryError):
        preflight(huge, device_count=1, device_memory_bytes=2**30)
    # an accelerator reports its limit
    monkeypatch.setattr(jax, "devices", lambda *a: [FakeDevice({"bytes_limit": 2**30,
                                                                 "bytes_in_use": 0})])
    assert default_device_memory() == 2**30
    with pytest.raises(MemoryError, match=r"1\.00 GiB \(1,073,741,824 bytes\) is available"):
        preflight(huge, device_count=1)
    preflight(tiny_config(), device_count=1)


def test_mesh_divisibility_comes_from_validate():
    with pytest.raises(ValueError, match=r"rl\.batch_prompts=3 is not divisible .* = 2"):
        preflight(tiny_config(**{"rl.batch_prompts": 3}), device_count=2)


# ---------------------------------------------------------------------------- files


def test_model_directory_checks(tmp_path, tokenizer_dir):
    tok_path, _ = tokenizer_dir
    good = model_dir(tmp_path, tok_path)
    c = tiny_config(**{"model.path": good})
    preflight(c, device_count=1, device_memory_bytes=2**30)

    missing = str(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=re.escape(f"model.path={missing!r}: not a dir")):
        preflight(tiny_config(**{"model.path": missing}), device_count=1)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"model\.path=.*config\.json: missing"):
        preflight(tiny_config(**{"model.path": str(empty)}), device_count=1)

    cfg_file = os.path.join(good, "config.json")
    hf = json.load(open(cfg_file))
    json.dump({**hf, "model_type": "gpt2"}, open(cfg_file, "w"))
    with pytest.raises(ValueError, match=r"model\.path=.*unsupported architecture: model_type=.gpt2."):
        preflight(c, device_count=1)
    json.dump(hf, open(cfg_file, "w"))

    # only pickle weights
    os.rename(os.path.join(good, "model.safetensors"), os.path.join(good, "pytorch_model.bin"))
    with pytest.raises(FileNotFoundError, match=r"only pickle weights \(pytorch_model\.bin\)"):
        preflight(c, device_count=1)
    # an index naming a shard that is not there
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-1.safetensors"}}
    json.dump(index, open(os.path.join(good, "model.safetensors.index.json"), "w"))
    with pytest.raises(FileNotFoundError, match=r"missing: \['model-1\.safetensors'\]"):
        preflight(c, device_count=1)


def test_tokenizer_must_exist_and_fit_the_vocabulary(tmp_path, tokenizer_dir):
    tok_path, n_tokens = tokenizer_dir
    small = model_dir(tmp_path, tok_path, vocab_size=128)
    c = tiny_config(**{"model.path": small})
    with pytest.raises(ValueError) as info:
        preflight(c, device_count=1)
    msg = str(info.value)
    assert f"has {n_tokens} tokens but the model's vocab_size is 128" in msg
    assert "model.path=" in msg

    # a separate tokenizer_path without tokenizer.json
    os.remove(os.path.join(small, "tokenizer.json"))
    big = model_dir(tmp_path / "big", tok_path, vocab_size=256)
    c = tiny_config(**{"model.path": big, "tokenizer_path": small})
    with pytest.raises(FileNotFoundError, match=r"tokenizer_path=.*no tokenizer\.json"):
        preflight(c, device_count=1)


def test_data_paths_are_checked(tmp_path):
    train = tmp_path / "train.jsonl"
    c = tiny_config(**{"task.kind": "gsm8k", "model.preset": "tiny",
                       "task.train_path": str(train)})
    with pytest.raises(FileNotFoundError, match=r"task\.train_path=.*train\.jsonl.*no such"):
        preflight(c, device_count=1)
    train.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    c.task.eval = {"test": f"gsm8k:{tmp_path / 'test.jsonl'}"}
    with pytest.raises(FileNotFoundError, match=r"task\.eval\.test=.*test\.jsonl"):
        preflight(c, device_count=1)
    c.task.eval = {"test": str(train)}
    with pytest.raises(ValueError, match=r"task\.eval\.test=.*expected 'kind:path'"):
        preflight(c, device_count=1)
    c.task.eval = {"test": f"gsm8k:{train}"}
    c.task.exclude_path = str(tmp_path / "math500.jsonl")
    with pytest.raises(FileNotFoundError, match=r"task\.exclude_path="):
        preflight(c, device_count=1)
    c.task.exclude_path = ""
    preflight(c, device_count=1)


def test_empty_data_files_and_sets_are_named(tmp_path, tokenizer_dir):
    from migjax import experiment as ex
    from migjax.data.tokenizer import load_tokenizer

    train, test = tmp_path / "train.jsonl", tmp_path / "test.jsonl"
    train.write_text("\n  \n")
    test.write_text('{"question": "1+1?", "answer": "#### 2"}\n')
    c = tiny_config(**{"task.kind": "gsm8k", "model.preset": "tiny",
                       "task.train_path": str(train)})
    c.task.eval = {"test": f"gsm8k:{test}"}
    with pytest.raises(ValueError, match=rf"task\.train_path='{train}': the file is empty"):
        preflight(c, device_count=1)
    train.write_text('{"question": "2+2?", "answer": "#### 4"}\n')
    preflight(c, device_count=1)
    test.write_text("")
    with pytest.raises(ValueError, match=rf"task\.eval\.test=.*the file '{test}' is empty"):
        preflight(c, device_count=1)
    test.write_text('{"no_question": 1}\n')  # every record malformed: an empty set
    preflight(c, device_count=1)
    tok = load_tokenizer(tokenizer_dir[0])
    with pytest.raises(ValueError, match=r"task\.eval\.test=.*no usable evaluation problem"):
        ex.build_data(c, tok)
    c.task.eval = {}
    train.write_text('{"question": "' + "7 + " * 200 + '1?", "answer": "#### 8"}\n')
    with pytest.raises(ValueError, match=rf"task\.train_path='{train}': no usable training"):
        ex.build_data(c, tok)  # its only prompt is too long and skipped


# ---------------------------------------------------------------------------- checkpoints


def test_workdir_checkpoint_from_another_architecture(tmp_path):
    """A train state saved with one model shape, restored the way the trainer does it (abstract
    state with shardings) with another: the error names the checkpoint and the first key."""
    mesh = jax.make_mesh((1,), ("data",))
    optimizer = make_optimizer(lr=1e-3)

    def state_of(hidden):
        cfg = ModelConfig(vocab_size=64, **{**SCRATCH, "hidden_size": hidden})
        params = {k: jax.numpy.asarray(v) for k, v in random_params(cfg).items()}
        return place_state(init_state(params, optimizer), mesh)[0]

    ckdir = tmp_path / "checkpoints"
    with Checkpointer(ckdir, async_save=False) as ck:
        ck.save(3, state_of(32), {"step": 3})
    state = state_of(48)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    with Checkpointer(ckdir) as ck, pytest.raises(ValueError) as info:
        ck.restore(ck.latest_step(), abstract)
    msg = str(info.value)
    assert f"checkpoint {ckdir / '3'} does not match the model's state" in msg
    # params sort by name: attn_norm [layers, hidden] is the first parameter leaf
    assert ".params['attn_norm'] has shape (2, 32) float32 in the checkpoint" in msg
    assert "the model expects (2, 48) float32" in msg
    # the same architecture restores bitwise
    with Checkpointer(ckdir) as ck:
        same = state_of(32)
        restored, extra = ck.restore(3, jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), same))
    assert extra == {"step": 3}
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(same), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_wandb_without_the_package_fails_up_front(monkeypatch):
    import importlib.util

    c = tiny_config(**{"log.wandb": True})
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ImportError, match=r"log.wandb=True needs the wandb package"):
        preflight(c, device_count=1)
    c.log.wandb = False
    preflight(c, device_count=1)
