"""The embedded multimodal default: CLEVR-style questions about rendered scenes (migjax/data/
scenes.py), a small Qwen2.5-VL-architecture model (a 2-block vision tower feeding a 4-layer
M-RoPE language model) trained from scratch by a supervised warm start on the scenes' worked
solutions, then RL with MIG with the tower frozen. CPU only, no downloads.

    python -m migjax.main --config=scenes_tiny --workdir=runs/scenes_tiny

Evaluation sets: `test` (CoGenT condition A, 3-6 objects, like training) and `ood` (condition
B: cubes and cylinders take each other's colours, 7-9 objects). Expected result and time on
this machine: README, Results (multimodal).
"""

from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config


def get_config(variant: str = "mig"):
    c = base_config()
    c.task.kind = "scenes"
    c.task.template = "Question: {question}\nAnswer: "
    c.task.use_chat_template = False
    c.task.image.height = 96
    c.task.image.width = 96  # 12 x 12 patches of 8 px: 36 image tokens after the 2x2 merge
    c.task.scenes.train_size = 2000
    c.task.max_prompt_len = 80
    c.task.max_answer_len = 4
    c.task.max_variants = 1
    c.sampler.max_new_tokens = 96
    c.eval.max_new_tokens = 128  # OOD scenes have more objects to list
    c.warmstart.steps = 800
    c.warmstart.describe_frac = 0.5  # half the demonstrations name every object in the image
    c.warmstart.batch_size = 16
    c.warmstart.lr = 3e-3
    c.warmstart.max_len = 256  # the longest scene descriptions
    c.warmstart.group_by_length = 8
    c.rl.steps = 30
    c.rl.batch_prompts = 8
    c.rl.group_size = 8
    c.optim.lr = 5e-5
    c.optim.warmup_steps = 5
    c.mig.max_steps = 4
    c.eval.every = 0
    c.eval.pass_k = 4
    c.task.eval_limit = 128
    c.checkpoint.every = 10
    c.log.samples_every = 10
    return apply_variant(c, variant)
