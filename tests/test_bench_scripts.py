"""The benchmark scripts run end to end on the tiny preset at tiny sizes and print the documented
JSON (keys present, numbers positive and finite); no timing is asserted."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH_KEYS = {"rollout_new_tok_s", "score_tok_s", "score_mfu_pct", "update_tok_s",
              "update_mfu_pct", "peak_mem_gib"}
MIG_KEYS = {"mig_fast_ms", "mig_naive_ms", "update_ms", "mig_overhead_frac",
            "mig_fast_vs_naive_speedup"}


def positive_finite(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Both scripts, started together (each mostly waits on its own compiles)."""
    d = tmp_path_factory.mktemp("bench")
    cmds = {
        "bench": [sys.executable, "scripts/bench.py", "--model", "tiny", "--shapes", "small",
                  "--gen-batch", "2", "--prompt-len", "8", "--new-tokens", "4",
                  "--score-batch", "2", "--train-batch", "2", "--seq-len", "32", "--reps", "1",
                  "--group-size", "2", "--out", str(d / "bench.json")],
        "mig": [sys.executable, "scripts/bench_mig.py", "--model", "tiny", "--steps", "2,3",
                "--batch", "2", "--group-size", "2", "--prompt-len", "8", "--completion-len",
                "40", "--answer-len", "2", "--probe-len", "3", "--reps", "1",
                "--out", str(d / "mig.json")],
    }
    # No timing is checked, so let XLA skip its slow backend optimisations (halves compile time).
    xla = os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=xla.strip(),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {k: subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for k, c in cmds.items()}
    out = {}
    for k, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{cmds[k]} failed:\n{stderr[-3000:]}"
        out[k] = (stdout, d)
    return out


def test_bench_prints_one_json_object(runs):
    stdout, d = runs["bench"]
    lines = [x for x in stdout.splitlines() if x.strip()]
    assert len(lines) == 1
    res = json.loads(lines[0])
    assert set(res) == BENCH_KEYS | {"model", "params", "device", "jax", "gen_batch", "group_size"}
    assert all(positive_finite(res[k]) for k in BENCH_KEYS)
    assert res["model"] == "tiny" and res["params"] == 123968
    assert json.loads((d / "bench.json").read_text()) == res


def test_bench_mig_prints_a_line_per_k(runs):
    stdout, d = runs["mig"]
    rows = [json.loads(x) for x in stdout.splitlines() if x.strip()]
    assert [r["K"] for r in rows] == [2, 3]
    for r in rows:
        assert MIG_KEYS <= set(r)
        assert all(positive_finite(r[k]) for k in MIG_KEYS)
        assert r["mig_overhead_frac"] == pytest.approx(r["mig_fast_ms"] / r["update_ms"],
                                                       rel=1e-2)
        # both likelihood paths computed the same l (a correctness check, not a timing one)
        assert r["fast_naive_max_abs_diff"] < 1e-4
    assert json.loads((d / "mig.json").read_text()) == rows


