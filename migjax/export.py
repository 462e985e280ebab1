"""A run's policy as a Hugging Face model directory, from one of its checkpoints:

    python -m migjax.export WORKDIR [--step N] --out DIR

reads WORKDIR/config.json (the resolved config the run wrote), builds the model as the run did
(its warm start, `model.path`, a preset or the scratch shape), restores checkpoint N (the latest
by default) and writes config.json, safetensors and the tokenizer to DIR, which
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` and `--config.model.path=DIR` load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

import ml_collections as mlc

from migjax import experiment as ex
from migjax import trainer
from migjax.checkpointing import Checkpointer
from migjax.data.visual import is_visual
from migjax.train_state import init_state, place_state


def read_config(workdir: str) -> mlc.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (is {workdir} a migjax run directory?)")
    with open(path, encoding="utf-8") as f:
        return mlc.ConfigDict(json.load(f))


def export(workdir: str, out: str, step: int | None = None) -> str:
    """Writes checkpoint `step` (None: the latest) of the run in `workdir` to `out`."""
    workdir = os.path.abspath(workdir)
    c = read_config(workdir)
    if c.mode == "sft":
        raise ValueError(f"{workdir} is a supervised run: its model is {workdir}/sft_model")
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), async_save=False)
    try:
        if not ckpt.all_steps():
            raise ValueError(f"{ckpt.directory}: no finalized checkpoint to export")
        mesh = ex.build_mesh(c)
        tokenizer = ex.build_tokenizer(c, workdir)
        start = os.path.join(workdir, "sft_model") if trainer.uses_warmstart(c) else None
        if start and not os.path.isdir(start):
            raise FileNotFoundError(f"{start}: the run's warm start is missing")
        graphdef, params, mcfg = ex.build_model(c, tokenizer, mesh, start, workdir)
        state, _ = place_state(init_state(params, trainer.rl_optimizer(c)), mesh)
        state, _ = trainer.restore_state(ckpt, step, state)
    finally:
        ckpt.close()
    vision = None
    if is_visual(c.task.kind):  # the frozen tower goes with the policy
        vision = ex.build_vision(c, ex.packaged_model(start or c.model.path, workdir), tokenizer)
    return trainer.export_params(state.params, mcfg, workdir, tokenizer, out, vision=vision,
                                 graphdef=graphdef)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m migjax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdir", help="the run directory (holds config.json and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
    p.add_argument("--out", required=True, help="the Hugging Face model directory to write")
    a = p.parse_args(argv)
    try:
        out = export(a.workdir, a.out, a.step)
    except (ValueError, OSError) as e:
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
