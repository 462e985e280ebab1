"""A workdir holds one run at a time (a lock the kernel releases when its holder dies), records
where the run came from, and refuses a resume under another config."""

from __future__ import annotations

import json
import os
import signal
import time

import helpers
import pytest

from migjax import workdir as wd


def test_lock_refuses_a_second_holder_until_released(tmp_path):
    first = wd.lock(str(tmp_path))
    assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(wd.WorkdirBusyError, match=f"{tmp_path}.*pid {os.getpid()}"):
        wd.lock(str(tmp_path))
    first.close()
    wd.lock(str(tmp_path)).close()


@pytest.mark.slow
def test_second_run_refused_while_the_first_runs_and_allowed_after_a_kill(tmp_path, sft_model,
                                                                           compile_cache):
    from migjax import trainer

    work = tmp_path / "run"
    ov = helpers.shrink("arith_tiny", model_path=sft_model, rl__steps=10_000,
                        checkpoint__every=10_000)
    proc = helpers.start_driver({"recipe": "arith_tiny", "workdir": str(work), "overrides": ov},
                                str(tmp_path / "spec.json"), helpers.subprocess_env(compile_cache))
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            lock = work / ".lock"
            if lock.is_file() and lock.read_text().strip() == str(proc.pid):
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        c = helpers.make_config("arith_tiny", dict(ov, **{"rl.steps": 1}))
        with pytest.raises(wd.WorkdirBusyError, match=f"{work}.*pid {proc.pid}"):
            trainer.train(c, str(work))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    summary = trainer.train(c, str(work))  # the dead holder's lock is gone
    assert summary["steps"] == 1 and (work / "summary.json").is_file()
    assert (work / ".lock").read_text().strip() == str(os.getpid())


def test_config_json_records_provenance(tmp_path, monkeypatch):
    c = helpers.make_config("arith_tiny", {})
    wd.write_config(str(tmp_path), c)
    saved = json.loads((tmp_path / "config.json").read_text())
    p = saved.pop(wd.PROVENANCE_KEY)
    assert saved == wd.config_record(c)
    assert set(p["versions"]) >= {"jax", "flax", "optax", "numpy", "transformers"}
    assert p["devices"]["count"] >= 1 and p["devices"]["platform"] == "cpu"
    assert isinstance(p["command"], list)
    assert len(p["git"]["commit"]) == 40 and isinstance(p["git"]["dirty"], bool)
    monkeypatch.setattr(wd, "_git", lambda args, cwd: None)  # not run from a git checkout
    assert "git" not in wd.provenance()


def test_resume_under_another_config_is_refused_naming_the_keys(tmp_path):
    c = helpers.make_config("arith_tiny", {})
    wd.write_config(str(tmp_path), c)
    wd.check_resume(str(tmp_path), wd.config_record(c))  # the same config resumes
    allowed = helpers.make_config("arith_tiny", {"rl.steps": 99, "eval.every": 3,
                                                 "log.tensorboard": False,
                                                 "checkpoint.export_hf": True,
                                                 "checkpoint.every": 7,
                                                 "warmstart.checkpoint_every": 9,
                                                 "model.attn_impl": "auto",
                                                 "model.remat": True,
                                                 "model.remat_policy": "dots",
                                                 "rl.score_chunk": 64})
    wd.check_resume(str(tmp_path), wd.config_record(allowed))
    wider = helpers.make_config("arith_tiny", {"model.scratch.hidden_size": 8, "rl.steps": 5})
    with pytest.raises(wd.ConfigMismatchError,
                       match=r"config.json holds another config \(model.scratch.hidden_size: "
                             r"\d+ -> 8\)"):
        wd.check_resume(str(tmp_path), wd.config_record(wider))
    baseline = helpers.make_config("arith_tiny", {}, variant="grpo_matched")
    with pytest.raises(wd.ConfigMismatchError, match="loss.w_process") as e:
        wd.check_resume(str(tmp_path), wd.config_record(baseline))
    assert "\n" not in str(e.value)


def test_train_refuses_a_changed_config_before_any_work(tmp_path):
    from migjax import trainer

    c = helpers.make_config("arith_tiny", helpers.shrink("arith_tiny"))
    wd.write_config(str(tmp_path), c)
    before = (tmp_path / "config.json").read_text()
    other = helpers.make_config("arith_tiny", helpers.shrink("arith_tiny", optim__lr=0.5))
    with pytest.raises(wd.ConfigMismatchError, match=r"\(optim.lr: 5e-05 -> 0.5\)"):
        trainer.train(other, str(tmp_path))
    assert (tmp_path / "config.json").read_text() == before  # the run's record is kept
    assert sorted(os.listdir(tmp_path)) == [".lock", "config.json"]  # nothing else began
    wd.lock(str(tmp_path)).close()  # and the lock was released


def test_a_key_added_since_resumes_at_its_default(tmp_path):
    """A workdir written before a config key existed resumes when the key holds its default
    (the old run behaved so), and is refused when it does not."""
    c = helpers.make_config("arith_tiny", {})
    old = wd.config_record(c)
    del old["rl"]["mask_truncated"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    wd.check_resume(str(tmp_path), wd.config_record(c))
    other = helpers.make_config("arith_tiny", {"rl.mask_truncated": True})
    with pytest.raises(wd.ConfigMismatchError,
                       match=r"rl.mask_truncated: '<absent>' -> True"):
        wd.check_resume(str(tmp_path), wd.config_record(other))
