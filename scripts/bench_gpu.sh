#!/usr/bin/env bash
# The GPU benchmark in one call: migjax's stages (scripts/bench.py), MIG's cost at K = 8
# (scripts/bench_mig.py) and Hugging Face transformers on the same card
# (../shared/bench/hf_reference.py), for the Qwen2.5-0.5B and 1.5B shapes, then one table.
#
#     bash scripts/bench_gpu.sh [OUT_DIR]        # a few minutes on one H100 / H200
#
# Every JSON lands in OUT_DIR (default bench_gpu/); scripts/bench_table.py prints the table:
# rollout at batch 64 and 256 with G = 8 sharing one prefill, scoring and update tok/s and MFU
# beside transformers', MIG's share of an RL step at K = 8, peak memory, the 1.5B update at
# 8 x 1024. A phase that fails (out of memory, say) is reported as such; the others still run.
set -u
OUT=${1:-bench_gpu}
PY=${PY:-python}
HF=${HF_REFERENCE:-../shared/bench/hf_reference.py}
mkdir -p "$OUT"
run() {  # name, command...: runs it, keeps its output, never stops the script
  local name=$1; shift
  echo "== $name: $*" >&2
  "$@" > "$OUT/$name.log" 2>&1 || echo "$name failed (exit $?); see $OUT/$name.log" >&2
}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1 || true
for m in qwen2.5-0.5b qwen2.5-1.5b; do
  run "migjax_$m" $PY scripts/bench.py --model $m --shapes spec --remat --out "$OUT/migjax_$m.json"
  run "hf_$m" $PY "$HF" --model $m --out "$OUT/hf_$m.json"
done
for b in 64 256; do  # rollouts: B prompts of G = 8 samples sharing one prefill
  run "rollout_b$b" $PY scripts/bench.py --model qwen2.5-0.5b --shapes spec --gen-batch $b \
      --group-size 8 --out "$OUT/rollout_b$b.json"
done
run mig_k8 $PY scripts/bench_mig.py --model qwen2.5-0.5b --steps 8 --batch 64 --group-size 8 \
    --prompt-len 256 --completion-len 512 --out "$OUT/mig_k8.json"
$PY scripts/bench_table.py "$OUT"
