"""Every default of a migjax run, with what it means. Recipes import `get_config` and override.

Variants (`--config=RECIPE:VARIANT`, e.g. `arith_tiny:grpo_matched`) select the baselines and
ablations of METHOD.md section 7 by config alone; see `VARIANTS`.
"""

import ml_collections as mlc

# Overrides that turn the default MIG recipe into a baseline or an ablation (docs/METHOD.md,
# "Variants", maps each to the switches it sets; tests/test_variants.py checks what each does to
# the update).
_NO_PROCESS_NO_SFT = {"loss.w_process": 0.0, "loss.w_sft": 0.0}
VARIANTS = {
    "mig": {},
    # Baselines. grpo_matched is the default recipe without the process stream and the SFT term
    # (everything else identical, so a comparison isolates MIG); grpo_canonical is GRPO as
    # DeepSeekMath, TRL and verl write it: per-sequence token means, unbiased group std (add
    # --config.loss.kl_coef=0.04 for DeepSeekMath's KL term).
    "grpo_matched": dict(_NO_PROCESS_NO_SFT),
    "grpo_canonical": {**_NO_PROCESS_NO_SFT, "loss.aggregation": "seq_mean_token_mean",
                       "adv.unbiased_std": True},
    "dr_grpo": {**_NO_PROCESS_NO_SFT, "adv.estimator": "dr_grpo",
                "loss.aggregation": "seq_mean_token_sum_norm"},
    "dapo": {**_NO_PROCESS_NO_SFT, "loss.eps_high": 0.28},
    "end_of_cot": {"mig.reward": "end_of_cot"},
    # IGPO-style credit (arXiv 2510.14967): signed gains in probability space, no watermark,
    # reward-to-go on each step's tokens, normalised over the group's steps; the rest as MIG.
    "igpo": {"mig.likelihood_space": "prob", "mig.watermark": False,
             "mig.advantage_mode": "stepwise", "mig.reward_to_go": True},
    # Ablations of MIG, one switch each (h0_zero needs probability space: see prob_space).
    "no_watermark": {"mig.watermark": False},
    "coupled": {"mig.decoupled": False},
    "no_sft": {"loss.w_sft": 0.0},
    "stepwise": {"mig.advantage_mode": "stepwise"},
    "stepwise_rtg": {"mig.advantage_mode": "stepwise", "mig.reward_to_go": True},
    "prob_space": {"mig.likelihood_space": "prob"},
    "h0_zero": {"mig.h0": "zero", "mig.likelihood_space": "prob"},
    "sft_mig_gate": {"sft.gates": ("correct", "mig_positive")},
    "reference_scorer": {"mig.scorer": "reference"},
}
# Names that no longer select a variant, and why.
RETIRED_VARIANTS = {
    "grpo": "'grpo' was ambiguous; use grpo_matched (the MIG recipe without process stream and "
            "SFT, token-mean loss) or grpo_canonical (DeepSeekMath/TRL: per-sequence token means, "
            "unbiased std)",
}


