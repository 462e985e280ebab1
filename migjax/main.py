"""Command-line entry: `python -m migjax.main --config=RECIPE[:variant] --workdir=DIR
[--config.a.b=value ...]`, RECIPE a packaged recipe's name (`arith_tiny`, `gsm8k_qwen`, ...) or a
config file's path. `--print_config` prints the resolved config with its comments and exits."""

from __future__ import annotations

import logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging

from migjax.configs import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics, outputs).")
_PRINT_CONFIG = flags.DEFINE_bool("print_config", False,
                                  "Print the resolved config with comments and exit.")
_PARSED = {}


def _parse(argv):
    _PARSED["config"], rest = cli.parse(argv)
    return rest


def main(argv):
    del argv
    c = _PARSED["config"]
    if c is None:
        raise SystemExit("--config is required (a packaged recipe such as arith_tiny, or a file)")
    if _PRINT_CONFIG.value:
        print(cli.render(c))
        return
    if not _WORKDIR.value:
        raise SystemExit("--workdir is required (the run directory)")
    import jax

    from migjax import trainer
    from migjax.preflight import preflight

    if c.distributed or os.environ.get("JAX_COORDINATOR_ADDRESS"):
        jax.distributed.initialize()
    try:  # config, files, mesh and memory, before any work
        preflight(c, workdir=_WORKDIR.value)
    except (ValueError, OSError) as e:
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    absl_logging.set_verbosity(absl_logging.WARNING)
    logging.getLogger("migjax").setLevel(logging.INFO)
    summary = trainer.train(c, _WORKDIR.value)
    print(trainer.report(summary))


if __name__ == "__main__":
    app.run(main, argv=sys.argv, flags_parser=_parse)
