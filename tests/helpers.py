"""Shared pieces of the system tests: the real recipes shrunk by overrides, a tiny random model
directory, step recording around `trainer.train`, and a driver that runs a recorded training in a
subprocess (`python tests/helpers.py SPEC.json`), optionally as one process of several."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ("arith_tiny", "gsm8k_qwen", "math_qwen", "smollm2_gsm8k")
# The decoder every test trains: ~25k parameters.
TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                  num_kv_heads=1, head_dim=16)
# Metrics that measure time, not computation: never compared between runs.
TIMING_PREFIXES = ("time", "perf/")
# METHOD.md section 8: logged at every RL step.
STEP_METRICS = (
    "reward/correct", "reward/format", "mig/l0", "mig/lK", "mig/gain_sum",
    "mig/zero_gain_step_frac", "mig/steps_per_completion", "mig/no_cot_frac", "adv/process_std",
    "adv/outcome_std", "adv/corr_process_outcome", "sft/pass_frac", "policy/clipfrac",
    "policy/entropy", "policy/approx_kl", "policy/sampler_trainer_logp_absdiff",
    "perf/rollout_tok_s", "perf/score_tok_s", "perf/update_tok_s", "perf/rollout_s",
    "perf/reward_s", "perf/update_s")
LOSS_METRICS = ("loss/total", "loss/process", "loss/outcome", "loss/sft")


# ----------------------------------------------------------------------------- tiny models


def random_params(cfg, seed=0, scale=0.15):
    """(graphdef, params) of the decoder `cfg` with random weights large enough that next-token
    distributions are far from uniform (greedy choices have clear margins), and random norms and
    biases so that every parameter matters. Built with numpy on the abstract module (eager random
    init costs many small compilations)."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from migjax.models import Transformer, split

    graphdef, shapes = split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.RandomState(seed)
    params = {}
    for name, s in sorted(shapes.items()):
        noise = scale * rng.randn(*s.shape).astype(np.float32)
        params[name] = jnp.asarray(1.0 + noise if "norm" in name else noise)
    return graphdef, params


# ----------------------------------------------------------------------------- configs


