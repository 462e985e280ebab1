"""User reward functions named in the config (`reward.custom`, "package.module:function"), with
TRL's signature `fn(prompts, completions, **columns) -> list[float]`, run in a worker process
that is killed when a call overruns its time limit. A function that raises, hangs or returns
something other than one number per completion gives 0 for the items it failed on, and those
are counted; it never stops the run.

Columns passed: `answer` (the first reference string), `references` (all of them), `prediction`
(the answer extracted from the completion, or None) and `correct` (1.0 or 0.0).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import select
import subprocess
import sys
import time
import weakref
from collections.abc import Sequence

import numpy as np

from migjax.rewards.verify import _kill

log = logging.getLogger(__name__)

_STARTUP_TIMEOUT_S = 60.0


def load_function(name: str, setting: str = "reward.custom"):
    """The callable named "package.module:function"; ValueError naming the setting otherwise."""
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{setting}={name!r}: expected 'package.module:function'")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except Exception as e:  # the user's module may fail in any way while importing
        raise ValueError(f"{setting}={name!r}: cannot import it ({type(e).__name__}: {e})"
                         ) from None
    if not callable(fn):
        raise ValueError(f"{setting}={name!r}: {type(fn).__name__} is not callable")
    return fn


def _values(out, n: int) -> list[float]:
    """The function's output as n floats (None counts as 0); ValueError if it is not that."""
    if isinstance(out, np.ndarray):
        out = out.tolist()
    if not isinstance(out, list | tuple) or len(out) != n:
        raise ValueError(f"expected a list of {n} floats, got {type(out).__name__}"
                         + (f" of length {len(out)}" if isinstance(out, list | tuple) else ""))
    vals = [0.0 if v is None else float(v) for v in out]
    if not all(math.isfinite(v) for v in vals):
        raise ValueError("a reward is not finite")
    return vals


def _serve(names: list[str]) -> None:
    """Worker loop: JSON requests on stdin, one JSON reply per line on the saved stdout."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # the functions' prints must not corrupt the reply stream
    try:
        fns = [load_function(n) for n in names]
    except ValueError as e:
        out.write(json.dumps({"ready": False, "error": str(e)}) + "\n")
        out.flush()
        return
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        try:
            req = json.loads(line)
            n = len(req["completions"])
            vals = _values(fns[req["fn"]](req["prompts"], req["completions"], **req["columns"]),
                           n)
            reply = {"values": vals}
        except Exception as e:  # every failure is reported, never fatal
            reply = {"error": f"{type(e).__name__}: {e}"[:500]}
        out.write(json.dumps(reply) + "\n")
        out.flush()


class CustomRewards:
    """`names[i]` weighted by `weights[i]`; `__call__` returns their weighted sum per completion.
    Each function is first called on the whole batch; if that fails, on each item alone. Every
    call has the time limit `timeout_s`. Counts: `n_failed` items, `n_timeouts` calls."""

    def __init__(self, names: Sequence[str], weights: Sequence[float], timeout_s: float = 2.0):
        if len(names) != len(weights):
            raise ValueError(f"reward.custom has {len(names)} functions but "
                             f"reward.custom_weights has {len(weights)} weights")
        for i, name in enumerate(names):
            load_function(name, f"reward.custom[{i}]")  # fail at start-up, in this process
        self.names, self.weights = tuple(names), tuple(float(w) for w in weights)
        self.timeout_s = float(timeout_s)
        self.n_failed = 0
        self.n_timeouts = 0
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._finalizer = weakref.finalize(self, _kill, None)

    @classmethod
    def from_config(cls, c) -> CustomRewards | None:
        if not c.reward.custom:
            return None
        return cls(tuple(c.reward.custom), tuple(c.reward.custom_weights),
                   c.reward.custom_timeout_s)

    def _start(self) -> None:
        boot = (f"import sys; sys.path[:] = {sys.path!r}; "
                f"from migjax.rewards.custom import _serve; _serve({list(self.names)!r})")
        self._proc = subprocess.Popen([sys.executable, "-c", boot], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, bufsize=0)
        self._buf = b""
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, self._proc)
        reply = self._read_line(_STARTUP_TIMEOUT_S)
        if not reply or not reply.get("ready"):
            self.close()
            raise RuntimeError("custom reward worker failed to start: "
                               + (reply or {}).get("error", "no reply"))

    def _read_line(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            ready = select.select([fd], [], [], remaining)[0] if remaining > 0 else []
            chunk = os.read(fd, 1 << 16) if ready else b""
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _call(self, i: int, prompts, completions, columns, timeout: float) -> list[float] | None:
        """The values of function i on these items, or None when it failed (then counted)."""
        if self._proc is None or self._proc.poll() is not None:
            self._start()
        msg = json.dumps({"fn": i, "prompts": list(prompts), "completions": list(completions),
                          "columns": columns}) + "\n"
        try:
            self._proc.stdin.write(msg.encode("utf-8"))
            reply = self._read_line(timeout)
        except (OSError, ValueError):
            reply = None
        if reply is None:  # hung or died: a new worker serves the next call
            self.n_timeouts += 1
            log.warning("reward.custom[%d]=%r: no reply within %.1fs", i, self.names[i], timeout)
            self.close()
            return None
        if "error" in reply:
            log.warning("reward.custom[%d]=%r failed: %s", i, self.names[i], reply["error"])
            return None
        return reply["values"]

    def __call__(self, prompts: Sequence[str], completions: Sequence[str],
                 **columns) -> np.ndarray:
        """r_custom_N = sum_i weights[i] * names[i](prompts, completions, **columns)."""
        n = len(completions)
        total_N = np.zeros((n,), np.float32)
        for i, w in enumerate(self.weights):
            vals = self._call(i, prompts, completions, columns, self.timeout_s)
            if vals is None:
                vals = []
                for j in range(n):
                    one = self._call(i, prompts[j:j + 1], completions[j:j + 1],
                                     {k: v[j:j + 1] for k, v in columns.items()}, self.timeout_s)
                    self.n_failed += one is None
                    vals.append(0.0 if one is None else one[0])
            total_N += w * np.asarray(vals, np.float32)
        return total_N

    def close(self) -> None:
        _kill(self._proc)
        self._proc, self._buf = None, b""
