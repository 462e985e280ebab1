"""Cross-field checks of a run config: each error names the fields involved."""

from __future__ import annotations

from migjax.models.config import REMAT_POLICIES

CHOICES = {
    "mode": ("rl", "sft", "eval"),
    "task.kind": ("arith", "gsm8k", "math", "svamp", "asdiv", "mawps", "jsonl", "scenes",
                  "clevr", "super_clevr", "counting_jsonl"),
    "task.overlong": ("skip", "truncate"),
    "mig.step_delimiter": ("step", "newline", "blank_line"),
    "mig.scorer": ("policy", "reference"),
    "mig.variant_reduce": ("max", "logsumexp", "mean"),
    "mig.likelihood_space": ("log", "prob"),
    "mig.h0": ("l0", "zero"),
    "mig.reward": ("gain", "end_of_cot"),
    "mig.advantage_mode": ("trajectory", "stepwise"),
    "adv.estimator": ("grpo", "rloo", "dr_grpo"),
    "loss.aggregation": ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"),
    "loss.kl_estimator": ("k1", "k2", "k3"),
    "model.dtype": ("float32", "bfloat16", "float16"),
    "model.attn_impl": ("xla", "cudnn", "auto"),
    "model.remat_policy": REMAT_POLICIES,
}


EMBEDDED_KINDS = ("arith", "scenes")  # generated here: no data file, a tokenizer of their own
VISUAL_KINDS = ("scenes", "clevr", "super_clevr", "counting_jsonl")  # prompts with an image
DEMO_KINDS = ("arith", "gsm8k", "math", "scenes")  # records with demonstrations (warm start)


# Settings renamed since earlier versions: old dotted key -> what to write instead.
RENAMED = {
    "loss.beta": "loss.beta was renamed loss.w_outcome (the outcome-loss weight); the KL "
                 "coefficient is loss.kl_coef",
    "loss.alpha": "loss.alpha was renamed loss.w_process (the process-loss weight)",
    "loss.gamma": "loss.gamma was renamed loss.w_sft (the dual-gated SFT weight)",
}


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c