def get_config() -> mlc.ConfigDict:
    c = mlc.ConfigDict()
    c.seed = 0  # one seed; every random stream is fold_in(key(seed), stream, step)
    c.mode = "rl"  # "rl" (MIG / GRPO), "sft" (cross-entropy on demonstrations) or "eval" (the
    # evaluation sets on model.path, no training: a model's numbers before any cold start)

    c.model = mlc.ConfigDict()
    c.model.path = ""  # Hugging Face model directory (config.json, *.safetensors, tokenizer)
    c.model.preset = ""  # or random weights in a named shape: tiny, qwen2.5-0.5b, qwen2.5-1.5b
    # warmstart.steps > 0: RL starts from a supervised warm start (cold start) of the model
    # (model.path, or the scratch shape), cached in WORKDIR/sft_model; False: RL from the model
    c.model.init_from_sft = True
    c.model.dtype = "float32"  # parameter and compute dtype; "bfloat16" on GPU/TPU
    c.model.remat = False  # rematerialise layers in the backward pass (saves memory)
    c.model.remat_policy = "nothing"  # what such a layer keeps: nothing, or "dots" (projections)
    # causal attention (training, scoring, prefill, MIG's completion pass): xla (einsum over the
    # mask) | cudnn (jax.nn.dot_product_attention's cuDNN kernel: CUDA GPU, bfloat16/float16) |
    # auto (cudnn where it applies, else xla); MIG's probe blocks and decoding always use xla
    c.model.attn_impl = "xla"
    # shape of a model trained from scratch (used when path and preset are empty)
    c.model.scratch = mlc.ConfigDict(dict(hidden_size=128, intermediate_size=384, num_layers=4,
                                          num_heads=4, num_kv_heads=2, head_dim=32))
    # image tasks: the Qwen2.5-VL vision tower of a model trained from scratch (its output goes
    # to the language model's width; the language model gets M-RoPE)
    c.model.scratch_vision = mlc.ConfigDict(dict(
        depth=2, hidden_size=64, intermediate_size=128, num_heads=4, patch_size=8,
        spatial_merge_size=2, temporal_patch_size=2, window_size=32, fullatt_block_indexes=(1,)))
    c.tokenizer_path = ""  # defaults to model.path; the embedded task builds its own

    c.task = mlc.ConfigDict()
    # text: arith | gsm8k | math | svamp | asdiv | mawps | jsonl; with images (a Qwen2.5-VL
    # model): scenes (embedded) | clevr | super_clevr | counting_jsonl
    c.task.kind = "arith"
    c.task.train_path = ""  # data file for real datasets (not copied into the project)
    c.task.train_limit = 0  # 0 = all records
    c.task.exclude_path = ""  # e.g. MATH500, whose problems must not be trained on
    # name -> "kind:path" of held-out sets (arith: test, ood); add one on the command line
    # with --config.task.eval.NAME=kind:path
    c.task.eval = mlc.ConfigDict()
    c.task.eval_limit = 64  # examples per evaluation set
    # field names of task.kind="jsonl" files (and of "jsonl:path" evaluation sets): the answer
    # is a number, a string, or a worked solution ending in "#### x", \boxed{x} or <answer>;
    # solution (optional): a worked solution read when the answer field is missing or empty;
    # answer_variants (optional): a list of equivalent reference strings; id (optional)
    c.task.jsonl = mlc.ConfigDict(dict(question="question", answer="answer", solution="",
                                       answer_variants="", id=""))
    c.task.template = "{question}"  # prompt text around the question
    c.task.use_chat_template = True  # wrap in the tokenizer's chat template when it has one
    c.task.system_prompt = ""
    c.task.completion_prefix = ""  # text the completion is forced to start with
    c.task.max_prompt_len = 64
    c.task.max_answer_len = 8
    c.task.max_variants = 2  # equivalent reference strings kept per example
    c.task.overlong = "skip"  # prompts over max_prompt_len: skip (counted) or truncate
    c.task.strict = False  # stop at the first malformed record instead of skipping it
    # the embedded task: `train` shapes the training and in-distribution test problems, `ood`
    # the out-of-distribution set (longer chains, larger values, more distractors)
    # image tasks: every image is resized to height x width (multiples of the tower's
    # patch_size * spatial_merge_size), so all prompts hold the same number of image tokens
    c.task.image = mlc.ConfigDict(dict(height=96, width=96))
    # the embedded scene task (migjax/data/scenes.py): CoGenT-style splits train/test
    # (condition A) and ood (condition B); objects per scene (min, max)
    c.task.scenes = mlc.ConfigDict(dict(train_size=2000, objects=(3, 6), ood_objects=(7, 9)))
    c.task.arith = mlc.ConfigDict(dict(
        train_size=100000,
        train=dict(min_steps=2, max_steps=4, max_operand=9, max_value=99, num_distractors=1,
                   min_distractors=0),
        ood=dict(min_steps=5, max_steps=6, max_operand=9, max_value=999, num_distractors=2,
                 min_distractors=2)))

    c.sampler = mlc.ConfigDict()
    c.sampler.max_new_tokens = 96
    c.sampler.temperature = 1.0
    c.sampler.top_k = 0  # 0 = off
    c.sampler.top_p = 1.0  # 1.0 = off
    c.sampler.stop_strings = ("</answer>",)  # besides the tokenizer's eos

    c.rl = mlc.ConfigDict()
    c.rl.steps = 100  # rollout batches
    c.rl.batch_prompts = 8  # B prompts per rollout batch (global, all processes)
    c.rl.group_size = 8  # G samples per prompt
    c.rl.minibatches = 1  # optimizer steps per epoch over the rollout batch
    c.rl.epochs = 1  # passes over each rollout batch
    c.rl.score_chunk = 256  # sequence chunk of the teacher-forced log-prob function
    # True: completions that hit sampler.max_new_tokens without a stop get zero loss weight in
    # every stream (TRL's mask_truncated_completions); they still count in group statistics
    c.rl.mask_truncated = False

    c.optim = mlc.ConfigDict()
    c.optim.lr = 1e-6
    c.optim.warmup_steps = 0
    c.optim.weight_decay = 0.0
    c.optim.b1 = 0.9
    c.optim.b2 = 0.999
    c.optim.grad_clip = 1.0
    c.optim.max_consecutive_skips = 5  # non-finite updates in a row before the run stops

    c.mig = mlc.ConfigDict()
    c.mig.step_delimiter = "step"  # step: "Step <n>:" lines | newline | blank_line
    c.mig.max_steps = 8  # K; later steps merge into the last one
    c.mig.probe = "\n</think>\n<answer>"  # closes the CoT and opens the answer
    c.mig.count_closing_tokens = False  # also count the probe's tokens in l_k
    c.mig.scorer = "policy"  # policy | reference (frozen initial model)
    c.mig.variant_reduce = "max"  # max | logsumexp | mean over reference variants
    c.mig.likelihood_space = "log"  # log (l_k as defined) | prob (exp(l_k), for h0=zero)
    c.mig.h0 = "l0"  # l0 | zero
    c.mig.watermark = True  # False: g_k = l_k - l_{k-1}
    c.mig.reward = "gain"  # gain (sum of watermark gains) | end_of_cot (l_K only)
    c.mig.advantage_mode = "trajectory"  # trajectory | stepwise
    c.mig.reward_to_go = False  # stepwise credit summed over later steps
    c.mig.decoupled = True  # process advantages on CoT tokens only, outcome on all
    c.mig.fast = True  # completion once + probe blocks (False: naive reference, for checks)

    c.reward = mlc.ConfigDict()
    c.reward.w_format = 0.1  # r_out = r_correct + w_format * r_format
    c.reward.verify_timeout_s = 2.0  # per item
    # user reward functions "package.module:function" with TRL's signature fn(prompts,
    # completions, **columns) -> list[float] (migjax.rewards.custom);
    # r_out += sum_i custom_weights[i] * custom[i]
    c.reward.custom = ()
    c.reward.custom_weights = ()  # one weight per custom function
    c.reward.custom_timeout_s = 10.0  # per call (a failed batch call is retried item by item)

    c.adv = mlc.ConfigDict()
    c.adv.estimator = "grpo"  # grpo | rloo | dr_grpo
    c.adv.std_normalize = True
    c.adv.unbiased_std = False  # True: the group std with n - 1 (TRL, verl); False: with n

    c.loss = mlc.ConfigDict()
    c.loss.w_process = 1.0  # process stream weight (METHOD.md's alpha)
    c.loss.w_outcome = 1.0  # outcome stream weight (METHOD.md's beta; not a KL coefficient)
    c.loss.w_sft = 0.1  # dual-gated SFT weight (METHOD.md's gamma)
    c.loss.eps_low = 0.2  # clip range [1 - eps_low, 1 + eps_high]; 0 clips every move
    c.loss.eps_high = 0.2
    c.loss.aggregation = "token_mean"  # token_mean | seq_mean_token_mean | seq_mean_token_sum_norm
    c.loss.kl_coef = 0.0  # > 0 loads a frozen reference model
    c.loss.kl_estimator = "k3"  # k1 | k2 | k3

    c.sft = mlc.ConfigDict()
    c.sft.gates = ("format", "correct")  # or ("correct", "mig_positive")

    # Supervised warm start (cold start) on demonstrations: the arith task's, or GSM8K's and MATH's
    # worked solutions in the reward's format (migjax/data/demos.py); mode="sft" runs it alone
    c.warmstart = mlc.ConfigDict()
    c.warmstart.steps = 0
    c.warmstart.batch_size = 32
    c.warmstart.lr = 3e-3
    c.warmstart.max_len = 160
    # fraction of demonstrations from a careless teacher that also adds the question's first
    # irrelevant number after the chain (arith.distracted_solution): a habit for RL to remove
    c.warmstart.distracted_prob = 0.0
    # > 0: batches of similar-length demonstrations, sorted within windows of this many batches
    # and padded to their own longest row (faster); 0: the data order, padded to max_len
    c.warmstart.group_by_length = 0
    # scene task: this fraction of the demonstrations describe their scene instead (every object
    # from left to right, scenes.describe_item): supervision that needs the image
    c.warmstart.describe_frac = 0.0
    c.warmstart.checkpoint_every = 200  # steps; a restarted warm start resumes (0 = never)

    c.eval = mlc.ConfigDict()
    c.eval.every = 25  # steps; 0 = only before and after training
    c.eval.pass_k = 4  # sampled pass@k (temperature sampler.temperature); 0 = off
    c.eval.batch_size = 64  # prompts per evaluation batch
    c.eval.max_new_tokens = 0  # 0 = sampler.max_new_tokens (OOD sets may need more)

    c.checkpoint = mlc.ConfigDict()
    c.checkpoint.every = 25
    c.checkpoint.keep = 3
    c.checkpoint.async_save = True
    c.checkpoint.export_hf = False  # write the final policy as a Hugging Face directory

    c.log = mlc.ConfigDict()
    c.log.every = 1
    c.log.samples_every = 25  # text table and HTML view of sampled completions
    c.log.tensorboard = True
    c.log.progress = True
    c.log.wandb = False  # also log to Weights & Biases (needs `pip install wandb` and a login)
    c.log.wandb_project = "migjax"  # the W&B project; the run is named after its workdir

    c.mesh = mlc.ConfigDict()
    c.mesh.data = -1  # -1: all devices not used by the other axes
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.distributed = False  # call jax.distributed.initialize (also when JAX_COORDINATOR_ADDRESS is set)

    c.debug = mlc.ConfigDict()
    c.debug.nan_at_step = -1  # NaN in the loss at this optimizer update (-2: every update; -1: off)
    return c


def apply_variant(c: mlc.ConfigDict, variant: str) -> mlc.ConfigDict:
    if variant in RETIRED_VARIANTS:
        raise ValueError(f"config variant {variant!r}: {RETIRED_VARIANTS[variant]}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown config variant {variant!r}; known: {sorted(VARIANTS)}")
    for key, value in VARIANTS[variant].items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return c
