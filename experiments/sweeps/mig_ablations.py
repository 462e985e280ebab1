"""Ablations of MIG, one switch each, against MIG itself, in the regime where MIG and the
matched GRPO differ most (see experiments/results/mig_vs_baselines).

    python -m experiments.launch experiments/sweeps/mig_ablations.py --commit
    python -m experiments.report experiments/results/mig_ablations \
        --with experiments/results/mig_vs_baselines --variants mig,grpo_matched

MIG's own points are those of mig_vs_baselines (same warm start, same seeds), which the report
reads beside these. `h0_zero` needs probability space; `prob_space` alone separates that from
the h_0 choice.
"""

from experiments.sweep import Sweep, grid
from experiments.sweeps.mig_vs_baselines import REGIMES

REGIME = "sparse"
ABLATIONS = ["no_watermark", "coupled", "no_sft", "stepwise", "stepwise_rtg", "prob_space",
             "h0_zero", "sft_mig_gate", "reference_scorer"]

SWEEP = Sweep(
    name="mig_ablations",
    config="configs/arith_tiny.py",
    regimes={REGIME: REGIMES[REGIME]},
    overrides={"eval.every": 20, "log.progress": False, "log.samples_every": 20},
    points=grid(seed=range(3), variant=ABLATIONS, regime=REGIME),
    doc=__doc__,
)
