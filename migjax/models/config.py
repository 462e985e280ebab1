"""Model hyper-parameters: the one record that describes a decoder, read from and written to
Hugging Face `config.json` layouts (transformers 4 and 5)."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

ARCHITECTURES = {
    # model_type: (HF architecture class, q/k/v bias, q/k RMSNorm)
    "qwen2": ("Qwen2ForCausalLM", True, False),
    "qwen3": ("Qwen3ForCausalLM", False, True),
    "llama": ("LlamaForCausalLM", False, False),
    "gemma3_text": ("Gemma3ForCausalLM", False, True),
    # the language model of Qwen2.5-VL (`text_config`); the whole model loads through
    # `migjax.models.qwen25vl`
    "qwen2_5_vl_text": ("Qwen2_5_VLForConditionalGeneration", True, False),
}
GEMMA = "gemma3_text"
LAYER_TYPES = ("full_attention", "sliding_attention")
# How causal attention is computed (`Transformer.hidden`): xla, the einsum over the boolean mask;
# cudnn, jax.nn.dot_product_attention's cuDNN fused kernel (CUDA GPU, bfloat16/float16); auto,
# cudnn where it applies and xla elsewhere.
ATTN_IMPLS = ("xla", "cudnn", "auto")
# What a rematerialised layer (`remat`) keeps for the backward pass: nothing (recompute the whole
# layer: least memory), or the outputs of its matmuls without a batch dimension (the projections;
# attention scores and element-wise work are recomputed: more memory, less recomputation).
REMAT_POLICIES = ("nothing", "dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only transformer (Qwen2/2.5, Qwen3, Llama 3, SmolLM2)."""

    model_type: str = "qwen2"
    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items of the HF dict
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = True
    qk_norm: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int | None = None
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # compute dtype of activations (scores and losses are float32)
    remat: bool = False  # rematerialise each layer in the backward pass
    remat_policy: str = "nothing"  # what a rematerialised layer keeps: one of REMAT_POLICIES
    attn_impl: str = "xla"  # one of ATTN_IMPLS; how this machine computes, not in config.json
    # Gemma 3 (model_type gemma3_text): local layers attend to the last `sliding_window`
    # positions and use rope base `rope_local_theta`; global layers use `rope_theta`
    layer_types: tuple[str, ...] | None = None  # per layer: full_attention | sliding_attention
    sliding_window: int | None = None
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float | None = None  # attention scale q.k / sqrt(this); None: head_dim
    # Qwen2.5-VL's M-RoPE: the head_dim/2 rope frequencies split into sections that take their
    # angles from the (time, height, width) position rows in turn (positions [3, N, T]; with
    # [N, T] positions, or three equal rows, it is the ordinary rope)
    mrope_section: tuple[int, ...] | None = None

    def __post_init__(self):
        if self.model_type not in ARCHITECTURES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; migjax supports {sorted(ARCHITECTURES)}"
            )
        if self.attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl={self.attn_impl!r}; expected one of {ATTN_IMPLS}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"remat_policy={self.remat_policy!r}; expected one of "
                             f"{REMAT_POLICIES}")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers or not set(self.layer_types) <= set(
                    LAYER_TYPES):
                raise ValueError(f"layer_types {self.layer_types} must give one of {LAYER_TYPES} "
                                 f"for each of the {self.num_layers} layers")
            if "sliding_attention" in self.layer_types and not self.sliding_window:
                raise ValueError("sliding_attention layers need a sliding_window >= 1")
        if self.mrope_section is not None and sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {list(self.mrope_section)} must sum to head_dim / 2 "
                             f"= {self.head_dim // 2}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)

    @property
    def rope_scaling_dict(self) -> dict | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def is_gemma(self) -> bool:
        """Gemma's conventions: embeddings scaled by sqrt(D), norms scale by (1 + w), GeGLU,
        norms after attention and after the MLP as well as before them."""
        return self.model_type == GEMMA

    @property
    def sliding_layers(self) -> tuple[bool, ...]:
        return tuple(t == "sliding_attention" for t in self.layer_types or ())

    @property
    def attn_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def num_params(self, include_embedding: bool = True) -> int:
        d, f, h, kv, hd, v = (self.hidden_size, self.intermediate_size, self.num_heads,
                              self.num_kv_heads, self.head_dim, self.vocab_size)
        attn = d * hd * (h + 2 * kv) + h * hd * d
        if self.attention_bias:
            attn += hd * (h + 2 * kv)
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * d * f + (4 if self.is_gemma else 2) * d
        n = self.num_layers * layer + d
        if include_embedding:
            n += v * d * (1 if self.tie_word_embeddings else 2)
        elif not self.tie_word_embeddings:
            n += v * d  # the LM head costs matmul FLOPs even when the embedding does not
        return n

    # ---------------------------------------------------------------- Hugging Face I/O
    @classmethod
    def from_hf(cls, hf: dict, **overrides) -> ModelConfig:
        """Builds a config from a parsed `config.json` (transformers 4 or 5 layout)."""
        model_type = hf.get("model_type")
        if model_type == "qwen2_5_vl":
            raise ValueError("model_type='qwen2_5_vl' is a vision-language model: load it with "
                             "migjax.models.load_pretrained (migjax.models.qwen25vl)")
        if model_type not in ARCHITECTURES:
            archs = hf.get("architectures")
            raise ValueError(
                f"unsupported architecture: model_type={model_type!r} architectures={archs!r}; "
                f"migjax supports model_type in {sorted(ARCHITECTURES)}"
            )
        _, bias, qk_norm = ARCHITECTURES[model_type]
        if model_type == "qwen2_5_vl_text":
            hf, mrope = _split_mrope(hf)
            overrides = {"mrope_section": mrope, **overrides}
        # transformers 5 moves rope_theta / rope_scaling into `rope_parameters` (for Gemma 3, one
        # dict per layer type).
        rope = dict(hf.get("rope_parameters") or {})
        gemma = model_type == GEMMA
        local = {}
        if gemma:
            local = dict(rope.pop("sliding_attention", None) or {})
            rope = dict(rope.pop("full_attention", None) or rope)
            if local.get("rope_type", "default") != "default":
                raise ValueError(f"unsupported rope type {local['rope_type']!r} for the "
                                 "sliding_attention layers (supported: default)")
            for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
                if hf.get(cap) is not None:
                    raise ValueError(f"{cap}={hf[cap]} is not supported (Gemma 3 has none)")
            if hf.get("use_bidirectional_attention"):
                raise ValueError("use_bidirectional_attention=True is not supported")
        default_theta = 1000000.0 if gemma else 10000.0
        theta = rope.pop("rope_theta", None) or hf.get("rope_theta", default_theta)
        scaling = hf.get("rope_scaling") or (rope if rope else None)
        if scaling:
            scaling = dict(scaling)
            scaling.pop("rope_theta", None)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
            if kind == "default":
                scaling = None
            elif kind not in ("llama3", "linear"):
                raise ValueError(f"unsupported rope_scaling type {kind!r} "
                                 "(supported: llama3, linear)")
            else:
                scaling["rope_type"] = kind
                scaling.pop("type", None)
        heads = hf["num_attention_heads"]
        if gemma:
            n_layers = hf["num_hidden_layers"]
            types = hf.get("layer_types") or [
                "sliding_attention" if (i + 1) % hf.get("sliding_window_pattern", 6) else
                "full_attention" for i in range(n_layers)]
            act = hf.get("hidden_activation") or hf.get("hidden_act")
            if act not in (None, "gelu_pytorch_tanh"):
                raise ValueError(f"hidden_activation={act!r} is not supported (gelu_pytorch_tanh)")
            extra = dict(layer_types=tuple(types), sliding_window=hf.get("sliding_window", 4096),
                         rope_local_theta=float(local.get("rope_theta") or
                                                hf.get("rope_local_base_freq", 10000.0)),
                         query_pre_attn_scalar=float(hf.get("query_pre_attn_scalar", 256)))
        else:
            extra = {}
        kw = dict(
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=float(theta),
            rope_scaling=tuple(sorted(scaling.items())) if scaling else None,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            # transformers' Qwen2/Qwen3/Llama configs default to an untied head, Gemma's to a
            # tied one.
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", gemma)),
            attention_bias=bool(hf.get("attention_bias", bias)),
            qk_norm=qk_norm,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=_as_ids(hf.get("eos_token_id")),
            pad_token_id=hf.get("pad_token_id"),
            **extra,
        )
        kw.update(overrides)
        return cls(**kw)

    @classmethod
    def from_dir(cls, path: str, **overrides) -> ModelConfig:
        f = os.path.join(path, "config.json")
        if not os.path.isfile(f):
            raise FileNotFoundError(f"{f}: missing; a model directory needs a Hugging Face config.json")
        try:
            with open(f) as fh:
                hf = json.load(fh)
        except json.JSONDecodeError as e:
            raise ValueError(f"{f}: not valid JSON ({e})") from e
        try:
            return cls.from_hf(hf, **overrides)
        except KeyError as e:
            raise ValueError(f"{f}: missing field {e.args[0]!r}") from e
        except ValueError as e:
            raise ValueError(f"{f}: {e}") from e

    def to_hf(self) -> dict:
        """The `config.json` transformers needs to load this model (transformers 4 layout,
        which transformers 5 also reads)."""
        arch, _, _ = ARCHITECTURES[self.model_type]
        hf = dict(
            architectures=[arch],
            model_type=self.model_type,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling_dict,
            rms_norm_eps=self.rms_norm_eps,
            tie_word_embeddings=self.tie_word_embeddings,
            max_position_embeddings=self.max_position_embeddings,
            hidden_act="silu",
            torch_dtype=self.param_dtype,
            bos_token_id=self.bos_token_id,
            eos_token_id=list(self.eos_token_id) if isinstance(self.eos_token_id, tuple)
            else self.eos_token_id,
            pad_token_id=self.pad_token_id,
            use_cache=True,
        )
        if self.model_type == "llama":
            hf.update(attention_bias=self.attention_bias, mlp_bias=False)
        if self.model_type in ("qwen2", "qwen3"):
            hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=self.num_layers)
        if self.model_type == "qwen3":
            hf.update(attention_bias=self.attention_bias)
        if self.is_gemma:
            del hf["hidden_act"]
            full = {"rope_type": "default", "rope_theta": self.rope_theta,
                    **(self.rope_scaling_dict or {})}
            hf.update(hidden_activation="gelu_pytorch_tanh", attention_bias=self.attention_bias,
                      layer_types=list(self.layer_types or ["full_attention"] * self.num_layers),
                      sliding_window=self.sliding_window,
                      rope_local_base_freq=self.rope_local_theta,
                      rope_parameters={"full_attention": full, "sliding_attention": {
                          "rope_type": "default", "rope_theta": self.rope_local_theta}},
                      query_pre_attn_scalar=_int_if_whole(self.query_pre_attn_scalar
                                                          or self.head_dim),
                      final_logit_softcapping=None, attn_logit_softcapping=None)
        return hf

    @property
    def eos_ids(self) -> tuple[int, ...]:
        e = self.eos_token_id
        if e is None:
            return ()
        return tuple(e) if isinstance(e, tuple) else (e,)


