"""The command line from anywhere: packaged recipes by name or path, a user's own config file,
`--print_config` with base.py's comments, evaluation sets added by flag, and one-line errors for
misspelt or ill-typed settings."""

import json
import os
import subprocess
import sys

import pytest
from absl import flags

from migjax.configs import cli, data_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(args, cwd, **env):
    env = {**os.environ, "PYTHONPATH": ROOT, **env}
    return subprocess.run([sys.executable, "-m", "migjax.main", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def settings(stdout: str, part: int = 0) -> dict[str, str]:
    """{key: value} (part 0) or {key: comment} (part 1) of --print_config's lines."""
    pairs = (line.split(" = ", 1) for line in stdout.splitlines())
    return {k: (v.split("  # ", 1) + [""])[part] for k, v in pairs}


def test_packaged_recipe_by_name_from_another_directory(tmp_path):
    r = run_main(["--config=arith_tiny:grpo_matched", "--print_config"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = settings(r.stdout)
    assert s["loss.w_process"] == "0.0"  # the variant applied
    assert s["rl.steps"] == "40"  # the recipe's value
    notes = settings(r.stdout, 1)
    # base.py's comments
    assert notes["loss.w_process"] == "process stream weight (METHOD.md's alpha)"
    assert "fold_in" in notes["seed"] and notes["optim.lr"] == ""
    assert s["task.eval"] == "{}" and "kind:path" in notes["task.eval"]
    assert not os.listdir(tmp_path)  # printing runs nothing


def test_packaged_file_path_and_data_root(tmp_path):
    path = os.path.join(ROOT, "migjax", "configs", "gsm8k_qwen.py")
    r = run_main([f"--config={path}", "--print_config"], cwd=tmp_path,
                 MIGJAX_DATA=str(tmp_path / "data"))
    assert r.returncode == 0, r.stderr
    s = settings(r.stdout)
    assert s["task.train_path"] == repr(str(tmp_path / "data" / "gsm8k" / "train.jsonl"))
    # without MIGJAX_DATA the recipes look beside the repository, not in the current directory
    r = run_main(["--config=gsm8k_qwen", "--print_config"], cwd=tmp_path)
    train = eval(settings(r.stdout)["task.train_path"])
    assert train == os.path.join(data_root(), "gsm8k", "train.jsonl") and os.path.isabs(train)
    assert os.path.dirname(os.path.dirname(data_root())) == os.path.dirname(ROOT)


def test_user_config_outside_the_repository(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from migjax.configs.base import apply_variant, get_config as base\n\n"
        "def get_config(variant='mig'):\n"
        "    c = base()\n"
        "    c.rl.steps = 7\n"
        "    return apply_variant(c, variant)\n")
    r = run_main(["--config=mine.py:no_sft", "--print_config", "--config.optim.lr=0.5"],
                 cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    s = settings(r.stdout)
    assert s["rl.steps"] == "7" and s["loss.w_sft"] == "0.0" and s["optim.lr"] == "0.5"


@pytest.mark.parametrize("flag,expected", [
    ("--config.optim.lrr=1", "--config.optim.lrr: no such setting; did you mean optim.lr?"),
    ("--config.mig.wattermark=False", "did you mean mig.watermark?"),
    ("--config.rl.steps=abc", "--config.rl.steps=abc: invalid literal"),
    ("--config.loss.beta=0.04", "--config.loss.beta: loss.beta was renamed loss.w_outcome (the "
     "outcome-loss weight); the KL coefficient is loss.kl_coef"),
])
def test_bad_settings_are_one_line(tmp_path, flag, expected):
    r = run_main(["--config=arith_tiny", f"--workdir={tmp_path / 'w'}", flag], cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], r.stderr
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("spec,expected", [
    ("arith_tiny:nope", "arith_tiny.py:nope: unknown config variant 'nope'"),
    ("no_such_recipe", "--config=no_such_recipe: no such config file or packaged recipe"),
])
def test_bad_config_names_are_one_line(tmp_path, spec, expected):
    r = run_main([f"--config={spec}", "--print_config"], cwd=tmp_path)
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and expected in lines[0], r.stderr


def test_a_config_file_setting_an_old_name_fails():
    from migjax.config_checks import validate

    c = cli.load("arith_tiny")
    c.loss.gamma = 0.5  # an unlocked config (a user's file) accepts the old name silently
    with pytest.raises(ValueError, match="loss.gamma was renamed loss.w_sft"):
        validate(c, 1)


def test_ill_typed_setting_names_its_type():
    base = cli.load("arith_tiny")
    msg = cli._flag_error("flag --config.rl.steps=abc: invalid literal for int()", base)
    assert msg == ("--config.rl.steps=abc: invalid literal for int() "
                   "(rl.steps takes an int; it is 40)")


def test_eval_sets_added_on_the_command_line(tmp_path):
    argv = ["prog", "--config=gsm8k_qwen", "--config.task.eval.mine=jsonl:/data/mine.jsonl",
            "--config.task.eval.gsm8k_test=gsm8k:/data/test.jsonl", "--config.rl.steps=3"]
    c, rest = cli.parse(argv, flags.FlagValues())
    assert rest == ["prog"] and c.rl.steps == 3
    assert c.task.eval.mine == "jsonl:/data/mine.jsonl"
    assert c.task.eval.gsm8k_test == "gsm8k:/data/test.jsonl"  # replaced
    assert "svamp" in c.task.eval  # the recipe's other set kept
    with pytest.raises(AttributeError):  # the rest of the config stays locked
        c.task.new_field = 1
    c, _ = cli.parse(["prog", "--config=arith_tiny"], flags.FlagValues())
    assert dict(c.task.eval) == {}


def test_jsonl_field_names_and_eval_sets_from_flags(tmp_path):
    from migjax import experiment

    train, extra = tmp_path / "train.jsonl", tmp_path / "extra.jsonl"
    train.write_text(json.dumps({"problem": "What is 2+3?", "worked": "2+3 #### 5",
                                 "alts": ["5.0"], "uid": "a"}) + "\n")
    extra.write_text(json.dumps({"problem": "What is 1+1?", "final": 2}) + "\n")
    argv = ["prog", "--config=gsm8k_qwen", "--config.task.kind=jsonl",
            f"--config.task.train_path={train}", "--config.task.jsonl.question=problem",
            "--config.task.jsonl.answer=final", "--config.task.jsonl.solution=worked",
            "--config.task.jsonl.answer_variants=alts", "--config.task.jsonl.id=uid",
            f"--config.task.eval.extra=jsonl:{extra}"]
    c, _ = cli.parse(argv, flags.FlagValues())
    (ex,) = experiment.raw_examples(c, None, limit=None)
    assert (ex.id, ex.question, ex.answers) == ("a", "What is 2+3?", ("5", "5.0"))
    (ev,) = experiment.raw_examples(c, c.task.eval.extra, limit=None)
    assert ev.answers[0] == "2" and ev.question == "What is 1+1?"
    assert set(experiment.eval_sets(c)) == {"gsm8k_test", "svamp", "extra"}


def test_comments_come_from_base():
    notes = cli.comments()
    assert notes["reward.w_format"].startswith("r_out = r_correct")
    assert "careless teacher" in notes["warmstart.distracted_prob"]  # a block above the line


def test_names_doc_maps_to_real_keys():
    """docs/NAMES.md's migjax column names only settings that exist, and covers the TRL, verl
    and Tunix names researchers look for."""
    import re

    with open(os.path.join(ROOT, "docs", "NAMES.md"), encoding="utf-8") as f:
        rows = [line.split("|")[1:-1] for line in f if line.startswith("| `")]
    valid = set(cli.dotted_keys(cli.load("base")))
    cited = {m for row in rows for m in re.findall(r"`([a-z_]+\.[a-z_.]+)", row[1])}
    assert cited and cited <= valid, sorted(cited - valid)
    theirs = " ".join(row[0] for row in rows)
    for name in ("num_generations", "beta", "epsilon_high", "loss_type", "scale_rewards",
                 "num_iterations", "mask_truncated_completions", "rollout.n", "adv_estimator",
                 "clip_ratio_low", "loss_agg_mode", "kl_loss_coef", "ppo_epochs",
                 "norm_adv_by_std_in_grpo", "loss_algo"):
        assert name in theirs, name
