"""Two processes on this machine, joined by jax.distributed over gloo CPU collectives (one CPU
device each, so the mesh's data axis spans the processes), run the embedded recipe together:
the warm start, then RL with each process reading its own shard of every prompt batch. Both
must compute the same rollouts, metrics and parameters; process 0 alone writes the outputs."""

from __future__ import annotations

import json
import os
import socket

import helpers
import numpy as np
import pytest

pytestmark = pytest.mark.slow
TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_in_lockstep(tmp_path):
    # A warm start long enough that the RL updates are not zero (see helpers.build_sft_model).
    ov = helpers.shrink("arith_tiny", rl__steps=2, warmstart__steps=100, warmstart__lr=1e-2,
                        checkpoint__export_hf=True)
    # No persistent compilation cache here: a process that loads a program while the other
    # compiles it can reach the first collective long before the other, past gloo's 30 s wait.
    env = helpers.subprocess_env(None, xla_flags="--xla_backend_optimization_level=0")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"  # also the default of jax 0.10
    work, port = tmp_path / "run", free_port()
    procs = []
    try:
        for i in range(2):
            spec = {"recipe": "arith_tiny", "overrides": ov, "workdir": str(work),
                    "record": str(tmp_path / f"rec{i}.json"),
                    "coordinator": f"127.0.0.1:{port}", "num_processes": 2, "process_id": i}
            procs.append(helpers.start_driver(spec, str(tmp_path / f"spec{i}.json"), env))
        outs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, out) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i}:\n{out[-6000:]}"
    recs = []
    for i in range(2):
        with open(tmp_path / f"rec{i}.json", encoding="utf-8") as f:
            recs.append(json.load(f))
    a, b = recs
    assert (a["process_index"], b["process_index"]) == (0, 1)
    assert a["device_count"] == b["device_count"] == 2 and a["local_device_count"] == 1
    assert a["steps"] == b["steps"] == [1, 2]
    assert a["token_digests"] == b["token_digests"]
    assert a["param_digests"] == b["param_digests"]
    assert [helpers.comparable(m) for m in a["metrics"]] == \
        [helpers.comparable(m) for m in b["metrics"]]
    assert a["summary"]["before"] == b["summary"]["before"]
    assert a["summary"]["after"] == b["summary"]["after"]
    with np.load(tmp_path / "rec0.json.npz") as p0, np.load(tmp_path / "rec1.json.npz") as p1:
        assert sorted(p0.files) == sorted(p1.files)
        for k in p0.files:
            np.testing.assert_array_equal(p0[k], p1[k], err_msg=k)
    # The batch is the union of both shards: 4 prompts x 2 samples, prompts grouped.
    toks = np.asarray(a["tokens"][0])
    assert toks.shape == (8, ov["sampler.max_new_tokens"])
    # The updates were real, and both processes made the same ones.
    assert a["metrics"][1]["optim/grad_norm"] > 0 and a["param_digests"][0] != \
        a["param_digests"][1]

    # Process 0 wrote one copy of every output: the evaluation before RL, one metrics line per step, then the final
    # evaluation; one summary; the warm-start model; checkpoints saved together.
    lines = helpers.metrics_lines(work)
    assert [r["step"] for r in lines] == [0, 1, 2, 2]
    for line, m in zip(lines[1:], a["metrics"], strict=False):
        assert line == pytest.approx(helpers.comparable(m) | {"step": line["step"]})
    with open(work / "summary.json", encoding="utf-8") as f:
        assert json.load(f)["after"] == a["summary"]["after"]
    assert os.path.isfile(work / "sft_model" / "config.json")
    # the exported policy (gathered from both processes, written by process 0) is the final state
    from migjax.models import load_pretrained, split

    _, exported = split(load_pretrained(str(work / "export"))[0])
    with np.load(tmp_path / "rec0.json.npz") as p0:
        for k in p0.files:
            np.testing.assert_array_equal(np.asarray(exported[k]), p0[k], err_msg=k)
    assert sorted(d for d in os.listdir(work / "checkpoints") if d.isdigit()) == ["2"]
