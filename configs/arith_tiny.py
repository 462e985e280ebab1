"""The embedded default: multi-step arithmetic, a ~0.8M-parameter transformer trained from scratch
by a supervised warm start (1000 steps of 16), then 40 RL steps with MIG. CPU only, no downloads.

    python -m migjax.main --config=configs/arith_tiny.py --workdir=runs/arith_tiny

Expected (2-core CPU, about 13 minutes, 5.5 of them the warm start): greedy pass@1 of about 0.3
in distribution and 0.03 out of distribution after the warm start. RL at this budget does not
raise greedy pass@1 beyond noise: the measured run went 0.312 -> 0.289 (test pass@1), 0.531 ->
0.516 (pass@4), 0.031 -> 0.023 (OOD pass@1); see README, Results, for the runs behind this and
what they showed. A second run in the same workdir reuses the cached warm start.

Variants select baselines/ablations: `--config=configs/arith_tiny.py:grpo` (see configs/base.py).
"""

from configs.base import apply_variant
from configs.base import get_config as base_config


def get_config(variant: str = "mig"):
    c = base_config()
    c.task.kind = "arith"
    c.task.template = "Question: {question}\nAnswer: "
    c.task.use_chat_template = False
    c.task.max_prompt_len = 64
    c.task.max_answer_len = 6
    c.task.max_variants = 1
    c.task.arith.train_size = 20000
    c.task.arith.train.max_value = 20
    c.task.arith.ood.max_value = 40
    c.sampler.max_new_tokens = 72
    c.eval.max_new_tokens = 112  # OOD chains are longer
    c.warmstart.steps = 1000
    c.warmstart.batch_size = 16  # more, smaller steps learn the chains faster per second
    c.warmstart.lr = 3e-3
    c.warmstart.max_len = 112  # every training demonstration fits (the longest is 111 tokens)
    c.rl.steps = 40
    c.rl.batch_prompts = 16
    c.rl.group_size = 8
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 5
    c.mig.max_steps = 6
    c.eval.every = 0
    c.eval.pass_k = 4
    c.task.eval_limit = 128
    c.checkpoint.every = 10
    c.log.samples_every = 20
    return apply_variant(c, variant)
