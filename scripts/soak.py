"""Soak test: runs a config for many RL steps and reports memory growth and recompilations.

    python scripts/soak.py --steps 500 --workdir /tmp/soak [--config=configs/arith_tiny.py] \
        [--config.rl.batch_prompts=4 ...]

Prints one JSON object (also written to WORKDIR/soak.json):

    {"steps": 500,
     "rss_mib_at": {"50": {"peak": ..., "current": ...}, "250": {...}, "500": {...}},
     "recompilations_after_first_step": {"jit_update": 0, ...},
     "compiles_before_first_step": 23, "sec_per_step": ..., "wall_s": ...}

Memory is sampled when metrics.jsonl first logs a step at or past 10%, 50% and 100% of the run
(steps 50, 250, 500 of a 500-step run): `peak` is the process's maximum resident set
(getrusage), `current` its resident set then (psutil). Compilations come from JAX's compile log
(`jax_log_compiles`); any program lowered after step 1 was logged is listed by name. A healthy
run shows a flat `current` after the first point and no recompilations of the jitted stages
(sample, score_steps, update); one-off programs first used later (e.g. at the first sample
table) show up with a count of 1.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import sys
import threading
import time

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/arith_tiny.py",
                                          "Config file (configs/*.py[:variant]).",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", 500, "RL steps to run (sets rl.steps).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; must not hold an earlier run.")
_POLL_S = flags.DEFINE_float("poll_s", 0.2, "How often the memory sampler reads metrics.jsonl.")

POINTS = (0.1, 0.5, 1.0)  # fractions of the run at which memory is sampled
COMPILE_LOGGER = "jax._src.interpreters.pxla"


def sample_steps(steps: int) -> list[int]:
    """The steps at which memory is sampled: 10%, 50% and 100% of the run (at least step 1)."""
    return sorted({max(1, round(steps * f)) for f in POINTS})


def last_rl_step(metrics_path: str) -> int:
    """The largest step of an RL line in metrics.jsonl (0 before the first)."""
    try:
        with open(metrics_path, encoding="utf-8") as f:
            lines = f.read().split("\n")[:-1]  # a line still being written has no newline
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "reward/correct" in record:
            steps.append(int(record["step"]))
    return max(steps)


def rss_mib() -> dict[str, float]:
    """{"peak": maximum resident set so far, "current": resident set now}, in MiB."""
    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_bytes = peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
    return {"peak": round(peak_bytes / 2**20, 1),
            "current": round(psutil.Process().memory_info().rss / 2**20, 1)}


class CompileCounter(logging.Handler):
    """Counts JAX's "Compiling <name> ..." records, split at the first logged RL step."""

    def __init__(self, metrics_path: str):
        super().__init__(level=logging.DEBUG)
        self.metrics_path = metrics_path
        self.before: dict[str, int] = {}
        self.after: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if not msg.startswith("Compiling "):
            return
        name = str(record.args[0]) if record.args else msg.split()[1]
        bucket = self.after if last_rl_step(self.metrics_path) >= 1 else self.before
        bucket[name] = bucket.get(name, 0) + 1


class MemorySampler(threading.Thread):
    """Samples `rss_mib()` the first time metrics.jsonl reaches each of `points`."""

    def __init__(self, metrics_path: str, points: list[int], poll_s: float):
        super().__init__(daemon=True)
        self.metrics_path, self.points, self.poll_s = metrics_path, list(points), poll_s
        self.samples: dict[str, dict[str, float]] = {}
        self.first_step_time: float | None = None
        self.last_step_time: float | None = None
        self._done = threading.Event()

    def poll(self) -> None:
        step = last_rl_step(self.metrics_path)
        if step >= 1 and self.first_step_time is None:
            self.first_step_time = time.time()
        for p in self.points:
            if step >= p and str(p) not in self.samples:
                self.samples[str(p)] = rss_mib()
                if p == self.points[-1]:
                    self.last_step_time = time.time()

    def run(self) -> None:
        while not self._done.wait(self.poll_s):
            self.poll()

    def stop(self) -> None:
        self._done.set()
        self.join()
        self.poll()


def soak(c, workdir: str, poll_s: float = 0.2) -> dict:
    """Runs `c` in `workdir` with the compile counter and memory sampler; returns the summary."""
    import jax

    from migjax import trainer
    from migjax.checkpointing import atomic_write_json
    from migjax.config_checks import validate

    metrics_path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(metrics_path) or os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise ValueError(f"{workdir} holds an earlier run; a soak test starts from scratch")
    validate(c, jax.device_count())
    jax.config.update("jax_log_compiles", True)
    counter = CompileCounter(metrics_path)
    compile_log = logging.getLogger(COMPILE_LOGGER)
    compile_log.addHandler(counter)
    compile_log.propagate = False  # counted here, not printed
    sampler = MemorySampler(metrics_path, sample_steps(c.rl.steps), poll_s)
    t0 = time.time()
    sampler.start()
    try:
        trainer.train(c, workdir)
    finally:
        sampler.stop()
        compile_log.removeHandler(counter)
        compile_log.propagate = True
        jax.config.update("jax_log_compiles", False)
    steps_timed = sample_steps(c.rl.steps)[-1] - 1
    span = (sampler.last_step_time or time.time()) - (sampler.first_step_time or t0)
    summary = {
        "steps": c.rl.steps,
        "rss_mib_at": sampler.samples,
        "recompilations_after_first_step": dict(sorted(counter.after.items())),
        "compiles_before_first_step": sum(counter.before.values()),
        "sec_per_step": round(span / max(steps_timed, 1), 4),
        "wall_s": round(time.time() - t0, 1),
    }
    atomic_write_json(os.path.join(workdir, "soak.json"), summary)
    return summary


def main(argv):
    del argv
    c = _CONFIG.value
    c.rl.steps = _STEPS.value
    c.log.progress = False
    absl_logging.set_verbosity(absl_logging.WARNING)
    print(json.dumps(soak(c, _WORKDIR.value, _POLL_S.value), indent=1))


if __name__ == "__main__":
    flags.mark_flags_as_required(["workdir"])
    app.run(main)
