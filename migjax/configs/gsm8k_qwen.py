"""GSM8K with a Qwen2.5 instruct model (MIG by default; variants in configs/base.py).

    python -m migjax.main --config=gsm8k_qwen --workdir=runs/gsm8k_qwen \
        --config.model.path=/path/to/Qwen2.5-1.5B-Instruct

On one H100 (bfloat16) expect roughly 1-2 min per step at the defaults below; the paper reports
GSM8K pass@1 gains over GRPO for this setting (METHOD.md section 9). Not run here: no GPU and no
Qwen weights on the development machines.
"""

from migjax.configs import data_path
from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config
from migjax.data.templates import DEFAULT_TEMPLATE


def get_config(variant: str = "mig"):
    c = base_config()
    c.model.path = ""  # required: a Hugging Face Qwen2/2.5/3 directory
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.task.kind = "gsm8k"
    c.task.train_path = data_path("gsm8k/train.jsonl")
    c.task.eval = {"gsm8k_test": "gsm8k:" + data_path("gsm8k/test.jsonl"),
                   "svamp": "svamp:" + data_path("svamp/SVAMP.json")}
    c.task.eval_limit = 256
    c.task.template = DEFAULT_TEMPLATE
    c.task.max_prompt_len = 384
    c.task.max_answer_len = 16
    c.sampler.max_new_tokens = 512
    c.rl.steps = 300
    c.rl.batch_prompts = 32
    c.rl.group_size = 8
    c.rl.minibatches = 4
    c.optim.lr = 1e-6
    c.mig.max_steps = 12
    c.eval.every = 50
    c.checkpoint.every = 25
    return apply_variant(c, variant)

