"""Command-line entry: `python -m migjax.main --config=configs/X.py[:variant] --workdir=DIR
[--config.a.b=value ...]`."""

from __future__ import annotations

import logging
import os

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, outputs).")


def main(argv):
    del argv
    import jax

    from migjax import trainer
    from migjax.preflight import preflight

    c = _CONFIG.value
    if c.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    preflight(c, workdir=_WORKDIR.value)  # config, files, mesh and memory, before any work
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("migjax").setLevel(logging.INFO)
    summary = trainer.train(c, _WORKDIR.value)
    print(trainer.report(summary))


if __name__ == "__main__":
    flags.mark_flags_as_required(["config", "workdir"])
    app.run(main)