def test_arith_chains_prints_consistent_counts(sft_model):
    """scripts/arith_chains.py samples the warm-started model and prints counts that add up."""
    cmd = [sys.executable, "scripts/arith_chains.py", "--model", sft_model, "--prompts", "4",
           "--group_size", "2", "--config.task.arith.train_size=16",
           "--config.task.eval_limit=2", "--config.sampler.max_new_tokens=48"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["samples"] == 8
    assert res["correct"] == res["correct_and_valid"] + res["lucky"]
    assert 0 <= res["correct_and_valid"] <= min(res["correct"], res["valid_chain"])
    proc = subprocess.run(cmd + ["--habit", "--config.task.eval_limit=6"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()[-2:]]
    assert [r["distractor"] for r in rows] == [True, False]
    assert sum(r["problems"] for r in rows) == 6
    assert all(0 <= r["greedy_acc"] <= 1 and 0 <= r["extra_step"] <= 1 for r in rows)


def test_bench_reward_times_each_part_of_the_stage(sft_model):
    """scripts/bench_reward.py: one line per repetition and the medians; the stage's trimmed
    likelihood pass computed the same l as the full one."""
    cmd = [sys.executable, "scripts/bench_reward.py", "--model", sft_model, "--reps", "1",
           "--config.rl.batch_prompts=2", "--config.rl.group_size=2",
           "--config.task.arith.train_size=16", "--config.task.eval_limit=2",
           "--config.sampler.max_new_tokens=48"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert len(rows) == 2 and rows[-1]["median"] == rows[0]
    parts = ("rollout", "decode", "segment", "verify", "likelihoods", "stage", "update")
    assert all(positive_finite(rows[0][k]) for k in parts)
    assert 0 < rows[0]["stage_share"] < 1 and rows[0]["max_abs_diff"] < 1e-4
    assert rows[-1]["C"] == 48 and 1 <= rows[-1]["K1"] <= 7


def test_rl_probe_measures_with_common_random_numbers(sft_model):
    """scripts/rl_probe.py: with lr 0 the parameters never move, so every measurement (the same
    sampling keys each time) must repeat the first exactly; --shuffle_rewards runs the control."""
    cmd = [sys.executable, "scripts/rl_probe.py", "--model", sft_model, "--steps", "2",
           "--every", "1", "--heldout", "4", "--samples", "2", "--shuffle_rewards",
           "--config.optim.lr=0.0", "--config.rl.batch_prompts=2", "--config.rl.group_size=2",
           "--config.task.arith.train_size=16", "--config.task.eval_limit=3",
           "--config.sampler.max_new_tokens=48", "--config.eval.max_new_tokens=48"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.strip().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert rows[0]["batch_reward"] is None
    assert all(0.0 <= r["batch_reward"] <= 1.0 for r in rows[1:])
    keys = ("sampled_train", "greedy_train", "sampled_test", "greedy_test")
    assert all(0.0 <= r[k] <= 1.0 for r in rows for k in keys)
    assert 1.0 <= rows[0]["sampled_train_len"] <= 48
    # the length of 8 samples would differ under fresh sampling keys; here it must not
    keys += ("sampled_train_len",)
    assert all(r[k] == rows[0][k] for r in rows for k in keys)


def test_bench_table_reads_what_bench_gpu_writes(runs, tmp_path):
    """bench_gpu.sh's table from the files of real runs (the CPU ones above), one missing."""
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import bench_table

    bench = json.load(open(runs["bench"][1] / "bench.json"))
    assert bench["group_size"] == 2 and bench["gen_batch"] == 2
    for name in ("migjax_qwen2.5-0.5b", "hf_qwen2.5-0.5b", "rollout_b64"):
        (tmp_path / f"{name}.json").write_text(json.dumps(bench))
    (tmp_path / "mig_k8.json").write_text(open(runs["mig"][1] / "mig.json").read())
    out = bench_table.table(str(tmp_path))
    assert "| qwen2.5-0.5b scoring tok/s (16 x 1024) |" in out and "| 1.00 |" in out
    assert out.count("failed") >= 12  # the 1.5B files and rollout_b256 are missing
    mig = json.load(open(runs["mig"][1] / "mig.json"))[0]
    assert f"{100 * mig['mig_overhead_frac']:.1f}%" in out


def test_remat_memory_prints_each_policy():
    """scripts/remat_memory.py: one JSON object, less kept for the backward pass with remat."""
    cmd = [sys.executable, "scripts/remat_memory.py", "--layers", "3", "--seq-len", "64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["layers"] == 3 and res["seq_len"] == 64
    assert 0 < res["nothing"] < res["dots"] < res["none"]


def test_remat_memory_on_a_config_file_keeps_less_with_a_smaller_chunk(tmp_path):
    """--hf-config with the RL update's shapes: logits of a large vocabulary dominate, so a
    smaller rl.score_chunk keeps less (compiled only; nothing of that size is allocated)."""
    hf = dict(model_type="llama", vocab_size=262144, hidden_size=16, intermediate_size=32,
              num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=10000.0,
              tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(hf))
    out = {}
    for chunk in (64, 256):
        cmd = [sys.executable, "scripts/remat_memory.py", "--hf-config",
               str(tmp_path / "config.json"), "--batch", "8", "--seq-len", "320",
               "--completion", "256", "--chunk", str(chunk)]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[chunk] = json.loads(proc.stdout.strip().splitlines()[-1])
        assert out[chunk]["layers"] == 2 and out[chunk]["chunk"] == chunk
    # one [8, chunk, V] float32 block is 0.5 GB at 64 and 2.1 GB at 256
    assert out[64]["nothing"] + 1e9 < out[256]["nothing"]
    assert out[64]["none"] + 1e9 < out[256]["none"]