def load_recipe(name: str, variant: str = "mig"):
    """configs/<name>.py's get_config(variant), as `--config=configs/<name>.py:<variant>`."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    return importlib.import_module(f"configs.{name}").get_config(variant)


def apply_overrides(c, overrides: dict):
    """Sets dotted fields like `--config.a.b=value` does (the field must exist)."""
    for key, value in overrides.items():
        node = c
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        if leaf not in node:
            raise KeyError(f"config has no field {key!r}")
        node[leaf] = value
    return c


def flag_args(overrides: dict) -> list[str]:
    """The same overrides as `--config.a.b=value` command-line flags."""
    out = []
    for key, v in overrides.items():
        if isinstance(v, tuple | list):
            v = "(" + ",".join(repr(x) for x in v) + ("," if len(v) == 1 else "") + ")"
        out.append(f"--config.{key}={v}")
    return out


def shrink(recipe: str, *, model_path: str = "", **extra) -> dict:
    """Overrides that shrink a recipe to a seconds-long CPU run: 3 RL steps of 4 prompts x 2
    samples, 64 prompt and 64 completion tokens, 4 examples per evaluation set. Real-data recipes
    get `model_path` (a tiny model directory), their files made absolute, 16 training records and
    long prompts truncated. `extra` (dotted keys with "." written as "__") wins."""
    o = {
        "rl.steps": 3, "rl.batch_prompts": 4, "rl.group_size": 2,
        "sampler.max_new_tokens": 64, "eval.max_new_tokens": 0, "eval.every": 0,
        "eval.batch_size": 4, "eval.pass_k": 2, "task.eval_limit": 4, "task.max_prompt_len": 64,
        "log.progress": False, "log.tensorboard": False, "log.samples_every": 0,
        "checkpoint.every": 2, "mig.max_steps": 6,
    }
    if recipe == "arith_tiny":
        o.update({f"model.scratch.{k}": v for k, v in TINY_SHAPE.items()})
        o.update({"task.arith.train_size": 64, "task.arith.train.min_steps": 2,
                  "task.arith.train.max_steps": 2, "warmstart.steps": 3,
                  "warmstart.batch_size": 16, "warmstart.max_len": 96})
        if model_path:  # RL straight from that model, no warm start
            o["model.path"], o["model.init_from_sft"] = model_path, False
    else:
        c = load_recipe(recipe)
        o.update({"model.path": model_path, "task.train_limit": 16, "task.overlong": "truncate",
                  "task.train_path": _absolute(c.task.train_path)})
        if c.task.exclude_path:
            o["task.exclude_path"] = _absolute(c.task.exclude_path)
        o["task.eval"] = {name: _absolute_spec(spec) for name, spec in c.task.eval.items()}
    o.update({k.replace("__", "."): v for k, v in extra.items()})
    return o


def _absolute(path: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(ROOT, path))


def _absolute_spec(spec: str) -> str:
    kind, _, path = spec.partition(":")
    return f"{kind}:{_absolute(path)}"


def make_config(recipe: str, overrides: dict, variant: str = "mig"):
    from ml_collections import config_dict

    c = load_recipe(recipe, variant)
    eval_sets = overrides.get("task.eval")
    rest = {k: v for k, v in overrides.items() if k != "task.eval"}
    if eval_sets is not None:
        c.task.eval = config_dict.ConfigDict(dict(eval_sets))
    return apply_overrides(c, rest)


# ----------------------------------------------------------------------------- models


def build_tiny_model(path: str, seed: int = 0) -> str:
    """A Hugging Face directory with the arithmetic tokenizer and a random TINY_SHAPE qwen2."""
    from migjax.data.tokenizer import build_arith_tokenizer
    from migjax.models import ModelConfig, init_model, split
    from migjax.models.loading import save_params

    tmp = path + ".tmp"
    tok = build_arith_tokenizer(tmp, vocab_size=256, seed=seed)
    cfg = ModelConfig(model_type="qwen2", vocab_size=len(tok), max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      bos_token_id=tok.bos_token_id, tie_word_embeddings=True, **TINY_SHAPE)
    _, params = split(init_model(cfg, seed))
    save_params(params, cfg, tmp, tokenizer=tok)
    os.replace(tmp, path)
    return path


def build_sft_model(workdir: str, steps: int = 100, lr: float = 1e-2) -> str:
    """The arith recipe's warm start on the tiny shape, long enough that sampled completions
    often hold a think block with steps (so RL gradients are not all zero). The demonstrations
    are all correct: this model serves the plumbing tests, and the default's careless teacher
    would make whether its short training lands on well-formed chains depend on that setting.
    Returns the model directory (tokenizer included)."""
    from migjax import experiment as ex
    from migjax.warmstart import run_warmstart

    c = make_config("arith_tiny", shrink("arith_tiny", warmstart__steps=steps, warmstart__lr=lr,
                                         warmstart__distracted_prob=0.0))
    return run_warmstart(c, workdir, ex.build_tokenizer(c, workdir), ex.build_mesh(c))


# ----------------------------------------------------------------------------- recording


def host_value(x):
    """The full value of a (possibly multi-process, replicated or sharded) array as numpy."""
    import jax
    import numpy as np

    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        if x.sharding.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def digest(arrays: dict) -> str:
    """A content hash of named arrays (names, dtypes, shapes and bytes)."""
    import numpy as np

    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(f"{k}:{a.dtype.str}:{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


@contextlib.contextmanager
def recording(exit_at_step: int | None = None):
    """Patches `migjax.trainer` to record, per RL step, the metrics, the sampled tokens and a
    digest of the parameters after the update; yields the record dict, whose "params" holds the
    last parameters. With `exit_at_step`, the process dies (os._exit) as that step begins, as
    a killed job would: after the metrics of the steps before it were written."""
    from migjax import trainer

    rec = {"steps": [], "metrics": [], "param_digests": [], "token_digests": [], "tokens": [],
           "param_specs": {}, "params": None}
    orig_step, orig_sample = trainer.rl_step, trainer.sample

    def sample(*args, **kw):
        out = orig_sample(*args, **kw)
        rollout = out[0] if kw.get("return_cache") else out  # (rollout, cache) for MIG
        toks = host_value(rollout.tokens_NxC) * host_value(rollout.mask_NxC)
        rec["tokens"].append(toks.tolist())
        rec["token_digests"].append(digest({"tokens": toks}))
        return out

    def rl_step(c, step, *args, **kw):
        if exit_at_step is not None and step + 1 == exit_at_step:
            sys.stdout.flush()
            os._exit(17)
        state, metrics = orig_step(c, step, *args, **kw)
        params = {k: host_value(v) for k, v in state.params.items()}
        rec["steps"].append(step + 1)
        rec["metrics"].append(dict(metrics))
        rec["param_digests"].append(digest(params))
        rec["params"] = params
        rec["param_specs"] = {k: str(getattr(v.sharding, "spec", "")) for k, v in
                              state.params.items()}
        return state, metrics

    trainer.rl_step, trainer.sample = rl_step, sample
    try:
        yield rec
    finally:
        trainer.rl_step, trainer.sample = orig_step, orig_sample


def comparable(metrics: dict) -> dict:
    """`metrics` without the timing entries."""
    return {k: v for k, v in metrics.items() if not k.startswith(TIMING_PREFIXES)}


def metrics_lines(workdir: str) -> list[dict]:
    """metrics.jsonl of a run as parsed records, timing entries removed."""
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        return [comparable(json.loads(line)) for line in f if line.strip()]


# ----------------------------------------------------------------------------- subprocesses


def subprocess_env(cache_dir: str | None, *, devices: int | None = None,
                   xla_flags: str = "") -> dict:
    """The environment of a child run: CPU only, the repository importable, the shared
    persistent compilation cache, and `devices` host devices when given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    if cache_dir:
        env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    flags = [f for f in env.get("XLA_FLAGS", "").split() if f]
    if devices is not None:
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    flags += xla_flags.split()
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    return env


