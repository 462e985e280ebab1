"""CLEVR-CoGenT with a Qwen2.5-VL instruct model: RL with MIG on condition A's training
questions, evaluated on condition A and on the held-out condition B, plus Super-CLEVR when its
files are given (the paper's multimodal setting, METHOD.md section 9).

    python -m migjax.main --config=qwen25vl_clevr --workdir=runs/qwen25vl_clevr \
        --config.model.path=/path/to/Qwen2.5-VL-3B-Instruct \
        --config.task.train_path=/data/CLEVR_CoGenT_v1.0#trainA \
        --config.task.eval.cogent_valA=clevr:/data/CLEVR_CoGenT_v1.0#valA \
        --config.task.eval.cogent_valB=clevr:/data/CLEVR_CoGenT_v1.0#valB \
        --config.task.eval.superclevr=super_clevr:/data/superCLEVR_questions.json#/data/images

`train_path` is the CLEVR-CoGenT release root (questions/ and images/) with the split after
`#`; Super-CLEVR takes its questions file and, after `#`, its image folder; an R1-V style
counting file is `counting_jsonl:FILE`. Every image is resized to 448 x 448 (16 x 16 merged
patches: 256 image tokens). The instruct model is asked for the step format and the completion
starts with "<think>\n"; there is no warm start. Not run here: no GPU and no Qwen2.5-VL weights
on the development machines; the tower is frozen in RL (migjax/models/multimodal.py).
"""

from migjax.configs.base import apply_variant
from migjax.configs.base import get_config as base_config
from migjax.data.templates import DEFAULT_TEMPLATE


def get_config(variant: str = "mig"):
    c = base_config()
    c.model.path = ""  # required: a Hugging Face Qwen2.5-VL directory
    c.model.dtype = "bfloat16"
    c.model.remat = True
    c.model.init_from_sft = False
    c.task.kind = "clevr"
    c.task.train_path = ""  # required: ROOT#trainA
    c.task.image.height = 448
    c.task.image.width = 448
    c.task.template = DEFAULT_TEMPLATE
    c.task.completion_prefix = "<think>\n"
    c.task.max_prompt_len = 448
    c.task.max_answer_len = 8
    c.task.eval_limit = 256
    c.sampler.max_new_tokens = 384
    c.rl.steps = 300
    c.rl.batch_prompts = 16
    c.rl.group_size = 8
    c.rl.minibatches = 2
    c.optim.lr = 1e-6
    c.mig.max_steps = 8
    c.eval.every = 50
    c.checkpoint.every = 25
    return apply_variant(c, variant)
