"""Every config file loads, every variant validates, and bad settings fail with named fields."""

import glob
import importlib
import os
import subprocess
import sys

import pytest

from configs.base import VARIANTS, apply_variant
from migjax.config_checks import validate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                 if not os.path.basename(p).startswith(("_", "base")))


def load(name, variant="mig"):
    return importlib.import_module(f"configs.{name}").get_config(variant)


def test_recipes_exist():
    assert {"arith_tiny", "gsm8k_qwen", "math_qwen", "scenes_tiny", "smollm2_gsm8k"} <= \
        set(RECIPES)


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_recipe_and_variant_validates(name, variant):
    c = load(name, variant)
    if c.task.kind not in ("arith", "scenes") and not c.task.train_path:  # a data root to give
        with pytest.raises(ValueError, match="task.train_path"):
            validate(c, 1)
        c.task.train_path = "/some/data#trainA"
    if c.task.kind not in ("arith", "scenes") and not c.model.path:
        with pytest.raises(ValueError, match="model.path"):
            validate(c, 1)
        c.model.path = "/some/model"
    validate(c, 1)
    assert "{question}" in c.task.template


@pytest.mark.parametrize("name", RECIPES)
def test_docstring_holds_the_command(name):
    doc = importlib.import_module(f"migjax.configs.{name}").__doc__
    assert f"python -m migjax.main --config={name}" in doc


def test_variants_change_what_they_claim():
    base = load("arith_tiny")
    assert base.loss.w_process == 1.0 and base.mig.watermark
    assert load("arith_tiny", "grpo_matched").loss.w_process == 0.0
    assert load("arith_tiny", "grpo_matched").loss.w_sft == 0.0
    assert load("arith_tiny", "dapo").loss.eps_high == 0.28
    assert load("arith_tiny", "dr_grpo").adv.estimator == "dr_grpo"
    assert not load("arith_tiny", "no_watermark").mig.watermark
    assert not load("arith_tiny", "coupled").mig.decoupled
    assert load("arith_tiny", "end_of_cot").mig.reward == "end_of_cot"
    with pytest.raises(ValueError, match="unknown config variant 'nope'"):
        apply_variant(base, "nope")


@pytest.mark.parametrize("field,value,match", [
    ("mig.h0", "one", "mig.h0"),
    ("adv.estimator", "ppo", "adv.estimator"),
    ("loss.aggregation", "sum", "loss.aggregation"),
    ("rl.minibatches", 3, "rl.minibatches"),
    ("rl.group_size", 1, "rl.group_size"),
    ("rl.steps", 0, "rl.steps"),
    ("warmstart.distracted_prob", 1.5, "warmstart.distracted_prob"),
    ("warmstart.group_by_length", -1, "warmstart.group_by_length"),
    ("mesh.tensor", 0, "mesh.tensor=0 must be >= 1"),
    ("mesh.fsdp", 0, "mesh.fsdp=0 must be >= 1"),
    ("mesh.data", 0, "mesh.data=0 must be >= 1, or -1"),
    ("optim.max_consecutive_skips", 0, "optim.max_consecutive_skips=0 must be >= 1"),
    ("task.eval_limit", -1, "task.eval_limit=-1 must be >= 0"),
    ("task.train_limit", -3, "task.train_limit=-3 must be >= 0"),
    ("model.attn_impl", "flash", "model.attn_impl"),
])
def test_bad_values_name_the_field(field, value, match):
    c = load("arith_tiny")
    node = c
    *path, leaf = field.split(".")
    for p in path:
        node = node[p]
    node[leaf] = value
    with pytest.raises(ValueError, match=match.replace(".", r"\.")):
        validate(c, 1)


def test_cross_field_checks():
    c = load("arith_tiny")
    c.mig.h0 = "zero"
    with pytest.raises(ValueError, match="likelihood_space"):
        validate(c, 1)
    c.mig.likelihood_space = "prob"
    validate(c, 1)
    c = load("arith_tiny")
    c.mig.reward, c.mig.advantage_mode = "end_of_cot", "stepwise"
    with pytest.raises(ValueError, match="advantage_mode"):
        validate(c, 1)
    c = load("arith_tiny")
    c.model.attn_impl = "cudnn"
    with pytest.raises(ValueError, match="model.dtype bfloat16 or float16"):
        validate(c, 1)
    c.model.dtype = "bfloat16"
    validate(c, 1)
    c = load("arith_tiny")
    c.rl.batch_prompts = 6
    c.mesh.data = 4
    with pytest.raises(ValueError, match="batch_prompts=6 is not divisible"):
        validate(c, 4)


def test_misspelt_key_fails_on_the_command_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "migjax.main", "--config=configs/arith_tiny.py",
                        f"--workdir={tmp_path}", "--config.mig.wattermark=False"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "wattermark" in r.stderr
    assert not os.listdir(tmp_path)


def test_sft_mode_needs_steps_and_demonstrations():
    c = load("gsm8k_qwen")
    c.model.path, c.mode = "/some/model", "sft"
    with pytest.raises(ValueError, match="mode='sft'.*warmstart.steps >= 1"):
        validate(c, 1)
    c.warmstart.steps = 10
    validate(c, 1)  # GSM8K solutions are demonstrations
    c.task.kind = "svamp"
    with pytest.raises(ValueError, match="task.kind='svamp' has none"):
        validate(c, 1)


def test_sft_mode_writes_a_model_directory(tmp_path):
    shrink = ["--config.mode=sft", "--config.warmstart.steps=2", "--config.warmstart.batch_size=4",
              "--config.model.scratch.hidden_size=32", "--config.model.scratch.num_layers=1",
              "--config.model.scratch.num_heads=2", "--config.model.scratch.num_kv_heads=1",
              "--config.model.scratch.head_dim=16", "--config.model.scratch.intermediate_size=64",
              "--config.log.progress=False"]
    r = subprocess.run([sys.executable, "-m", "migjax.main", "--config=configs/arith_tiny.py",
                        f"--workdir={tmp_path}", *shrink], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    out = tmp_path / "sft_model"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (tmp_path / "checkpoints").exists()  # no RL ran


def test_arith_tiny_lengths_cover_its_task(tmp_path):
    """The embedded default's warm start keeps every demonstration, the careless teacher's longer
    ones included (a dropped long one leaves RL prompts the supervised stage never saw, and
    dropping only careless ones would weaken the habit on long chains), and the sampler can write
    every correct solution."""
    from migjax import experiment as ex
    from migjax.data import arith
    from migjax.warmstart import encode_demos

    c = load("arith_tiny")
    tok = ex.build_tokenizer(c, str(tmp_path))
    render = ex.renderer(c, tok)
    task = arith.ArithTask(ex.arith_spec(c, "train"), c.task.arith.train_size)
    items = [task[i] for i in range(0, c.task.arith.train_size, 10)]
    assert c.warmstart.distracted_prob > 0
    _, dropped = encode_demos(tok, [render(it.question) for it in items] * 2,
                              [it.solution for it in items]
                              + [arith.distracted_solution(it) for it in items],
                              c.warmstart.max_len)
    assert dropped == 0
    longest = max(len(tok.encode(it.solution, add_special_tokens=False)) for it in items)
    assert longest <= c.sampler.max_new_tokens
