"""Training metrics on disk: a JSON-lines log, TensorBoard scalars and sample tables.

`workdir/metrics.jsonl` holds one JSON object per logged step:

    {"step": 12, "time": 1760000000.5, "reward/correct": 0.25, "loss/total": null, ...}

`time` is wall time in seconds since the epoch. Values are floats; NaN and +-Inf are
written as `null` (so every line is strict JSON) and read back as NaN. The evaluation after
training is one record marked `"final": true`, at step `rl.steps` beside that step's training
record; a resumed run drops it (it evaluates again at its own end), so every record appears
once: one per logged step, plus the final evaluation last.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"
WANDB_ID_FILE = "wandb_run_id"
RESERVED = ("step", "time", "final")


def _to_float(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r} has non-numeric value {value!r}") from e


def _json_value(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
    if not isinstance(record, dict) or "step" not in record:
        raise ValueError(f"{where}: expected an object with a 'step' field")
    return {k: (math.nan if v is None else v) for k, v in record.items()}


def _read_lines(path: str) -> list[tuple[str, dict]]:
    """(raw line, record) pairs of a metrics file; a truncated last line is skipped."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    out = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            out.append((line, _parse_line(line, f"{path}:{lineno}")))
        except ValueError:
            if lineno == len(lines):  # no trailing newline: cut short by a crash
                continue
            raise
    return out


def read_metrics(path_or_dir: str | os.PathLike) -> list[dict]:
    """Reads a metrics.jsonl file (or `DIR/metrics.jsonl`), skipping a truncated last line."""
    path = os.fspath(path_or_dir)
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no metrics file at {path}")
    return [record for _, record in _read_lines(path)]


class WandbWriter:
    """Scalars to a Weights & Biases run (the `wandb` package, imported only here). The run's
    id is kept in `workdir/wandb_run_id`, so a resumed run continues the same W&B run. W&B
    cannot rewrite history: steps logged again after a restart keep their first values there;
    metrics.jsonl is the record."""

    def __init__(self, workdir: str, *, project: str, config: Mapping[str, Any] | None = None):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("log.wandb=True needs the wandb package (pip install wandb)") from e
        id_path = os.path.join(workdir, WANDB_ID_FILE)
        if os.path.isfile(id_path):
            with open(id_path, encoding="utf-8") as f:
                run_id = f.read().strip()
        else:
            from migjax.checkpointing import atomic_write_text

            run_id = secrets.token_hex(8)
            atomic_write_text(id_path, run_id + "\n")
        self._run = wandb.init(project=project, name=os.path.basename(os.path.abspath(workdir)),
                               id=run_id, resume="allow", dir=workdir,
                               config=dict(config or {}))

    def write(self, step: int, values: Mapping[str, float]) -> None:
        self._run.log(dict(values), step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


class MetricsWriter:
    """Appends metrics to `workdir/metrics.jsonl` (or `filename`) and, optionally, TensorBoard event files and
    a Weights & Biases run (`wandb`: the W&B project and config; None: off)."""

    def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True,
                 wandb: Mapping[str, Any] | None = None, filename: str = METRICS_FILE):
        self.workdir = os.fspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.path = os.path.join(self.workdir, filename)
        self._tensorboard = tensorboard
        self._tb = None
        self._wandb = None if wandb is None else WandbWriter(self.workdir, **wandb)
        self._drop_truncated_tail()
        self._file = open(self.path, "a", encoding="utf-8")

    def _drop_truncated_tail(self) -> None:
        """Cuts a partial last line (a crash mid-write) so appends start on a fresh line."""
        if not os.path.isfile(self.path):
            return
        with open(self.path, "rb+") as f:
            data = f.read()
            if data and not data.endswith(b"\n"):
                f.truncate(data.rfind(b"\n") + 1)

    def _tb_writer(self, purge_step: int | None = None):
        if not self._tensorboard:
            return None
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # Event file names carry whole seconds only; the suffix keeps a writer reopened
            # within the same second from overwriting the previous file, in time order.
            self._tb = SummaryWriter(
                logdir=os.path.join(self.workdir, TB_DIR), purge_step=purge_step,
                filename_suffix=f".{time.time_ns()}")
        return self._tb

    def write(self, step: int, metrics: Mapping[str, Any], *, final: bool = False) -> None:
        """Logs `metrics` for `step` as one JSON line (flushed) and TensorBoard scalars;
        `final` marks the evaluation after training."""
        if any(k in metrics for k in RESERVED):
            raise ValueError(f"metric names {RESERVED} are reserved")
        values = {str(k): _to_float(str(k), v) for k, v in metrics.items()}
        record = {"step": int(step), "time": time.time(), **({"final": True} if final else {})}
        record.update({k: _json_value(v) for k, v in values.items()})
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        self._file.flush()
        tb = self._tb_writer()
        if tb is not None:
            for k, v in values.items():
                tb.add_scalar(k, v, global_step=int(step))
            tb.flush()
        if self._wandb is not None:
            self._wandb.write(step, values)

    def resume(self, step: int) -> None:
        """Keeps only records with `step <= step`, the final evaluation's dropped (after a
        restart from checkpoint `step`; -1 drops every record)."""
        from migjax.checkpointing import atomic_write_text  # keeps this module free of orbax

        self._file.close()
        kept = [line + "\n" for line, record in _read_lines(self.path)
                if record["step"] <= step and not record.get("final")]
        atomic_write_text(self.path, "".join(kept))
        self._file = open(self.path, "a", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        # TensorBoard hides the events past `step` logged by the interrupted run.
        self._tb_writer(purge_step=int(step) + 1)

    def close(self) -> None:
        """Flushes and closes the metrics file and the TensorBoard writer."""
        if not self._file.closed:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.close()
            self._wandb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def is_rate(key: str) -> bool:
    """Whether an evaluation key (`eval/<set>/<name>` or `<name>`) is a rate, not its standard
    error or problem count."""
    name = key.rsplit("/", 1)[-1]
    return name.startswith(("pass_at_", "mean_at_")) and not name.endswith("_se")


_LINE_BREAK = re.compile("\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # left after line breaks and tabs: dropped


def _cell(value: Any, max_width: int) -> str:
    if isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        text = f"{float(value):.4g}"  # floats, numpy floats
    else:
        text = str(value)
    text = _CONTROL.sub("", _LINE_BREAK.sub("⏎", text).replace("\t", " "))
    if len(text) > max_width:
        text = text[: max_width - 1] + "…"
    return text


def format_sample_table(rows: Sequence[Mapping[str, Any]], columns: Iterable[str],
                        *, max_width: int = 60) -> str:
    """A plain-text table of sampled completions; newlines shown as ⏎, long cells cut with …."""
    if max_width < 2:
        raise ValueError(f"max_width must be >= 2, got {max_width}")
    columns = list(columns)
    cells = [[_cell(row.get(c, ""), max_width) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]

    def line(parts: Sequence[str]) -> str:
        return " | ".join(p.ljust(w) for p, w in zip(parts, widths, strict=True)).rstrip()

    out = [line(columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


class Timer:
    """Measures wall time of a block: `with Timer() as t: ...; t.seconds`, `t.rate(tokens)`."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._start: float | None = None

    def __enter__(self) -> Timer:
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._start

    def rate(self, count: float) -> float:
        """`count` per second over the measured block (0 when nothing was measured)."""
        return float(count) / self.seconds if self.seconds > 0 else 0.0
