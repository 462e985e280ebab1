"""Models: the NNX decoder, its KV cache, teacher-forced scoring and Hugging Face checkpoint I/O
(plus Qwen2.5-VL: the vision tower and the M-RoPE decoder, `Qwen25VL`).

The jitted stages work on a flat dict of parameter arrays (`params`); `split` and `merge` move
between that dict and the NNX module.
"""

from __future__ import annotations

import jax
from flax import nnx

from migjax.models.config import PRESETS, ModelConfig
from migjax.models.transformer import PARAM_AXES, KVCache, Transformer


def init_model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    """A model with random weights (normal(0, 0.02) matrices, unit norms, zero biases)."""
    return Transformer(cfg, rngs=nnx.Rngs(seed))


def split(model: Transformer) -> tuple[nnx.GraphDef, dict[str, jax.Array]]:
    """(graphdef, params): the static structure and a flat {name: array} dict of weights."""
    graphdef, state = nnx.split(model, nnx.Param)
    return graphdef, nnx.to_pure_dict(state)


def merge(graphdef: nnx.GraphDef, params: dict[str, jax.Array]) -> Transformer:
    """The module for `params` (cheap; call it inside jitted functions)."""
    return nnx.merge(graphdef, nnx.State({k: nnx.Param(v) for k, v in params.items()}))


from migjax.models.loading import load_pretrained, save_pretrained  # noqa: E402
from migjax.models.qwen25vl import Qwen25VL, VLConfig  # noqa: E402

__all__ = [
    "PARAM_AXES", "PRESETS", "KVCache", "ModelConfig", "Qwen25VL", "Transformer", "VLConfig",
    "init_model", "load_pretrained", "merge", "save_pretrained", "split",
]
