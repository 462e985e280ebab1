"""Outcome reward on the host: equivalence checking with a hard per-item time limit (answers
as text live in `migjax.rewards.answers`), and the format reward."""

from __future__ import annotations

import json
import logging
import math
import os
import re
import resource
import select
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Sequence

import numpy as np

from migjax.rewards.answers import clean, extract_answer, numbers_equal, parse_number
from migjax.rewards.segment import body_step_spans

log = logging.getLogger(__name__)

_MAX_SLOW_CHARS = 20_000  # longer predictions are never sent to the symbolic checker
_STARTUP_TIMEOUT_S = 120.0
_WORKER_MEMORY_BYTES = 4 << 30  # address-space cap of the worker process
_MAX_START_FAILURES = 3


def _mv_parse(s: str, parse):
    """math_verify parse, wrapping bare LaTeX in `$...$` so it is read as one expression."""
    delimited = any(t in s for t in ("$", "\\boxed", "\\[", "\\("))
    first, second = (s, f"${s}$") if delimited else (f"${s}$", s)
    return parse(first, parsing_timeout=None) or parse(second, parsing_timeout=None)


def _serve(cpu_per_item_s: int) -> None:
    """Worker loop: JSON requests on stdin, one JSON reply per line on the saved stdout.
    Each item gets a CPU-time cap so that even an orphaned worker stuck in C code dies."""
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints must not corrupt the reply stream
    logging.disable(logging.WARNING)
    resource.setrlimit(resource.RLIMIT_AS, (_WORKER_MEMORY_BYTES, _WORKER_MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    hard_cpu = resource.getrlimit(resource.RLIMIT_CPU)[1]
    from math_verify import parse, verify

    for gold, pred in (("\\frac{\\sqrt{3}}{2}", "\\sqrt{3}/2"), ("(1, 2)", "x = 0.5")):
        verify(_mv_parse(gold, parse), _mv_parse(pred, parse), timeout_seconds=None)  # warm-up
    out.write('{"ready": true}\n')
    out.flush()
    for line in sys.stdin:
        ok, err = False, None
        used = resource.getrusage(resource.RUSAGE_SELF)
        soft = int(used.ru_utime + used.ru_stime) + cpu_per_item_s
        if hard_cpu == resource.RLIM_INFINITY or soft <= hard_cpu:
            resource.setrlimit(resource.RLIMIT_CPU, (soft, hard_cpu))
        try:
            req = json.loads(line)
            target = _mv_parse(req["pred"], parse)
            for ref in req["refs"]:
                gold = _mv_parse(ref, parse)
                if gold and target and verify(gold, target, timeout_seconds=None):
                    ok = True
                    break
        except Exception as e:  # every failure is reported, never fatal
            err = f"{type(e).__name__}: {e}"[:500]
        out.write(json.dumps({"ok": ok, "error": err}) + "\n")
        out.flush()


_BOOT = (
    "import sys; sys.path.insert(0, {root!r}); "
    "from migjax.rewards.verify import _serve; _serve({cpu})"
)


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    if proc is not None:
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class Verifier:
    """Checks predicted answers against reference strings: exact/numeric fast path on the
    host, math_verify in a persistent worker process that is killed when an item overruns
    `timeout_s`. Thread-safe; failures and timeouts count as False."""

    def __init__(self, timeout_s: float = 2.0):
        self.timeout_s = float(timeout_s)
        self.n_timeouts = 0
        self.n_errors = 0
        self.n_slow = 0  # items that needed the symbolic checker
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._buf = b""
        self._start_failures = 0
        self._finalizer = weakref.finalize(self, _kill, None)

    def _start(self) -> bool:
        if self._start_failures >= _MAX_START_FAILURES:
            return False
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT.format(root=root, cpu=math.ceil(2 * self.timeout_s) + 5)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        self._proc, self._buf = proc, b""
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill, proc)
        try:
            reply = self._read_line(_STARTUP_TIMEOUT_S)
        except (OSError, ValueError):
            reply = None
        if reply is None or not reply.get("ready"):
            self._start_failures += 1
            log.error("math_verify worker failed to start (attempt %d)", self._start_failures)
            self._stop()
            return False
        self._start_failures = 0
        return True

    def _stop(self) -> None:
        _kill(self._proc)
        self._proc, self._buf = None, b""

    def _read_line(self, timeout: float) -> dict | None:
        """One JSON reply from the worker; None on timeout or worker death."""
        deadline = time.monotonic() + timeout
        fd = self._proc.stdout.fileno()
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def _slow(self, pred: str, refs: Sequence[str]) -> bool:
        with self._lock:
            self.n_slow += 1
            if (self._proc is None or self._proc.poll() is not None) and not self._start():
                self.n_errors += 1
                return False
            msg = json.dumps({"pred": pred, "refs": list(refs)}) + "\n"
            try:
                self._proc.stdin.write(msg.encode("utf-8"))
                reply = self._read_line(self.timeout_s)
            except (OSError, ValueError) as e:
                log.warning("math_verify worker failed: %s", e)
                self.n_errors += 1
                self._stop()
                return False
            if reply is None:
                alive = self._proc.poll() is None
                self._stop()
                if alive:
                    self.n_timeouts += 1
                    log.warning("verification timed out after %.1fs: %.80r", self.timeout_s, pred)
                else:
                    self.n_errors += 1
                return False
            if reply.get("error"):
                self.n_errors += 1
            return bool(reply.get("ok"))

    def verify(self, pred: str | None, refs: Sequence[str]) -> bool:
        """True when `pred` is equivalent to any reference string. Visual answers: a number
        word up to twenty equals its digits ("three" and "3"), and against a single-letter
        reference (a multiple-choice option) "(B)", "B.", "B)" and "B. the red one" read as
        "B"."""
        if not isinstance(pred, str) or not pred.strip() or not refs:
            return False
        refs = [r for r in refs if isinstance(r, str) and r.strip()]
        pred = visual_form(pred, refs)
        p_clean = clean(pred)
        if p_clean and any(p_clean == clean(r) for r in refs):
            return True
        p_num = parse_number(pred)
        if p_num is not None:
            r_nums = [parse_number(r) for r in refs]
            if any(r is not None and numbers_equal(p_num, r) for r in r_nums):
                return True
            if all(r is not None for r in r_nums):
                return False
        if len(pred) > _MAX_SLOW_CHARS or not refs:
            return False
        if all(_WORDS.fullmatch(r.strip()) for r in refs):
            # word answers (yes/no, colours, choices): math_verify would read "on" as the
            # product o*n and accept it for "no"; words compare as words, ignoring case
            words = lambda s: " ".join(s.strip().rstrip(".").lower().split())
            return any(words(pred) == words(r) for r in refs)
        return self._slow(pred, refs)

    def verify_batch(
        self, preds: Sequence[str | None], refs_list: Sequence[Sequence[str]]
    ) -> list[bool]:
        """`verify` for each (prediction, references) pair."""
        if len(preds) != len(refs_list):
            raise ValueError(f"verify_batch: {len(preds)} predictions but {len(refs_list)} refs")
        return [self.verify(p, r) for p, r in zip(preds, refs_list, strict=True)]

    def close(self) -> None:
        """Stops the worker process (a later slow-path call starts a new one)."""
        with self._lock:
            self._stop()

    def __enter__(self) -> Verifier:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_WORDS = re.compile(r"[A-Za-z]+(?: [A-Za-z]+)*")


NUMBER_WORDS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                "fourteen fifteen sixteen seventeen eighteen nineteen twenty").split()
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?(?:[.):]|\s|$)")