def start_driver(spec: dict, spec_path: str, env: dict) -> subprocess.Popen:
    """Starts `python tests/helpers.py spec_path` (see `drive`); stdout and stderr are piped."""
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), spec_path], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def run_driver(spec: dict, spec_path: str, env: dict, timeout: float = 600) -> str:
    """Runs the driver to completion; returns its output, raising with it on failure."""
    proc = start_driver(spec, spec_path, env)
    out, _ = proc.communicate(timeout=timeout)
    want = spec.get("expect_rc", 0)
    if proc.returncode != want:
        raise AssertionError(f"driver exited {proc.returncode} (expected {want}):\n{out[-6000:]}")
    return out


def drive(spec: dict) -> None:
    """One recorded training run described by `spec`: recipe, variant, overrides, workdir,
    record (output file), exit_at_step, compile_cache, and for multi-process runs
    coordinator/num_processes/process_id (jax.distributed over CPU collectives)."""
    import jax

    if spec.get("compile_cache"):
        jax.config.update("jax_compilation_cache_dir", spec["compile_cache"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    if spec.get("coordinator"):  # CPU collectives: JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo
        jax.distributed.initialize(coordinator_address=spec["coordinator"],
                                   num_processes=spec["num_processes"],
                                   process_id=spec["process_id"],
                                   initialization_timeout=120)
    from migjax import trainer
    from migjax.config_checks import validate

    c = make_config(spec["recipe"], spec["overrides"], spec.get("variant", "mig"))
    validate(c, jax.device_count())
    with recording(spec.get("exit_at_step")) as rec:
        summary = trainer.train(c, spec["workdir"])
    out = {k: v for k, v in rec.items() if k != "params"}
    out.update(summary=summary, process_index=jax.process_index(),
               device_count=jax.device_count(), local_device_count=jax.local_device_count())
    record = spec.get("record")
    if record:
        import numpy as np

        np.savez(record + ".npz", **rec["params"])
        with open(record, "w", encoding="utf-8") as f:
            json.dump(out, f)


if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as fh:
        drive(json.load(fh))