def validate(c, device_count: int | None = None) -> None:
    """Raises ValueError on the first inconsistent setting."""
    for old, message in RENAMED.items():  # a config file that still sets an old name
        group, leaf = old.split(".")
        if leaf in c[group]:
            raise ValueError(message)
    for field, allowed in CHOICES.items():
        if _get(c, field) not in allowed:
            raise ValueError(f"{field}={_get(c, field)!r}; expected one of {allowed}")
    for field in ("rl.steps", "rl.batch_prompts", "rl.group_size", "rl.minibatches", "rl.epochs",
                  "mig.max_steps", "sampler.max_new_tokens", "task.max_prompt_len",
                  "task.max_answer_len", "task.max_variants", "checkpoint.every",
                  "checkpoint.keep", "log.every", "optim.max_consecutive_skips", "mesh.fsdp",
                  "mesh.tensor"):
        if _get(c, field) < 1:
            raise ValueError(f"{field}={_get(c, field)} must be >= 1")
    for field in ("task.eval_limit", "task.train_limit", "eval.every", "log.samples_every"):
        if _get(c, field) < 0:
            raise ValueError(f"{field}={_get(c, field)} must be >= 0 (0: no limit / off)")
    if c.mesh.data != -1 and c.mesh.data < 1:
        raise ValueError(f"mesh.data={c.mesh.data} must be >= 1, or -1 for every device the "
                         "other axes leave")
    if c.eval.batch_size < 1 or c.eval.pass_k < 0:
        raise ValueError(f"eval.batch_size={c.eval.batch_size} must be >= 1 and "
                         f"eval.pass_k={c.eval.pass_k} >= 0")
    n = c.rl.batch_prompts * c.rl.group_size
    if n % c.rl.minibatches:
        raise ValueError(f"rl.batch_prompts * rl.group_size = {n} is not divisible by "
                         f"rl.minibatches={c.rl.minibatches}")
    if c.mig.h0 == "zero" and c.mig.likelihood_space == "log" and c.loss.w_process:
        raise ValueError("mig.h0='zero' with mig.likelihood_space='log' gives no step any credit "
                         "(log-likelihoods are <= 0); use mig.likelihood_space='prob'")
    if c.mig.reward == "end_of_cot" and c.mig.advantage_mode != "trajectory":
        raise ValueError("mig.reward='end_of_cot' is a per-trajectory reward; it needs "
                         "mig.advantage_mode='trajectory'")
    if c.loss.eps_low < 0 or c.loss.eps_high < 0 or c.loss.eps_low >= 1:
        raise ValueError(f"loss.eps_low={c.loss.eps_low}, loss.eps_high={c.loss.eps_high}: need "
                         "0 <= eps_low < 1 and eps_high >= 0")
    warm = c.mode == "sft" or (c.model.init_from_sft and c.warmstart.steps > 0)
    if c.mode == "sft" and c.warmstart.steps < 1:
        raise ValueError("mode='sft' runs the warm start alone and needs warmstart.steps >= 1")
    if warm and c.task.kind not in DEMO_KINDS:
        raise ValueError(f"the warm start (warmstart.steps={c.warmstart.steps}) trains on "
                         f"demonstrations, which task.kind={c.task.kind!r} has none of; use "
                         f"one of {DEMO_KINDS}, or set warmstart.steps=0")
    if c.warmstart.checkpoint_every < 0:
        raise ValueError(f"warmstart.checkpoint_every={c.warmstart.checkpoint_every} must be "
                         ">= 0")
    if not 0.0 <= c.warmstart.distracted_prob <= 1.0 or c.warmstart.group_by_length < 0:
        raise ValueError(f"warmstart.distracted_prob={c.warmstart.distracted_prob} must be in "
                         f"[0, 1] and warmstart.group_by_length={c.warmstart.group_by_length} "
                         ">= 0")
    if c.rl.group_size < 2 and c.mode == "rl":
        raise ValueError(f"rl.group_size={c.rl.group_size}: group-relative advantages need >= 2")
    if c.task.kind not in EMBEDDED_KINDS and not c.task.train_path:
        raise ValueError(f"task.train_path is required for task.kind={c.task.kind!r}")
    if c.task.kind not in EMBEDDED_KINDS and not (c.model.path or c.model.preset):
        raise ValueError(f"task.kind={c.task.kind!r} needs model.path (or model.preset)")
    if c.task.kind in VISUAL_KINDS and c.model.preset:
        raise ValueError(f"task.kind={c.task.kind!r} needs a Qwen2.5-VL model: model.path, or "
                         "the scratch shape (model.preset must be empty)")
    if len(c.reward.custom) != len(c.reward.custom_weights):
        raise ValueError(f"reward.custom has {len(c.reward.custom)} functions but "
                         f"reward.custom_weights has {len(c.reward.custom_weights)} weights")
    if c.model.attn_impl == "cudnn" and c.model.dtype == "float32":
        raise ValueError("model.attn_impl='cudnn' needs model.dtype bfloat16 or float16 (cuDNN's "
                         "fused attention has no float32 kernel); use model.attn_impl='auto'")
    if c.model.preset and c.model.path:
        raise ValueError("set only one of model.path and model.preset")
    if device_count is not None:
        shards = device_count // (c.mesh.fsdp * c.mesh.tensor) if c.mesh.data < 1 else c.mesh.data
        shards *= c.mesh.fsdp
        for field in ("rl.batch_prompts", "eval.batch_size"):
            if shards and _get(c, field) % shards:
                raise ValueError(f"{field}={_get(c, field)} is not divisible by the mesh's "
                                 f"batch shards (mesh.data x mesh.fsdp = {shards})")
