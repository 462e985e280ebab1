"""Checks run before any work starts: model and tokenizer files, data paths, the mesh, and
whether the sampler's KV cache and the train state fit in device memory."""

from __future__ import annotations

import importlib.util
import json
import math
import os

from migjax.configs import data_root

ARITH_VOCAB = 256  # vocabulary of the tokenizer the arith task builds (migjax.experiment)
SCENE_VOCAB = 512  # and of the scene task's
ROLLOUT_KNOBS = "rl.batch_prompts, rl.group_size, sampler.max_new_tokens, task.max_prompt_len"
EVAL_KNOBS = ("eval.batch_size, eval.pass_k, eval.max_new_tokens (or sampler.max_new_tokens), "
              "task.max_prompt_len")
# Copies of the parameters the train state keeps on device: the parameters and AdamW's two
# moments (a frozen reference model adds one more).
STATE_COPIES = 3


def kv_cache_bytes(*, num_layers: int, num_seqs: int, seq_len: int, num_kv_heads: int,
                   head_dim: int, dtype_bytes: int, batch_shards: int = 1) -> int:
    """Bytes of the sampler's KV cache on one device: keys and values of every layer for
    `num_seqs` sequences of `seq_len` slots, the sequences split over `batch_shards` devices
    (rounded up: a device holds whole sequences)."""
    per_device = math.ceil(num_seqs / batch_shards)
    return 2 * num_layers * per_device * seq_len * num_kv_heads * head_dim * dtype_bytes


def _size(n: int) -> str:
    return f"{n / 2**30:,.2f} GiB ({n:,} bytes)"


def default_device_memory() -> int | None:
    """The first device's memory limit in bytes, or None where the backend does not report it
    (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["bytes_limit"]) if stats and "bytes_limit" in stats else None


# ---------------------------------------------------------------------------- files


def check_model_dir(path: str, setting: str = "model.path"):
    """The ModelConfig of a Hugging Face model directory whose weights are safetensors.
    Raises FileNotFoundError / ValueError naming `setting` and the file at fault."""
    from migjax.models.config import ModelConfig
    from migjax.models.loading import INDEX_FILE, PICKLE_FILES, SINGLE_FILE, _model_type

    if not os.path.isdir(path):
        raise FileNotFoundError(f"{setting}={path!r}: not a directory")
    try:
        if _model_type(path) == "qwen2_5_vl":  # the language model of a vision-language one
            from migjax.models.qwen25vl import VLConfig
            cfg = VLConfig.from_dir(path).text
        else:
            cfg = ModelConfig.from_dir(path)
    except (OSError, ValueError) as e:
        raise type(e)(f"{setting}={path!r}: {e}") from e
    index = os.path.join(path, INDEX_FILE)
    if os.path.isfile(index):
        try:
            with open(index) as fh:
                files = sorted(set(json.load(fh)["weight_map"].values()))
        except (OSError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{setting}={path!r}: {index} is not a safetensors index with a "
                             f"weight_map ({e})") from e
        missing = [f for f in files if not os.path.isfile(os.path.join(path, f))]
        if missing:
            raise FileNotFoundError(f"{setting}={path!r}: {index} lists shards that are "
                                    f"missing: {missing}")
    elif not os.path.isfile(os.path.join(path, SINGLE_FILE)):
        pickles = [f for f in PICKLE_FILES if os.path.isfile(os.path.join(path, f))]
        found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no weights"
        raise FileNotFoundError(
            f"{setting}={path!r}: {found}; migjax loads safetensors only ({SINGLE_FILE} or "
            f"{INDEX_FILE}), never pickle files")
    return cfg


def check_tokenizer(path: str, setting: str, vocab_size: int | None):
    """Loads the tokenizer at `path`; its vocabulary must fit the model's `vocab_size`."""
    from migjax.data.tokenizer import load_tokenizer

    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise type(e)(f"{setting}={path!r}: {e}") from e
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(f"{setting}={path!r}: the tokenizer has {len(tokenizer)} tokens but the "
                         f"model's vocab_size is {vocab_size}; ids past {vocab_size - 1} would "
                         f"have no embedding")
    return tokenizer


