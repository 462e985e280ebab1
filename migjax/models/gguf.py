"""Converts a (quantised) GGUF checkpoint into a float32 Hugging Face model directory
(config.json, model.safetensors, tokenizer files) that `migjax.models.load_pretrained` and
transformers both read. Runs offline: transformers' GGUF loader (it needs the `gguf` package)
de-quantises the weights and rebuilds the config and the tokenizer from the GGUF metadata.

The per-model modules (`migjax.models.smollm2`, `migjax.models.gemma3`) say where their GGUF
comes from and which corrections, if any, their converted config needs.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable

REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")

# Where the GGUF comes from: a path, or a function that writes it into the scratch folder it is
# given and returns its path (called only when a conversion is needed).
GGUFSource = str | os.PathLike | Callable[[str], str]
# Corrections to the config.json transformers writes: takes the parsed dict, returns the fixed one.
ConfigFix = Callable[[dict], dict]


def is_converted(out_dir: str, model_type: str | None = None) -> bool:
    """Whether `out_dir` already holds a converted model: every required file, and a config.json
    that parses (with `model_type` when one is given)."""
    if not all(os.path.isfile(os.path.join(out_dir, f)) for f in REQUIRED_FILES):
        return False
    try:
        with open(os.path.join(out_dir, "config.json")) as fh:
            hf = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return False
    return model_type is None or hf.get("model_type") == model_type


def _convert_into(gguf_file: str, out_dir: str, fix_config: ConfigFix | None,
                  extra_files: dict[str, str]) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(os.fspath(gguf_file)))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # The weights are de-quantised in memory; drop the GGUF quantisation flags so that the
    # model saves (and later loads) as a plain float32 checkpoint.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if fix_config is not None:
        f = os.path.join(out_dir, "config.json")
        with open(f) as fh:
            hf = fix_config(json.load(fh))
        with open(f, "w") as fh:
            json.dump(hf, fh, indent=2, sort_keys=True)
            fh.write("\n")
    for dest, src in extra_files.items():
        shutil.copyfile(src, os.path.join(out_dir, dest))


def convert_gguf(gguf_file: GGUFSource, out_dir: str, *, model_type: str | None = None,
                 fix_config: ConfigFix | None = None, extra_files: dict[str, str] | None = None,
                 name: str = "model") -> str:
    """Converts `gguf_file` into `out_dir` unless it already holds a converted model; returns
    the absolute `out_dir`.

    `gguf_file` is a path, or a function that writes the GGUF into the scratch folder it is given
    and returns its path (called only when a conversion is needed; the folder is removed after).
    `model_type` (e.g. "llama", "gemma3_text") is what the converted config.json must say; a
    directory that holds a converted model of another type is refused. `fix_config` edits the
    config.json transformers writes. `extra_files` ({name in out_dir: source path}) are copied
    in as well (e.g. the weights' licence). `name` labels the temporary folders and the error
    messages. The files are written to a temporary sibling folder that is renamed into place at
    the end, so an interrupted run never leaves a half-written model behind.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if is_converted(out_dir, model_type):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: not empty and not a converted {name} model; "
                              f"pass an empty or new directory")
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}-", dir=parent)
    scratch = None
    try:
        if callable(gguf_file):
            scratch = tempfile.mkdtemp(prefix=f".{name}-gguf-", dir=parent)
            gguf_file = gguf_file(scratch)
        _convert_into(gguf_file, tmp, fix_config, dict(extra_files or {}))
        if not is_converted(tmp, model_type):
            with open(os.path.join(tmp, "config.json")) as fh:
                got = json.load(fh).get("model_type")
            raise ValueError(f"{gguf_file}: converted to model_type={got!r}, expected "
                             f"{model_type!r}")
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return out_dir


def cli(description: str, convert: Callable[[str], str], check: Callable[[str], bool],
        argv=None) -> None:
    """`python -m migjax.models.<model> --out DIR`: converts into DIR (or says it already is)."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--out", required=True, help="directory to write the model into")
    args = parser.parse_args(argv)
    done = check(os.path.abspath(args.out))
    out = convert(args.out)
    print(f"{out}: {'already converted' if done else 'converted'}")
