"""The scene recipe end to end on a tiny shape: the warm start trains the vision tower and the
language model and writes a Qwen2.5-VL directory; RL trains the language model with the tower
frozen; the export, the HTML views and a real-format (counting JSONL) data set work with it."""

import json
import os

import helpers
import numpy as np
import pytest
from PIL import Image

from migjax import experiment as ex
from migjax.models import split
from migjax.models.qwen25vl import Qwen25VL, load

SHAPE = {"model.scratch_vision." + k: v for k, v in dict(
    depth=1, hidden_size=16, intermediate_size=32, num_heads=2, patch_size=8,
    spatial_merge_size=2, window_size=16, fullatt_block_indexes=(0,)).items()}
OVERRIDES = {
    **{f"model.scratch.{k}": v for k, v in helpers.TINY_SHAPE.items()}, **SHAPE,
    "task.image.height": 32, "task.image.width": 32,  # 4 x 4 patches: 4 image tokens
    "task.scenes.train_size": 32, "task.max_prompt_len": 48, "task.eval_limit": 4,
    "warmstart.steps": 6, "warmstart.batch_size": 8, "warmstart.max_len": 160,
    "warmstart.group_by_length": 0,
    "rl.steps": 2, "rl.batch_prompts": 4, "rl.group_size": 2, "sampler.max_new_tokens": 32,
    "eval.max_new_tokens": 0, "eval.batch_size": 4, "eval.pass_k": 2, "log.progress": False,
    "log.tensorboard": False, "log.samples_every": 1, "checkpoint.every": 1,
    "checkpoint.export_hf": True,
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from migjax.trainer import train

    workdir = str(tmp_path_factory.mktemp("scenes") / "run")
    c = helpers.make_config("scenes_tiny", OVERRIDES)
    summary = train(c, workdir)
    return c, workdir, summary


def params_of(path):
    model, cfg = load(path)
    return split(model.visual)[1], split(model.lm)[1], cfg


def test_warm_start_trains_the_tower_and_rl_keeps_it_frozen(run):
    from flax import nnx

    from migjax.data.tokenizer import load_tokenizer

    c, workdir, summary = run
    sft = os.path.join(workdir, "sft_model")
    with open(os.path.join(sft, "config.json")) as f:
        assert json.load(f)["model_type"] == "qwen2_5_vl"
    vis_sft, lm_sft, vlcfg = params_of(sft)
    init = Qwen25VL(ex.scratch_vl_config(c, load_tokenizer(sft)), rngs=nnx.Rngs(c.seed))
    vis_init = split(init.visual)[1]
    assert max(float(np.abs(np.asarray(vis_sft[k]) - np.asarray(vis_init[k])).max())
               for k in vis_sft) > 1e-4  # the warm start's gradient reached the tower
    vis_rl, lm_rl, _ = params_of(summary["export"])  # (test_multimodal: the update moves lm)
    for k in vis_sft:
        np.testing.assert_array_equal(np.asarray(vis_rl[k]), np.asarray(vis_sft[k]))
    assert set(lm_rl) == set(lm_sft)
    assert vlcfg.image_token_id == load_tokenizer(sft).convert_tokens_to_ids("<|image_pad|>")


def test_run_logs_metrics_and_shows_the_images(run):
    _, workdir, summary = run
    assert set(summary["after"]) >= {"eval/test/pass_at_1", "eval/ood/pass_at_1"}
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        recs = [json.loads(line) for line in f]
    steps = [r for r in recs if "reward/correct" in r]
    assert len(steps) == 2 and all(np.isfinite(r["mig/l0"]) for r in steps)
    with open(os.path.join(workdir, "samples", "step_000001.html")) as f:
        page = f.read()
    assert page.count("data:image/png;base64,") == 4  # once per group (4 prompts)
    with open(os.path.join(workdir, "eval_samples.html")) as f:
        assert "data:image/png;base64," in f.read()


def test_a_counting_jsonl_set_encodes_for_the_model(run, tmp_path):
    from migjax.data.tokenizer import load_tokenizer

    c, workdir, _ = run
    sft = os.path.join(workdir, "sft_model")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(5):
        name = f"img{i}.png"
        size = (40 + 8 * i, 24 + 4 * i)  # any size: resized to task.image
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
            tmp_path / name)
        lines.append({"image": name, "problem": f"How many objects are there? ({i})",
                      "solution": f"<answer>{i}</answer>"})
    lines.append({"image": "missing.png", "problem": "?", "solution": "1"})
    lines.append({"image": ["img0.png", "img1.png"], "problem": "two", "solution": "2"})
    path = tmp_path / "count.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    c = c.copy_and_resolve_references()
    c.model.path = sft
    tok = load_tokenizer(sft)
    examples, images = ex.visual_examples(c, f"counting_jsonl:{path}", limit=None)
    assert len(examples) == 5 and images.shape == (5, 32, 32, 3)  # missing, two images: skipped
    enc, _ = ex.encode(c, tok, examples, images)
    assert len(enc) == 5 and enc.images.layout.index_ExM.shape == (5, 4)
    assert enc.answers[3] == ("3",)
    trimmed = enc.trimmed()
    rows = np.arange(5)[:, None]
    assert (trimmed.tokens_ExP[rows, trimmed.images.layout.index_ExM]
            == tok.convert_tokens_to_ids("<|image_pad|>")).all()
    with pytest.raises(ValueError, match="clevr needs its split"):
        ex.visual_examples(c, "clevr:/some/root", limit=None)


