"""The table of one `scripts/bench_gpu.sh` run: `python scripts/bench_table.py OUT_DIR`.

Reads the JSON files bench_gpu.sh writes (migjax_<model>.json, hf_<model>.json,
rollout_b<B>.json, mig_k8.json, gpu.txt) and prints a markdown table; a missing file is shown as
"failed" (its .log says why)."""

from __future__ import annotations

import json
import os
import sys

MODELS = ("qwen2.5-0.5b", "qwen2.5-1.5b")


def _load(out: str, name: str):
    try:
        with open(os.path.join(out, name + ".json")) as f:
            d = json.load(f)
        return d[0] if isinstance(d, list) else d
    except (OSError, ValueError, IndexError):
        return None


def _cell(d, key, fmt="{:,.0f}"):
    return "failed" if d is None or key not in d else fmt.format(d[key])


def table(out: str) -> str:
    rows = ["| measurement | migjax | transformers | migjax / transformers |", "|---|---|---|---|"]
    for m in MODELS:
        ours, hf = _load(out, f"migjax_{m}"), _load(out, f"hf_{m}")
        for key, what in (("rollout_new_tok_s", "rollout new tok/s (64 x (128 + 256), G = 1)"),
                          ("score_tok_s", "scoring tok/s (16 x 1024)"),
                          ("score_mfu_pct", "scoring MFU %"),
                          ("update_tok_s", "update tok/s (8 x 1024)"),
                          ("update_mfu_pct", "update MFU %"), ("peak_mem_gib", "peak GiB")):
            ratio = "" if None in (ours, hf) or key not in ours or key not in hf or not hf[key] \
                else f"{ours[key] / hf[key]:.2f}"
            rows.append(f"| {m} {what} | {_cell(ours, key, '{:,.1f}')} | "
                        f"{_cell(hf, key, '{:,.1f}')} | {ratio} |")
    for b in (64, 256):
        r = _load(out, f"rollout_b{b}")
        rows.append(f"| qwen2.5-0.5b rollout new tok/s, {b} prompts x G = 8 (one prefill each) | "
                    f"{_cell(r, 'rollout_new_tok_s')} | | |")
    mig = _load(out, "mig_k8")
    share = "failed" if mig is None else f"{100 * mig['mig_overhead_frac']:.1f}%"
    rows.append(f"| MIG step likelihoods at K = 8, time over the update's (64 x (256 + 512)) | "
                f"{share} | | |")
    try:
        with open(os.path.join(out, "gpu.txt")) as f:
            gpu = f.read().strip()
    except OSError:
        gpu = "unknown"
    return f"GPU: {gpu}\n\n" + "\n".join(rows)


if __name__ == "__main__":
    print(table(sys.argv[1] if len(sys.argv) > 1 else "bench_gpu"))
