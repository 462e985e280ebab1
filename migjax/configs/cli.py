"""The `--config` command line shared by the entry points: packaged recipes by name, evaluation
sets added as `--config.task.eval.NAME=kind:path`, one-line errors for unknown or ill-typed
settings (with the closest valid key), and the resolved config printed with base.py's comments."""

from __future__ import annotations

import difflib
import importlib.util
import os
import re

import ml_collections as mlc
from absl import flags
from ml_collections import config_flags

from migjax.config_checks import RENAMED
from migjax.configs import HERE, resolve, resolve_argv

_EVAL_FLAG = re.compile(r"^--config\.task\.eval\.([A-Za-z0-9_-]+)=(.*)$")


def load(spec: str) -> mlc.ConfigDict:
    """The config of `--config=SPEC` (a file path or packaged name, `:variant` optional)."""
    path, sep, variant = resolve(spec).partition(":")
    if not os.path.isfile(path):
        raise SystemExit(f"--config={spec}: no such config file or packaged recipe {path!r}")
    module_spec = importlib.util.spec_from_file_location("_migjax_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(*([variant] if sep else []))
    except ValueError as e:  # e.g. an unknown variant
        raise SystemExit(f"--config={spec}: {e}") from None


def dotted_keys(c: mlc.ConfigDict, prefix: str = "") -> list[str]:
    """Every setting's dotted key; an empty group (task.eval of the embedded task) is one."""
    out = []
    for k, v in c.items():
        nested = isinstance(v, mlc.ConfigDict) and len(v)
        out += dotted_keys(v, f"{prefix}{k}.") if nested else [prefix + k]
    return out


def _lookup(c, key: str):
    for part in key.split("."):
        if not isinstance(c, mlc.ConfigDict) or part not in c:
            raise KeyError(key)
        c = c[part]
    return c


def check_keys(c: mlc.ConfigDict, keys) -> None:
    """SystemExit naming the first key that is not a setting of `c`, and the closest one."""
    valid = dotted_keys(c)
    for key in keys:
        if key in RENAMED:
            raise SystemExit(f"--config.{key}: {RENAMED[key]}")
        try:
            _lookup(c, key)
        except KeyError:
            near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise SystemExit(f"--config.{key}: no such setting{hint}") from None


def split_eval_flags(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """argv without `--config.task.eval.NAME=kind:path` flags, and those flags as {NAME: spec}."""
    rest, evals = [], {}
    for arg in argv:
        m = _EVAL_FLAG.match(arg)
        if m:
            evals[m.group(1)] = m.group(2)
        else:
            rest.append(arg)
    return rest, evals


def parse(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS, *,
          help_string: str = "Config file or packaged recipe (NAME[:variant]).",
          ) -> tuple[mlc.ConfigDict | None, list[str]]:
    """Parses argv into `flag_values` (which holds the entry point's other flags) with a locked
    `--config`; returns (config, remaining args). Every error is one line (SystemExit)."""
    argv, evals = split_eval_flags(resolve_argv(argv))
    config_flag = config_flags.DEFINE_config_file("config", None, help_string,
                                                  flag_values=flag_values, lock_config=True,
                                                  sys_argv=argv)
    spec = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    base = None
    if spec is not None:
        base = load(spec)
        check_keys(base, [a.split("=", 1)[0][len("--config."):] for a in argv
                          if a.startswith("--config.")])
    try:
        rest = flag_values(argv)
    except flags.Error as e:
        raise SystemExit(_flag_error(str(e).splitlines()[0], base)) from None
    c = config_flag.value
    if c is not None and evals:
        with c.task.eval.unlocked():
            for name, value in evals.items():
                c.task.eval[name] = value
    return c, rest


def _flag_error(message: str, base) -> str:
    """absl's 'flag --config.a.b=v: reason' -> '--config.a.b=v: reason (a.b is a T, default D)'."""
    m = re.match(r"flag (--config\.([\w.]+)=[^:]*): (.*)", message)
    if not m or base is None:
        return message
    flag, key, reason = m.groups()
    try:
        default = _lookup(base, key)
    except KeyError:
        return f"{flag}: {reason}"
    kind = type(default).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{flag}: {reason} ({key} takes {article} {kind}; it is {default!r})"


# ----------------------------------------------------------------------------- printing


def comments(path: str = os.path.join(HERE, "base.py")) -> dict[str, str]:
    """{dotted key: comment} from base.py's `c.a.b = value  # comment` lines, a comment block
    just above a setting included."""
    out, block = {}, []
    setting = re.compile(r"^\s*c\.([\w.]+)\s*=\s*(.*?)(?:\s+#\s*(.*))?$")
    with open(path, encoding="utf-8") as f:
        for line in f:
            stripped = line.strip()
            if stripped.startswith("#"):
                block.append(stripped.lstrip("# "))
                continue
            m = setting.match(line)
            if m and (m.group(3) or block):
                out[m.group(1)] = " ".join(block + ([m.group(3)] if m.group(3) else []))
            block = []
    return out


def render(c: mlc.ConfigDict) -> str:
    """Every setting as `a.b = value  # comment`, in the config's order."""
    notes = comments()
    lines = []
    for key in dotted_keys(c):
        value = _lookup(c, key)
        value = {} if isinstance(value, mlc.ConfigDict) else value  # an empty group
        note = notes.get(key) or notes.get(key.rsplit(".", 1)[0], "")
        lines.append(f"{key} = {value!r}" + (f"  # {note}" if note else ""))
    return "\n".join(lines)
