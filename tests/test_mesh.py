"""A run on 8 CPU devices as a (data 2, fsdp 2, tensor 2) mesh computes what the same run
computes on one device.

What is compared, and how tightly: the sharded run sums in a different order, so its float32
values differ from the single-device run's in the last bits (~1e-7 relative here). Before the
first update both runs hold the same parameters (loaded from one file), the same prompts and
the same random keys, so the greedy evaluation, the first sampled tokens and every metric of
step 1 (losses, rewards, likelihoods, gradient norm: a wrong gradient reduction shows here)
agree to float32 tolerance. A sampled token could only differ if two candidates' perturbed
logits fell within ~1e-6 of each other, probability ~1e-6 per token, and for a given platform
that either happens or it does not (no flakiness), so tokens are compared exactly. After an
update the comparison is looser: Adam divides each gradient entry by its own running scale, so
rounding differences in small entries are amplified (bounded by lr * |difference| / eps), hence
the step-2 metrics at 1e-3 relative and the final parameters at 2e-5 absolute (~1e-8 is seen).
"""

from __future__ import annotations

import json

import helpers
import jax
import numpy as np
import pytest

from migjax import trainer
from migjax.config_checks import validate

pytestmark = pytest.mark.slow
MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2}


def single_device_run(overrides, workdir, tmp_path, cache):
    """The reference on one device: in this process when it has one device, else a child."""
    if jax.device_count() == 1:
        c = helpers.make_config("arith_tiny", overrides)
        validate(c, 1)
        with helpers.recording() as rec:
            summary = trainer.train(c, str(workdir))
        return dict(rec, summary=summary, device_count=1)
    spec = {"recipe": "arith_tiny", "overrides": overrides, "workdir": str(workdir),
            "record": str(tmp_path / "single.json")}
    helpers.run_driver(spec, str(tmp_path / "single_spec.json"),
                       helpers.subprocess_env(cache, devices=1))
    return load_record(spec["record"])


def load_record(path):
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    with np.load(path + ".npz") as z:
        rec["params"] = {k: z[k] for k in z.files}
    return rec


def test_mesh_222_matches_one_device(tmp_path, sft_model, compile_cache):
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=2)
    spec = {"recipe": "arith_tiny", "overrides": dict(ov, **MESH),
            "workdir": str(tmp_path / "mesh"), "record": str(tmp_path / "mesh.json")}
    child = helpers.start_driver(spec, str(tmp_path / "mesh_spec.json"),
                                 helpers.subprocess_env(compile_cache, devices=8))
    try:
        one = single_device_run(ov, tmp_path / "single", tmp_path, compile_cache)
        out, _ = child.communicate(timeout=600)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode == 0, out[-6000:]
    mesh = load_record(spec["record"])

    assert mesh["device_count"] == 8 and one["device_count"] == 1
    specs = mesh["param_specs"]  # the parameters really are split over fsdp and tensor
    assert "fsdp" in specs["wq"] and "tensor" in specs["wq"], specs
    assert "tensor" in specs["w_gate"] and "fsdp" in specs["embed"], specs
    assert one["summary"]["before"] == mesh["summary"]["before"]  # greedy, same parameters
    assert mesh["token_digests"][0] == one["token_digests"][0]
    m1, o1 = helpers.comparable(mesh["metrics"][0]), helpers.comparable(one["metrics"][0])
    assert set(m1) == set(o1)
    for k in sorted(o1):
        assert m1[k] == pytest.approx(o1[k], rel=1e-4, abs=1e-5), k
    assert o1["optim/grad_norm"] > 0 and o1["mig/no_cot_frac"] < 1  # a real update was compared
    assert mesh["steps"] == one["steps"] == [1, 2]
    assert mesh["token_digests"][1] == one["token_digests"][1]
    m2, o2 = helpers.comparable(mesh["metrics"][1]), helpers.comparable(one["metrics"][1])
    for k in sorted(o2):
        assert m2[k] == pytest.approx(o2[k], rel=1e-3, abs=1e-4), k
    for k, v in one["params"].items():  # after both updates: the same model, up to rounding
        np.testing.assert_allclose(mesh["params"][k], v, rtol=0, atol=2e-5, err_msg=k)
    assert one["summary"]["after"] == mesh["summary"]["after"]
