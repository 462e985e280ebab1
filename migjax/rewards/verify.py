"""Outcome reward on the host: answer extraction, number normalisation, equivalence checking
with a hard per-item time limit, and the format reward."""

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
from fractions import Fraction

import numpy as np

log = logging.getLogger(__name__)

_MAX_FRACTION_DIGITS = 1000  # longer literals are compared as canonical strings, never as ints
_MAX_ALT_DENOMINATOR = 10  # a decimal answer gets a fraction variant only up to this
_MAX_SLOW_CHARS = 20_000  # longer predictions are never sent to the symbolic checker
_STARTUP_TIMEOUT_S = 120.0
_WORKER_MEMORY_BYTES = 4 << 30  # address-space cap of the worker process
_MAX_START_FAILURES = 3


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the `\\boxed` whose name ends at `start`: balanced `{...}` or a bare token."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip() or None
            j += 1
        return None
    if i > start:  # `\boxed 5`: the token after the space
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in re.finditer(r"\\boxed(?![A-Za-z])", text)]
    for start in reversed(starts):
        content = _boxed_content(text, start)
        if content:
            return content
    return None


def _tagged(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the last open/close pair, or None when the tags are absent or unbalanced."""
    if not open_tag or not close_tag:
        return None
    pattern = f"({re.escape(open_tag)})|{re.escape(close_tag)}"
    tokens = list(re.finditer(pattern, text))
    if not tokens:
        return None
    for i, m in enumerate(tokens):
        if (m.group(1) is not None) != (i % 2 == 0):
            return None
    if len(tokens) % 2:
        return None
    content = text[tokens[-2].end() : tokens[-1].start()].strip()
    if "\\boxed" in content:
        content = _last_boxed(content) or content
    return content or None


def extract_answer(
    text: str, *, answer_open: str = "<answer>", answer_close: str = "</answer>"
) -> str | None:
    """The final answer in `text`: the last tagged answer, else the last `\\boxed`, else the
    text after the last `####`; None when none is found. Never raises."""
    if not isinstance(text, str) or not text:
        return None
    ans = _tagged(text, answer_open, answer_close)
    if ans is not None:
        return ans
    ans = _last_boxed(text)
    if ans is not None:
        return ans
    k = text.rfind("####")
    if k >= 0:
        rest = text[k + 4 :].split("\n", 1)[0].strip()
        return rest or None
    return None


_DEC_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_TEX_FRAC_RE = re.compile(
    r"([+-]?)\\[dt]?frac(?:\{\s*([+-]?\d+)\s*\}\{\s*([+-]?\d+)\s*\}|(\d)(\d))"
)
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def _clean(s: str) -> str:
    """Strip math delimiters, currency, percent, degree marks and thousands separators."""
    s = s.strip()
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2].strip()
    for tok in ("\\!", "\\,", "\\;", "\\ ", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ"):
        s = s.replace(tok, "")
    s = s.replace("{,}", ",").strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    m = re.fullmatch(r"([+-]?)\(\s*([+-]?)(\d[\d.]*(?:\s*/\s*\d+)?)\s*\)", s)  # -(1/3)
    if m:
        s = ("-" if (m.group(1) == "-") != (m.group(2) == "-") else "") + m.group(3)
    return re.sub(r"\s+", " ", s).strip()


def _big_decimal(s: str) -> str:
    """Canonical string of a decimal literal too long to convert to an int."""
    sign = "-" if s.startswith("-") else ""
    body = s.lstrip("+-")
    whole, _, frac = body.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "0" if out == "0" else sign + out


def _parse(s: str) -> Fraction | str | None:
    """A number as an exact Fraction (or canonical string when huge); None if not a number."""
    c = _clean(s)
    if _DEC_RE.fullmatch(c):
        if len(c) > _MAX_FRACTION_DIGITS:
            return _big_decimal(c)
        return Fraction(c)
    m = _FRAC_RE.fullmatch(c)
    parts: tuple[str, str, str] | None = None
    if m:
        parts = ("", m.group(1), m.group(2))
    else:
        m = _TEX_FRAC_RE.fullmatch(c)
        if m:
            parts = (m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5))
    if parts is None or len(parts[1]) + len(parts[2]) > _MAX_FRACTION_DIGITS:
        return None
    num, den = int(parts[1]), int(parts[2])
    if den == 0:
        return None
    value = Fraction(num, den)
    return -value if parts[0] == "-" else value


def _decimal_str(value: Fraction) -> str | None:
    """Exact decimal string of `value`, or None when its expansion does not terminate."""
    den, k2, k5 = value.denominator, 0, 0
    while den % 2 == 0:
        den, k2 = den // 2, k2 + 1
    while den % 5 == 0:
        den, k5 = den // 5, k5 + 1
    if den != 1:
        return None
    k = max(k2, k5)
    scaled = abs(value.numerator) * 10**k // value.denominator
    digits = str(scaled).rjust(k + 1, "0")
    whole, frac = digits[: len(digits) - k], digits[len(digits) - k :].rstrip("0")
    sign = "-" if value < 0 else ""
    return sign + whole + ("." + frac if frac else "")


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return _decimal_str(value) or f"{value.numerator}/{value.denominator}"


def normalize_number(s: str) -> str:
    """Canonical string of a numeric answer ("1,000" -> "1000", "3.0" -> "3", "$5" -> "5",
    "50%" -> "50", "\\frac{1}{2}" -> "0.5", "2/3" -> "2/3"); other text comes back cleaned."""
    value = _parse(s)
    if value is None:
        return _clean(s)
    return value if isinstance(value, str) else _canonical(value)


def answer_variants(raw: str) -> tuple[str, ...]:
    """Equivalent reference strings for one answer: its own (cleaned) form first, then a
    short alternative form of a non-integer number (`"1/2"` -> `("1/2", "0.5")`,
    `"1.25"` -> `("1.25", "5/4")`); alternatives longer than that are left out."""
    raw = raw.strip()
    value = _parse(raw)
    if not isinstance(value, Fraction):
        return (normalize_number(raw),) if isinstance(value, str) else (raw,)
    out = [raw] if "\\" in _clean(raw) else []
    if value.denominator == 1:
        out.append(str(value.numerator))
    else:
        frac, dec = f"{value.numerator}/{value.denominator}", _decimal_str(value)
        short_dec = dec if dec is not None and len(dec.partition(".")[2]) <= 4 else None
        short_frac = frac if value.denominator <= _MAX_ALT_DENOMINATOR else None
        if "/" in raw or "frac" in raw:
            out.extend(f for f in (frac, short_dec) if f is not None)
        else:
            out.extend(f for f in (dec, short_frac) if f is not None)
    return tuple(dict.fromkeys(out))


def _numbers_equal(a: Fraction | str, b: Fraction | str) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or abs(a - b) <= Fraction(1, 10**6) * max(abs(a), abs(b))
    return isinstance(a, str) and a == b


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
        """True when `pred` is equivalent to any reference string."""
        if not isinstance(pred, str) or not pred.strip() or not refs:
            return False
        refs = [r for r in refs if isinstance(r, str) and r.strip()]
        p_clean = _clean(pred)
        if p_clean and any(p_clean == _clean(r) for r in refs):
            return True
        p_num = _parse(pred)
        if p_num is not None:
            r_nums = [_parse(r) for r in refs]
            if any(r is not None and _numbers_equal(p_num, r) for r in r_nums):
                return True
            if all(r is not None for r in r_nums):
                return False
        if len(pred) > _MAX_SLOW_CHARS or not refs:
            return False
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


def format_reward(
    text: str,
    *,
    think_open: str = "<think>",
    think_close: str = "</think>",
    answer_open: str = "<answer>",
    answer_close: str = "</answer>",
    step_regex: str = r"(?m)^Step \d+:",
) -> float:
    """1.0 when `text` is exactly one think block holding at least one step, then one
    non-empty answer block, with only whitespace around them; else 0.0."""
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
    if not answer.strip() or re.search(step_regex, think) is None:
        return 0.0
    return 1.0


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
