#!/usr/bin/env bash
# `small` preset on one GPU: SFT (recipes/small/sft.yaml), then GRPO (recipes/small/grpo.yaml, colocated engine)
# from it with two seeds side by side on the same GPU. Results under $OUT: each stage's metrics.json, curves
# (curves.jsonl, curves.png) and log history, and summary.txt (held-out before/after per seed).
#   bash bench/small_grpo.sh            (trl/datasets/math-verify carried as wheels in .whl/ on a bare GPU image)
# DEADLINE=<s> stops the GRPO runs that many seconds after the script starts (less 40 s to pack the results), so a
# device call with a wall-clock limit still brings back the logs and curves of runs cut short.
# An SFT already in $WORK/sft (a second call on the same warm machine) is reused: GRPO settings compared across calls
# then start from the same SFT weights. TAG=<name> prefixes the result files (e.g. TAG=replay GRPO_ARGS=moe.routing_replay=rollout).
set -u
O=${OUT:-/tmp/small_out}; W=${WORK:-/tmp/small_work}; mkdir -p "$O" "$W"
if [ -d .whl ] && ! python3 -c "import trl" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
QUIET="trainer.report_to=[] trainer.disable_tqdm=true"
SEEDS=${SEEDS:-"0 1"}
T=${TAG:+${TAG}_}
start=$(date +%s); t0=$start
if [ -f "$W/sft/metrics.json" ]; then
  echo "sft reused from $W/sft" >> "$O/summary.txt"
else
  python3 -m align sft --config recipes/small/sft.yaml output_dir=$W/sft $QUIET ${SFT_ARGS:-} > "$W/sft.log" 2>&1
  echo "sft exit $? in $(( $(date +%s) - t0 ))s" >> "$O/summary.txt"
fi
cp "$W/sft/metrics.json" "$O/small_sft_metrics.json" 2>/dev/null
t0=$(date +%s)
left=0; [ -n "${DEADLINE:-}" ] && left=$(( DEADLINE - (t0 - start) - 40 )) && [ $left -lt 1 ] && left=1
for s in $SEEDS; do
  timeout $left python3 -m align grpo --config recipes/small/grpo.yaml model.path=$W/sft output_dir=$W/${T}grpo_s$s seed=$s \
    $QUIET ${GRPO_ARGS:-} > "$W/${T}grpo_s$s.log" 2>&1 &
done
wait
echo "grpo (seeds $SEEDS at once) done in $(( $(date +%s) - t0 ))s" >> "$O/summary.txt"
for s in $SEEDS; do
  d=$W/${T}grpo_s$s
  cp "$d/metrics.json" "$O/small_${T}grpo_s${s}_metrics.json" 2>/dev/null
  cp "$d/curves.png" "$O/small_${T}grpo_s${s}_curves.png" 2>/dev/null
  python3 - "$d" >> "$O/summary.txt" <<'PY'
import json, sys, pathlib
d = pathlib.Path(sys.argv[1])
bad = d / "nonfinite_grads.jsonl"
if bad.exists():
    lines = bad.read_text().splitlines()
    print(d.name, f"{len(lines)} optimizer steps skipped (non-finite gradients); first: {lines[0][:600]}")
if not (d / "metrics.json").exists():
    print(d.name, "no metrics.json"); sys.exit()
m = json.loads((d / "metrics.json").read_text())
print(d.name, {k: round(m[k], 4) for k in ("start_heldout_math_accuracy", "heldout_math_accuracy",
      "start_heldout_math_pass1", "heldout_math_pass1", "train_runtime") if k in m})
PY
done
tar czf "$O/small_${T}runs.tgz" -C "$W" --exclude='*.safetensors' --exclude='*.bin' --exclude='checkpoint-*' --exclude=runs .
cat "$O/summary.txt"