def visual_form(pred: str, refs: Sequence[str]) -> str:
    """`pred` with a number word as its digits, or a multiple-choice option as its letter
    when every reference is one letter."""
    word = pred.strip().rstrip(".").lower()
    if word in NUMBER_WORDS:
        return str(NUMBER_WORDS.index(word))
    if refs and all(len(r.strip()) == 1 and r.strip().isalpha() for r in refs):
        m = _CHOICE.match(pred.strip())
        if m:
            return m.group(1)
    return pred


def format_reward(
    text: str,
    *,
    think_open: str = "<think>",
    think_close: str = "</think>",
    answer_open: str = "<answer>",
    answer_close: str = "</answer>",
    delimiter: str = "step",
    step_regex: str | None = None,
) -> float:
    """1.0 when `text` is exactly one think block holding at least one step, then one
    non-empty answer block, with only whitespace around them; else 0.0.

    A step is what segmentation (`mig.step_delimiter`) calls one: a `Step <n>:` line for
    "step", a non-blank line for "newline" and "blank_line"; `step_regex`, when given, replaces
    that rule with "the think block matches this regex"."""
    tags = (think_open, think_close, answer_open, answer_close)
    if not isinstance(text, str) or not all(tags):
        return 0.0
    s = text.strip()
    if not (s.startswith(think_open) and s.endswith(answer_close)):
        return 0.0
    end_think = s.find(think_close, len(think_open))
    if end_think < 0:
        return 0.0
    think = s[len(think_open) : end_think]
    rest = s[end_think + len(think_close) :].lstrip()
    if not rest.startswith(answer_open) or len(rest) < len(answer_open) + len(answer_close):
        return 0.0
    answer = rest[len(answer_open) : len(rest) - len(answer_close)]
    if any(t in think or t in answer for t in tags):
        return 0.0
    if not answer.strip():
        return 0.0
    if step_regex is not None:
        has_step = re.search(step_regex, think) is not None
    else:
        has_step = bool(body_step_spans(think, delimiter))
    return 1.0 if has_step else 0.0


def outcome_rewards(
    texts: Sequence[str],
    refs_list: Sequence[Sequence[str]],
    verifier: Verifier,
    **format_kw,
) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """Correctness and format rewards for N completion texts, plus the extracted answers."""
    answer_kw = {k: format_kw[k] for k in ("answer_open", "answer_close") if k in format_kw}
    preds = [extract_answer(t, **answer_kw) for t in texts]
    r_correct_N = np.asarray(verifier.verify_batch(preds, refs_list), dtype=np.float32)
    r_format_N = np.asarray([format_reward(t, **format_kw) for t in texts], dtype=np.float32)
    return r_correct_N, r_format_N, preds