def test_describe_frac_turns_demonstrations_into_scene_descriptions():
    from migjax.data import scenes, visual
    from migjax.warmstart import scene_demos

    c = helpers.make_config("scenes_tiny", {**OVERRIDES, "task.scenes.train_size": 16,
                                            "warmstart.steps": 4})
    counts = {}
    for frac in (0.0, 0.5, 1.0):
        c.warmstart.describe_frac = frac
        prompts, solutions, rows, images = scene_demos(c, lambda q: q)
        assert len(prompts) == 32 and images.shape[0] == 16
        desc = [i for i, p in enumerate(prompts) if p.endswith("Name them from left to right.")]
        counts[frac] = len(desc)
        spec = visual.scene_spec(c, "train")
        for i in desc:  # the description of the demonstration's own scene (and image)
            want = scenes.describe_item(spec, int(rows[i]))
            assert solutions[i] == want.solution
            np.testing.assert_array_equal(images[rows[i]], want.image)
            assert solutions[i].count("from the left is") == len(want.objects)
    assert counts[0.0] == 0 and counts[1.0] == 32 and 0 < counts[0.5] < 32


def test_an_image_run_resumes_and_extends(run, capsys):
    from migjax.trainer import train

    c, workdir, _ = run
    c = c.copy_and_resolve_references()
    c.rl.steps = 3
    summary = train(c, workdir)
    assert summary["steps"] == 3
    assert "resumed from checkpoint 2" in capsys.readouterr().out
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if "reward/correct" in line]
    assert steps == [1, 2, 3]


def write_clevr(root, split, n, rng):
    """A CLEVR-format release fixture: questions/CLEVR_<split>_questions.json, images/<split>/."""
    os.makedirs(root / "questions", exist_ok=True)
    os.makedirs(root / "images" / split, exist_ok=True)
    qs = []
    for i in range(n):
        name = f"CLEVR_{split}_{i:06d}.png"
        Image.fromarray(rng.integers(0, 256, (48, 72, 3), dtype=np.uint8)).save(
            root / "images" / split / name)
        qs.append({"question": f"How many cubes are there? ({i})", "answer": str(i % 3),
                   "image_filename": name, "question_index": i, "split": split})
    (root / "questions" / f"CLEVR_{split}_questions.json").write_text(
        json.dumps({"questions": qs}))


def test_the_real_checkpoint_recipe_runs_on_clevr_files(run, tmp_path):
    """qwen25vl_clevr on CLEVR-format files, with the tiny warm-started Qwen2.5-VL directory
    standing in for the real checkpoint."""
    from migjax.trainer import train

    _, workdir, _ = run
    rng = np.random.default_rng(1)
    root = tmp_path / "CLEVR_CoGenT_v1.0"
    write_clevr(root, "trainA", 8, rng)
    write_clevr(root, "valB", 4, rng)
    c = helpers.make_config("qwen25vl_clevr", {
        "model.path": os.path.join(workdir, "sft_model"), "model.dtype": "float32",
        "model.remat": False, "task.train_path": f"{root}#trainA",
        "task.eval": {"cogent_valB": f"clevr:{root}#valB"},
        "task.image.height": 32, "task.image.width": 32, "task.max_prompt_len": 256,
        "task.eval_limit": 4, "rl.steps": 1, "rl.batch_prompts": 4, "rl.group_size": 2,
        "rl.minibatches": 1, "sampler.max_new_tokens": 16, "eval.batch_size": 4,
        "eval.pass_k": 0, "log.progress": False, "log.tensorboard": False,
        "log.samples_every": 0})
    summary = train(c, str(tmp_path / "rl"))
    assert summary["steps"] == 1 and "eval/cogent_valB/pass_at_1" in summary["after"]
    assert summary["after"]["eval/cogent_valB/n"] == 4


def test_export_and_image_control_of_an_image_run(run, tmp_path):
    from experiments import image_control
    from migjax.export import export

    _, workdir, _ = run
    out = export(workdir, str(tmp_path / "hf"))
    vis_sft, _, _ = params_of(os.path.join(workdir, "sft_model"))
    vis_out, _, cfg = params_of(out)  # a Qwen2.5-VL directory, with the frozen tower
    for k in vis_sft:
        np.testing.assert_array_equal(np.asarray(vis_out[k]), np.asarray(vis_sft[k]))
    assert image_control.main(["--workdir", workdir, "--model", out,
                               "--out", str(tmp_path / "ic.json")]) == 0
    with open(tmp_path / "ic.json") as f:
        res = json.load(f)["results"]
    assert set(res) == {f"{s}/{k}" for s in ("test", "ood") for k in ("own", "permuted", "blank")}
    assert all(r["n"] == 4 for r in res.values())
