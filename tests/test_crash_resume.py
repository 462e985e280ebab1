"""A run killed with SIGKILL at seeded moments (during the warm start, after a logged step, in the
middle of a checkpoint write, at the end) and restarted in the same workdir finishes with the
metrics and the final parameters of an uninterrupted run, bit for bit."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from safetensors.numpy import load_file

from migjax.checkpointing import TMP_MARKER, Checkpointer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
OVERRIDES = {
    "model.scratch.hidden_size": 32, "model.scratch.intermediate_size": 64,
    "model.scratch.num_layers": 2, "model.scratch.num_heads": 2,
    "model.scratch.num_kv_heads": 1, "model.scratch.head_dim": 16,
    "warmstart.steps": 3, "warmstart.batch_size": 4,
    "rl.steps": STEPS, "rl.batch_prompts": 2, "rl.group_size": 2,
    "sampler.max_new_tokens": 16, "eval.max_new_tokens": 16, "eval.batch_size": 2,
    "eval.pass_k": 0, "task.eval_limit": 2, "task.arith.train_size": 64,
    "checkpoint.every": 1, "checkpoint.export_hf": True,
    "log.progress": False, "log.tensorboard": False,
}
POLL_S = 0.002
RUN_TIMEOUT_S = 600


class Run:
    """One `python -m migjax.main` process in its own session (so a kill takes its children)."""

    def __init__(self, workdir, cache_dir, log_path):
        env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
        env.pop("XLA_FLAGS", None)  # one CPU device, whatever the test session uses
        env.pop("JAX_NUM_CPU_DEVICES", None)
        args = [sys.executable, "-m", "migjax.main", "--config=configs/arith_tiny.py",
                f"--workdir={workdir}"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.started = time.monotonic()

    def kill(self):
        os.killpg(self.proc.pid, signal.SIGKILL)  # the run and the verifier it spawned
        self.proc.wait()
        self.log.close()

    def wait(self):
        rc = self.proc.wait(timeout=RUN_TIMEOUT_S)
        self.log.close()
        return rc

    def tail(self):
        with open(self.log_path, "rb") as f:
            return f.read()[-3000:].decode(errors="replace")


def read_json(path):
    with open(path) as f:
        return json.load(f)


def rl_steps(workdir):
    """Steps of the RL lines of metrics.jsonl (complete lines only)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")[:-1]
    return [r["step"] for r in map(json.loads, lines) if "reward/correct" in r]


def tmp_checkpoints(workdir):
    d = os.path.join(workdir, "checkpoints")
    return [n for n in os.listdir(d) if TMP_MARKER in n] if os.path.isdir(d) else []


def sft_model_state(workdir):
    """'absent', 'complete' or what is wrong with workdir/sft_model."""
    out = os.path.join(workdir, "sft_model")
    if not os.path.exists(out):
        return "absent"
    needed = ("config.json", "model.safetensors", "tokenizer.json")
    missing = [f for f in needed if not os.path.isfile(os.path.join(out, f))]
    if missing:
        return f"half-written: {missing} missing"
    load_file(os.path.join(out, "model.safetensors"))
    read_json(os.path.join(out, "config.json"))
    return "complete"


def kill_when(run, condition):
    """Polls until `condition()` holds, then SIGKILLs the run; returns False if the run ended
    first."""
    while run.proc.poll() is None:
        if condition():
            run.kill()
            return True
        if time.monotonic() - run.started > RUN_TIMEOUT_S:
            run.kill()
            raise AssertionError(f"run did not reach the kill point:\n{run.tail()}")
        time.sleep(POLL_S)
    run.log.close()
    return False


def kill_plan(seed):
    """Five kill points in the order the run reaches them, chosen by a seeded generator."""
    rng = random.Random(seed)
    k1 = rng.choice([1, 2])  # an early step: its checkpoint may still be in flight
    k_tmp = rng.choice([k1 + 1, k1 + 2])  # a checkpoint being written
    k2 = rng.choice(range(k_tmp + 1, STEPS))
    return [
        ("warm start: sft_model being written",
         lambda w: os.path.exists(os.path.join(w, "sft_model.tmp"))
         or os.path.exists(os.path.join(w, "sft_model"))),
        (f"after step {k1} is logged", lambda w: bool(rl_steps(w)) and max(rl_steps(w)) >= k1),
        (f"while checkpoint >= {k_tmp} is written",
         lambda w: any(int(n.split(".")[0]) >= k_tmp for n in tmp_checkpoints(w))),
        (f"after step {k2} is logged", lambda w: bool(rl_steps(w)) and max(rl_steps(w)) >= k2),
        ("final evaluation (every step logged)",
         lambda w: bool(rl_steps(w)) and max(rl_steps(w)) >= STEPS),
    ]


