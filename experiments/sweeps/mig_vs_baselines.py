"""MIG against its baselines on the embedded arithmetic task, in two regimes.

    python -m experiments.launch experiments/sweeps/mig_vs_baselines.py --commit
    python -m experiments.report experiments/results/mig_vs_baselines

`default` is `configs/arith_tiny.py` as it ships (a 1000-step warm start on a careless
teacher's demonstrations). `sparse` starts RL from a shorter warm start of the same teacher, so
weak that most groups hold no right answer (the share is logged per step as
`reward/all_wrong_group_frac`): the setting of the paper's sample-efficiency claim, where the
outcome reward is mostly silent and a dense process signal should matter. Its length was chosen
from measurements (experiments/results/README.md).

Seeds are the slowest axis, so an interrupted sweep has the same seeds for every variant.
MIG and both GRPOs get 5 seeds, the other baselines 3. DAPO's clip-higher is not run: with one
optimizer step per rollout batch (this recipe) the ratio is 1 and nothing is clipped, so its
update is bit for bit the matched GRPO's (tests/test_variants.py).
"""

from experiments.sweep import Sweep, cross, grid

MAIN = ["mig", "grpo_matched", "grpo_canonical"]
OTHERS = ["dr_grpo", "end_of_cot", "igpo"]
REGIMES = {"default": {}, "sparse": {"warmstart.steps": 250}}

SWEEP = Sweep(
    name="mig_vs_baselines",
    config="configs/arith_tiny.py",
    regimes=REGIMES,
    overrides={"eval.every": 20, "log.progress": False, "log.samples_every": 20},
    points=(cross(grid(seed=range(3), variant=MAIN + OTHERS), regime=list(REGIMES))
            + cross(grid(seed=range(3, 5), variant=MAIN), regime=list(REGIMES))),
    doc=__doc__,
)
