"""MATH with a Qwen2.5 model: train on MATH train+test minus MATH500, evaluate on MATH500.

    python -m migjax.main --config=math_qwen --workdir=runs/math_qwen \
        --config.model.path=/path/to/Qwen2.5-Math-1.5B

Answers are LaTeX, compared by math-verify. Not run here (no GPU, no Qwen weights).
"""

from migjax.configs import data_path
from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config
from migjax.data.templates import DEFAULT_TEMPLATE


def get_config(variant: str = "mig"):
    c = base_config()
    c.model.path = ""  # required
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.task.kind = "math"
    c.task.train_path = data_path("math/math_train12k_derived.jsonl")
    c.task.exclude_path = data_path("math/math500_test.jsonl")  # never train on MATH500
    c.task.eval = {"math500": "math:" + data_path("math/math500_test.jsonl")}
    c.task.eval_limit = 500
    c.task.template = DEFAULT_TEMPLATE
    c.task.max_prompt_len = 512
    c.task.max_answer_len = 32
    c.sampler.max_new_tokens = 1024
    c.rl.steps = 500
    c.rl.batch_prompts = 32
    c.rl.group_size = 8
    c.rl.minibatches = 4
    c.optim.lr = 1e-6
    c.mig.max_steps = 16
    c.eval.every = 50
    c.checkpoint.every = 25
    return apply_variant(c, variant)