def is_blank_file(path: str) -> bool:
    """Whether `path` is a file holding nothing but whitespace (read until the first byte
    that is not)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def check_data_paths(c) -> None:
    """task.train_path, task.exclude_path and every task.eval entry name existing files, and
    the training and evaluation files are not empty."""
    if c.task.kind in ("arith", "scenes"):
        return
    if not os.path.exists(c.task.train_path.partition("#")[0]):
        raise FileNotFoundError(f"task.train_path={c.task.train_path!r}: no such file "
                                f"(relative paths start at {os.getcwd()}; the recipes' data "
                                f"sets are under MIGJAX_DATA={data_root()})")
    if is_blank_file(c.task.train_path.partition("#")[0]):
        raise ValueError(f"task.train_path={c.task.train_path!r}: the file is empty")
    if c.task.exclude_path and not os.path.exists(c.task.exclude_path):
        raise FileNotFoundError(f"task.exclude_path={c.task.exclude_path!r}: no such file")
    for name, spec in c.task.eval.items():
        kind, sep, path = str(spec).partition(":")
        path = path.partition("#")[0]  # visual sets: "clevr:ROOT#split"
        if not sep or not kind or not path:
            raise ValueError(f"task.eval.{name}={spec!r}: expected 'kind:path'")
        if not os.path.exists(path):
            raise FileNotFoundError(f"task.eval.{name}={spec!r}: no such file {path!r}")
        if is_blank_file(path):
            raise ValueError(f"task.eval.{name}={spec!r}: the file {path!r} is empty")


def check_custom_rewards(c) -> None:
    """Every reward.custom function imports here (the worker process imports it again)."""
    from migjax.rewards.custom import load_function

    for i, name in enumerate(c.reward.custom):
        load_function(name, f"reward.custom[{i}]")


def model_config(c, workdir: str | None = None):
    """The ModelConfig the run will build (vocabulary included), checking model and tokenizer
    files on the way; None when it is not known before the run starts (a package model not yet
    converted)."""
    from migjax.experiment import PACKAGED, packaged_module
    from migjax.models.config import PRESETS, ModelConfig

    path = c.model.path
    tok_path = c.tokenizer_path or path
    for name in {path, tok_path} & set(PACKAGED):
        module = packaged_module(name)
        converted = os.path.join(workdir, PACKAGED[name][1]) if workdir else None
        if not (converted and module.is_converted(converted)):
            module.check_installed()  # raises naming the missing package
            return None
        path = converted if path == name else path
        tok_path = converted if tok_path == name else tok_path
    if path:
        cfg = check_model_dir(path)
        check_tokenizer(tok_path, "tokenizer_path" if c.tokenizer_path else "model.path",
                        cfg.vocab_size)
        return cfg.replace(param_dtype=c.model.dtype, dtype=c.model.dtype)
    vocab = SCENE_VOCAB if c.task.kind == "scenes" else ARITH_VOCAB
    if c.tokenizer_path:
        vocab = len(check_tokenizer(c.tokenizer_path, "tokenizer_path", None))
    if c.model.preset:
        if c.model.preset not in PRESETS:
            raise ValueError(f"model.preset={c.model.preset!r}; known: {sorted(PRESETS)}")
        base = PRESETS[c.model.preset]
        return base.replace(vocab_size=max(base.vocab_size, vocab), param_dtype=c.model.dtype,
                            dtype=c.model.dtype)
    s = c.model.scratch
    return ModelConfig(model_type="qwen2", vocab_size=vocab, hidden_size=s.hidden_size,
                       intermediate_size=s.intermediate_size, num_layers=s.num_layers,
                       num_heads=s.num_heads, num_kv_heads=s.num_kv_heads, head_dim=s.head_dim,
                       param_dtype=c.model.dtype, dtype=c.model.dtype)


# ---------------------------------------------------------------------------- memory


def mesh_shape(c, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) sizes of the run's mesh."""
    fsdp, tensor = c.mesh.fsdp, c.mesh.tensor
    data = c.mesh.data if c.mesh.data > 0 else max(1, device_count // (fsdp * tensor))
    return data, fsdp, tensor


def memory_plan(c, cfg, device_count: int) -> dict[str, int]:
    """Bytes per device of the parameters held by the train state and of the largest sampler
    KV cache (rollout and evaluation), a lower bound of what the run needs."""
    import numpy as np

    data, fsdp, tensor = mesh_shape(c, device_count)
    nbytes = np.dtype(c.model.dtype).itemsize
    copies = STATE_COPIES + (1 if c.loss.kl_coef > 0 or c.mig.scorer == "reference" else 0)
    params = math.ceil(cfg.num_params() * nbytes * copies / (fsdp * tensor))
    common = dict(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads,
                  head_dim=cfg.head_dim, dtype_bytes=nbytes, batch_shards=data * fsdp)
    rollout = kv_cache_bytes(num_seqs=c.rl.batch_prompts * c.rl.group_size,
                             seq_len=c.task.max_prompt_len + c.sampler.max_new_tokens, **common)
    eval_new = c.eval.max_new_tokens or c.sampler.max_new_tokens
    evaluation = kv_cache_bytes(num_seqs=c.eval.batch_size * max(1, c.eval.pass_k),
                                seq_len=c.task.max_prompt_len + eval_new, **common)
    return {"params": params, "rollout_kv": rollout, "eval_kv": evaluation}


def check_memory(plan: dict[str, int], available: int) -> None:
    """Raises MemoryError saying what is needed, what is available and what to lower."""
    if plan["params"] > available:
        raise MemoryError(
            f"the train state alone needs {_size(plan['params'])} per device (parameters and "
            f"optimizer moments) but {_size(available)} is available; use a smaller model or "
            f"shard it further (mesh.fsdp, mesh.tensor)")
    for key, what, knobs in (("rollout_kv", "rollout", ROLLOUT_KNOBS),
                             ("eval_kv", "evaluation", EVAL_KNOBS)):
        need = plan["params"] + plan[key]
        if need > available:
            raise MemoryError(
                f"the {what} sampler needs at least {_size(need)} per device "
                f"({_size(plan[key])} KV cache + {_size(plan['params'])} train state) but "
                f"{_size(available)} is available; lower {knobs}")


def preflight(c, *, device_memory_bytes: int | None = None, device_count: int | None = None,
              workdir: str | None = None) -> None:
    """Fails fast, with an error naming the setting or file, on anything that would stop the
    run later: config consistency and mesh divisibility (`validate`), model and tokenizer files,
    data paths, and device memory (`device_memory_bytes`, default: what the first device
    reports; unchecked on CPU unless given)."""
    import jax

    from migjax.config_checks import validate

    device_count = jax.device_count() if device_count is None else device_count
    validate(c, device_count)
    check_data_paths(c)
    check_custom_rewards(c)
    if c.log.wandb and importlib.util.find_spec("wandb") is None:
        raise ImportError("log.wandb=True needs the wandb package (pip install wandb)")
    cfg = model_config(c, workdir)
    if device_memory_bytes is None:
        device_memory_bytes = default_device_memory()
    if cfg is not None and device_memory_bytes is not None:
        check_memory(memory_plan(c, cfg, device_count), device_memory_bytes)
