"""Sweeps as code: a sweep file (`experiments/sweeps/*.py`) defines `SWEEP = Sweep(...)`, a
recipe, its regimes and a list of points built with `grid` (the product of axes) and `zipped`
(axes in lock step). `python -m experiments.launch` runs it; `python -m experiments.report`
tabulates it.

A point is a dict. Three keys are special: `regime` (a name in `Sweep.regimes`, whose overrides
apply to the warm start and to RL), `variant` (`configs/base.py: VARIANTS`) and `seed` (the RL
seed: every point of a regime starts from the same warm start, trained once with the recipe's
own seed). Any other key is a dotted config override (`"optim.lr": 1e-4`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import sys

SPECIAL = ("regime", "variant", "seed")


def grid(**axes) -> list[dict]:
    """Every combination of the axes' values, the first axis slowest:
    grid(variant=["mig", "grpo_matched"], seed=range(2)) -> 4 points."""
    names = list(axes)
    values = [list(v) if isinstance(v, list | tuple | range) else [v] for v in axes.values()]
    return [dict(zip(names, combo, strict=True)) for combo in itertools.product(*values)]


def zipped(**axes) -> list[dict]:
    """The axes' values in lock step (all the same length): zipped(a=[1, 2], b=[3, 4]) ->
    [{a: 1, b: 3}, {a: 2, b: 4}]."""
    lengths = {len(list(v)) for v in axes.values()}
    if len(lengths) != 1:
        raise ValueError(f"zipped axes have different lengths: "
                         f"{ {k: len(list(v)) for k, v in axes.items()} }")
    return [dict(zip(axes, combo, strict=True)) for combo in zip(*axes.values(), strict=True)]


def cross(points: list[dict], **axes) -> list[dict]:
    """Each point combined with every combination of `axes`: cross(grid(...), regime=[...])."""
    return [{**extra, **p} for p in points for extra in grid(**axes)]


@dataclasses.dataclass(frozen=True)
class Point:
    sweep: str
    regime: str
    variant: str
    seed: int
    overrides: tuple[tuple[str, object], ...]  # the point's own dotted overrides

    @property
    def name(self) -> str:
        """Its path under the sweep root: regime/variant/seedN[/key=value...]."""
        parts = [self.regime, self.variant, f"seed{self.seed}"]
        parts += [f"{k}={_text(v)}" for k, v in self.overrides]
        return "/".join(parts)


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A recipe run at many points. `overrides` apply to every point and warm start;
    `regimes` maps a regime name to its own overrides."""

    name: str
    config: str  # a recipe file, relative to the repository root or absolute
    points: list[dict]
    regimes: dict[str, dict] = dataclasses.field(default_factory=lambda: {"default": {}})
    overrides: dict = dataclasses.field(default_factory=dict)
    doc: str = ""

    def expand(self) -> list[Point]:
        """The sweep's points, checked: each names a known regime and has a seed."""
        out, seen = [], set()
        for i, p in enumerate(self.points):
            regime = p.get("regime", next(iter(self.regimes)))
            if regime not in self.regimes:
                raise ValueError(f"sweep {self.name}: point {i} names regime {regime!r}; known: "
                                 f"{sorted(self.regimes)}")
            if "seed" not in p:
                raise ValueError(f"sweep {self.name}: point {i} ({p}) has no seed")
            extra = tuple(sorted((k, v) for k, v in p.items() if k not in SPECIAL))
            point = Point(self.name, regime, p.get("variant", "mig"), int(p["seed"]), extra)
            if point.name in seen:
                raise ValueError(f"sweep {self.name}: point {point.name} appears twice")
            seen.add(point.name)
            out.append(point)
        return out

    def point_overrides(self, point: Point) -> dict:
        """Every override of a point's RL run (sweep, regime, point; later ones win)."""
        return {**self.overrides, **self.regimes[point.regime], **dict(point.overrides),
                "seed": point.seed}

    def warmstart_overrides(self, regime: str) -> dict:
        """The overrides of a regime's shared warm start (mode=sft, the recipe's own seed)."""
        return {**self.overrides, **self.regimes[regime], "mode": "sft"}


def _text(v) -> str:
    if isinstance(v, tuple | list):
        return ",".join(map(str, v))
    return str(v)


def flag(key: str, value) -> str:
    """`--config.key=value` as ml_collections parses it (tuples as Python literals)."""
    if isinstance(value, tuple | list):
        return f"--config.{key}={tuple(value)!r}".replace(" ", "")
    return f"--config.{key}={value}"


def load_sweep(path: str) -> Sweep:
    """The `SWEEP` of a sweep file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"sweep file {path} does not exist")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if root not in sys.path:
        sys.path.insert(0, root)
    name = "migjax_sweep_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sweep = getattr(module, "SWEEP", None)
    if not isinstance(sweep, Sweep):
        raise ValueError(f"{path} defines no SWEEP = Sweep(...)")
    return sweep
