"""The packaged configs: `base.py` (every default) and the recipes, selectable by name.

`--config=arith_tiny[:variant]` names a packaged recipe; `--config=path/to/file.py[:variant]`
loads any config file (a user's own can `from migjax.configs.base import get_config,
apply_variant`). Recipes locate their data files under `MIGJAX_DATA` (environment variable),
by default `shared/data` beside the repository that holds this package.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
RECIPES = ("arith_tiny", "gemma3_gsm8k", "gsm8k_qwen", "math_qwen", "qwen25vl_clevr",
           "scenes_tiny", "smollm2_gsm8k")


def data_root() -> str:
    """Where recipes find their data sets: $MIGJAX_DATA, else ../shared/data from the repository."""
    return os.path.abspath(os.environ.get("MIGJAX_DATA")
                           or os.path.join(REPO, os.pardir, "shared", "data"))


def data_path(relative: str) -> str:
    """A recipe's data file, absolute: `data_path("gsm8k/train.jsonl")`."""
    return os.path.join(data_root(), relative)


def resolve(spec: str) -> str:
    """`--config` value -> a config file path: a packaged recipe's name (`arith_tiny`,
    `arith_tiny:grpo_matched`, `base`) becomes its file here; anything else is a path, unchanged."""
    name, sep, variant = spec.partition(":")
    if name in (*RECIPES, "base") and not os.path.exists(name):
        return os.path.join(HERE, f"{name}.py") + sep + variant
    return spec


def resolve_argv(argv: list[str]) -> list[str]:
    """argv with `--config=NAME[:variant]` (or `--config NAME`) resolved by `resolve`."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg.startswith("--config="):
            out[i] = "--config=" + resolve(arg[len("--config="):])
        elif arg == "--config" and i + 1 < len(out):
            out[i + 1] = resolve(out[i + 1])
    return out