def rl_records(workdir):
    """RL metric lines without the timing fields, which differ between runs."""
    out = []
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        lines = f.readlines()
    for line in lines:
        r = json.loads(line)
        if "reward/correct" in r:
            out.append({k: v for k, v in r.items()
                        if k != "time" and not k.startswith(("time/", "perf/"))})
    return out


def test_killed_and_restarted_run_matches_an_uninterrupted_one(tmp_path):
    # MIGJAX_TEST_XLA_CACHE keeps compiled programs between test sessions (faster reruns)
    cache = os.environ.get("MIGJAX_TEST_XLA_CACHE") or tmp_path / "xla_cache"
    ref_dir, crash_dir = str(tmp_path / "ref"), str(tmp_path / "crash")

    ref = Run(ref_dir, cache, tmp_path / "ref.log")  # also fills the compilation cache
    assert ref.wait() == 0, ref.tail()

    events = []
    for i, (what, cond) in enumerate(kill_plan(seed=20240607)):
        run = Run(crash_dir, cache, tmp_path / f"crash{i}.log")
        killed = kill_when(run, lambda cond=cond: cond(crash_dir))
        events.append((what, round(time.monotonic() - run.started, 1), sft_model_state(crash_dir),
                       os.path.exists(os.path.join(crash_dir, "sft_model.tmp"))))
        assert killed, f"run ended before the kill point {what!r}:\n{run.tail()}"
        # a kill never leaves a half-written warm-start model behind
        assert sft_model_state(crash_dir) in ("absent", "complete"), events
        # the newest checkpoint that counts is complete and loads
        steps = Checkpointer(os.path.join(crash_dir, "checkpoints")).all_steps()
        if steps:
            ocp.StandardCheckpointer().restore(
                os.path.join(crash_dir, "checkpoints", str(steps[-1]), "state"))
        # metrics.jsonl holds each RL step once, in order, whatever the restarts
        logged = rl_steps(crash_dir)
        assert logged == list(range(1, len(logged) + 1)), (what, logged)
    last = Run(crash_dir, cache, tmp_path / "crash_final.log")
    assert last.wait() == 0, last.tail()
    print("kills (point, seconds into the run, sft_model, sft_model.tmp):", events)

    assert rl_steps(crash_dir) == list(range(1, STEPS + 1))
    assert rl_records(crash_dir) == rl_records(ref_dir)
    ref_summary = read_json(os.path.join(ref_dir, "summary.json"))
    crash_summary = read_json(os.path.join(crash_dir, "summary.json"))
    assert crash_summary["before"] == ref_summary["before"]
    assert crash_summary["after"] == ref_summary["after"]
    assert not tmp_checkpoints(crash_dir)
    assert sft_model_state(crash_dir) == "complete"
    assert not os.path.exists(os.path.join(crash_dir, "sft_model.tmp"))

    # the final parameters, bit for bit
    a = load_file(os.path.join(ref_dir, "export", "model.safetensors"))
    b = load_file(os.path.join(crash_dir, "export", "model.safetensors"))
    assert sorted(a) == sorted(b)
    for name in a:
        np.testing.assert_array_equal(a[name].view(np.uint8), b[name].view(np.uint8),
                                      err_msg=name)
    # and the whole train state (Adam moments, counters) of every checkpoint both runs kept
    ref_steps = Checkpointer(os.path.join(ref_dir, "checkpoints")).all_steps()
    crash_steps = Checkpointer(os.path.join(crash_dir, "checkpoints")).all_steps()
    assert ref_steps == crash_steps and ref_steps[-1] == STEPS
    for step in ref_steps:
        sa, sb = (ocp.StandardCheckpointer().restore(os.path.join(w, "checkpoints", str(step),
                                                                  "state"))
                  for w in (ref_dir, crash_dir))
        assert jax.tree.structure(sa) == jax.tree.structure(sb)
        for x, y in zip(jax.tree.leaves(sa), jax.tree.leaves(sb), strict=True):
            np.testing.assert_array_equal(np.asarray(x).reshape(-1).view(np.uint8),
                                          np.asarray(y).reshape(-1).view(np.uint8))
    sa = load_file(os.path.join(ref_dir, "sft_model", "model.safetensors"))
    sb = load_file(os.path.join(crash_dir, "sft_model", "model.safetensors"))
    for name in sa:
        np.testing.assert_array_equal(sa[name].view(np.uint8), sb[name].view(np.uint8))