def _split_mrope(hf: dict) -> tuple[dict, tuple[int, ...] | None]:
    """(hf without mrope_section, the section): Qwen2.5-VL keeps it in rope_parameters
    (transformers 5) or in rope_scaling with type "mrope" (the original layout)."""
    hf, section = dict(hf), None
    for key in ("rope_parameters", "rope_scaling"):
        if hf.get(key):
            d = dict(hf[key])
            section = d.pop("mrope_section", section)
            if d.get("rope_type", d.get("type")) == "mrope":
                d.pop("type", None)
                d["rope_type"] = "default"
            hf[key] = d
    return hf, tuple(int(s) for s in section) if section else None


def _int_if_whole(x):
    return int(x) if float(x).is_integer() else x


def _as_ids(x):
    if isinstance(x, list):
        return tuple(x) if len(x) != 1 else x[0]
    return x


# Shapes of published models, with random weights, for benchmarks and shrunken tests.
PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(model_type="qwen2", vocab_size=512, hidden_size=64, intermediate_size=172,
                        num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16),
    "qwen2.5-0.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=896,
                                intermediate_size=4864, num_layers=24, num_heads=14,
                                num_kv_heads=2, head_dim=64, rope_theta=1000000.0),
    "qwen2.5-1.5b": ModelConfig(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                                intermediate_size=8960, num_layers=28, num_heads=12,
                                num_kv_heads=2, head_dim=128, rope_theta=1000000.0),
}
