"""The embedded default: multi-step arithmetic, a ~0.8M-parameter transformer trained from scratch
by a supervised warm start (1000 steps of 16), then 40 RL steps with MIG. CPU only, no downloads.

    python -m migjax.main --config=arith_tiny --workdir=runs/arith_tiny

The warm start imitates a careless teacher: in 70% of its demonstrations for questions with an
irrelevant fact, the teacher adds that fact's number after the chain (one extra step, a wrong
answer; `warmstart.distracted_prob`, `arith.distracted_solution`). The policy copies the habit,
and RL, paid for right answers and for steps that raise the answer's likelihood, has to drop it.
With `--config.warmstart.distracted_prob=0` the demonstrations are all correct and the weak
start is only under-trained; from such a start 40 RL steps did not raise greedy pass@1 beyond
noise (README, Results).

Expected (2-core CPU, about 12 minutes, 6 of them the warm start): greedy test pass@1 0.188 ->
0.234, pass@4 0.297 -> 0.375, OOD pass@1 0.023 -> 0.055 (128 problems per set); the greedy
policy's extra distractor step falls from 83% to 4% of the questions with a distractor. From
the same start a control with permuted rewards does not gain (README, Results). A second run in
the same workdir reuses the cached warm start.

Variants select baselines/ablations: `--config=arith_tiny:grpo_matched` (see configs/base.py).
"""

from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config


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
    c.warmstart.distracted_prob = 0.7  # a careless teacher: RL has a habit to remove
    c.warmstart.max_len = 128  # every training demonstration fits (the longest is 127 tokens)
    c.warmstart.group_by_length = 8  # batches padded to their own longest demonstration
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
