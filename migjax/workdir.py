"""What guards a run's directory: one run at a time (a lock), the provenance recorded in
`config.json`, and the refusal to resume a workdir under a different config."""

from __future__ import annotations

import fcntl
import fnmatch
import json
import os
import subprocess
import sys

LOCK_FILE = ".lock"
PROVENANCE_KEY = "provenance"  # the top-level key of config.json that is not part of the config
PACKAGES = ("jax", "flax", "optax", "orbax-checkpoint", "transformers", "numpy")
# Fields a resumed run may change: they alter how long it runs, what it measures and what it
# writes, and how it computes (the attention kernel: a run started on a CPU resumes on a GPU
# with cuDNN; rematerialisation and the log-prob chunk, which trade memory for time: a run
# killed for memory resumes with less), not what it trains. Any other difference from the
# workdir's config.json is refused.
RESUMABLE = ("rl.steps", "eval.*", "log.*", "checkpoint.export_hf", "checkpoint.keep",
             "checkpoint.async_save", "checkpoint.every", "warmstart.checkpoint_every",
             "model.attn_impl", "model.remat", "model.remat_policy", "rl.score_chunk",
             "debug.*")


class WorkdirBusyError(RuntimeError):
    pass


class ConfigMismatchError(ValueError):
    pass


def lock(workdir: str):
    """Takes the workdir's lock (an flock on WORKDIR/.lock, which the kernel releases when the
    process exits or dies) and writes this process's pid into it; returns the open lock file,
    held until it is closed. Raises WorkdirBusyError naming the workdir and the holder's pid."""
    os.makedirs(workdir, exist_ok=True)
    f = open(os.path.join(workdir, LOCK_FILE), "a+", encoding="utf-8")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise WorkdirBusyError(f"workdir {workdir} is in use by another run (pid {holder}); "
                               "wait for it to end or use another --workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def _git(args: list[str], cwd: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def provenance() -> dict:
    """Where a run comes from: the git commit and dirty flag of the migjax checkout (absent when
    migjax is not run from one), package versions, the command line and the devices."""
    from importlib import metadata

    import jax

    out = {"command": list(sys.argv), "versions": {}}
    for name in PACKAGES:
        try:
            out["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    devices = jax.devices()
    out["devices"] = {"platform": devices[0].platform, "kind": devices[0].device_kind,
                      "count": len(devices), "processes": jax.process_count()}
    src = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commit = _git(["rev-parse", "HEAD"], src)
    if commit:
        status = _git(["status", "--porcelain", "--untracked-files=no"], src)
        out["git"] = {"commit": commit, "dirty": bool(status)}
    return out


def config_record(c) -> dict:
    """The resolved config as the JSON object config.json holds (provenance aside)."""
    return json.loads(c.to_json_best_effort())


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: dict, new: dict, defaults: dict | None = None) -> list[str]:
    """Dotted keys that differ between two config records, outside RESUMABLE. A key the old
    record lacks (it was written before the key existed) is no change when the new record holds
    its default from `defaults` (a config record): the old run behaved as the default says."""
    a, b = _flatten(old), _flatten(new)
    d = _flatten(defaults or {})
    return [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")
            and not (k not in a and k in d and b.get(k) == d[k])
            and not any(fnmatch.fnmatchcase(k, p) for p in RESUMABLE)]


def check_resume(workdir: str, record: dict) -> None:
    """Refuses to run in a workdir whose config.json holds another config (ConfigMismatchError
    naming the differing keys); fields in RESUMABLE may change."""
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        old = json.load(f)
    old.pop(PROVENANCE_KEY, None)
    from migjax.configs.base import get_config  # the defaults of keys added since

    changed = config_changes(old, record, config_record(get_config()))
    if changed:
        a, b = _flatten(old), _flatten(record)
        diffs = ", ".join(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
                          for k in changed[:6])
        more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
        raise ConfigMismatchError(
            f"{path} holds another config ({diffs}{more}); resuming may change only "
            f"{', '.join(RESUMABLE)}: use another --workdir")


def write_config(workdir: str, c) -> None:
    """Writes WORKDIR/config.json: the resolved config and its provenance."""
    from migjax.checkpointing import atomic_write_json

    atomic_write_json(os.path.join(workdir, "config.json"),
                      {**config_record(c), PROVENANCE_KEY: provenance()})
