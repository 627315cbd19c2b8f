#!/usr/bin/env bash
# Tiny-model recipe sweep on one GPU machine: SFT variants in parallel, then GRPO variants in parallel from the
# SFT picked by held-out greedy accuracy, every run on the GPU (fp32). Learning per step is what is compared here;
# step times are the CPU's business (bench/grpo_step.py). Results: $OUT/sweep.tgz (metrics + logs) and
# $OUT/summary.txt.     bash bench/tiny_sweep.sh            (trl/datasets/math-verify carried as wheels in .whl/)
set -u
O=${OUT:-/tmp/sweep_out}; W=/tmp/sweep; rm -rf "$W"; mkdir -p "$O" "$W"   # a fresh run folder per call
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
GPU=${GPU:-"trainer.use_cpu=false trainer.report_to=[] trainer.disable_tqdm=true"}
ROLL=${ROLL:-"rollout.mode=colocated rollout.device=cuda rollout.dtype=float32"}
SFT_BUDGET=${SFT_BUDGET:-200}; GRPO_BUDGET=${GRPO_BUDGET:-300}

# name|overrides
SFTS=${SFTS-"e2|trainer.num_train_epochs=2
e4|trainer.num_train_epochs=4
e6|trainer.num_train_epochs=6
e8|trainer.num_train_epochs=8
e6lr5|trainer.num_train_epochs=6 trainer.learning_rate=5e-3"}
while IFS='|' read -r name args; do
  [ -n "$name" ] || continue
  timeout "$SFT_BUDGET" python3 -m align sft --config recipes/tiny/sft.yaml output_dir=$W/sft_$name $GPU $args \
    > "$W/sft_$name.log" 2>&1 &
done <<< "$SFTS"
wait
best=$(python3 - "$W" "$O/summary.txt" <<'EOF'
import json, sys, pathlib
rows = []
for p in sorted(pathlib.Path(sys.argv[1]).glob("sft_*/metrics.json")):
    m = json.loads(p.read_text())
    rows.append((m["heldout_math_accuracy"], m["heldout_math_pass1"], p.parent.name))
    with open(sys.argv[2], "a") as f:
        print(f"{p.parent.name}: greedy {m['heldout_math_accuracy']:.3f} pass@1 {m['heldout_math_pass1']:.3f} "
              f"train {m.get('train_runtime', 0):.0f}s", file=f)
print(max(rows)[2] if rows else "")
EOF
)
echo "best sft: $best" | tee -a "$O/summary.txt"

# name|sft|overrides (sft: "best" is the one picked above, else a folder here or an SFT run name above)
GRPOS=${GRPOS-"base_e2|sft_e2|trainer.max_steps=350
base|best|trainer.max_steps=350
b128|best|trainer.per_device_train_batch_size=128 trainer.max_steps=220
b128lr1e3|best|trainer.per_device_train_batch_size=128 trainer.max_steps=220 trainer.learning_rate=1e-3
b256lr5e4|best|trainer.per_device_train_batch_size=256 trainer.max_steps=140 trainer.learning_rate=5e-4
n16|best|trainer.num_generations=16 trainer.per_device_train_batch_size=128 trainer.max_steps=220
it2|best|trainer.num_iterations=2 trainer.max_steps=250"}
while IFS='|' read -r name sft args; do
  [ -n "$name" ] || continue
  [ "$sft" = best ] && sft=$best
  [ -d "$sft" ] || sft=$W/$sft   # a folder of the repo (carried) or an SFT run of this sweep
  [ -d "$sft" ] || { echo "grpo $name: no $sft" >> "$O/summary.txt"; continue; }
  timeout "$GRPO_BUDGET" python3 -m align grpo --config recipes/tiny/grpo.yaml model.path=$sft \
    output_dir=$W/grpo_$name $ROLL \
    trainer.save_strategy=no trainer.logging_steps=10 $GPU $args > "$W/grpo_$name.log" 2>&1 &
done <<< "$GRPOS"
wait
python3 - "$W" >> "$O/summary.txt" <<'EOF'
import json, sys, pathlib
for p in sorted(pathlib.Path(sys.argv[1]).glob("*/metrics.json")):
    m = json.loads(p.read_text())
    keys = ("start_heldout_math_accuracy", "heldout_math_accuracy", "start_heldout_math_pass1", "heldout_math_pass1",
            "train_runtime")
    print(p.parent.name, {k: round(m[k], 3) for k in keys if k in m})
EOF
# Every model scored again on the CPU (fp32 engine, independent seeds, 16 samples per problem), one footing for
# all rows: $O/heldout.jsonl.  EXTRA_EVAL: more folders to score the same way (e.g. the starting SFT).
if [ "${CPU_EVAL:-1}" = 1 ]; then
  for d in "$W"/sft_* "$W"/grpo_* ${EXTRA_EVAL:-}; do
    [ -f "$d/model.safetensors" ] || [ -f "$d/adapter_model.safetensors" ] || continue
    OMP_NUM_THREADS=1 python3 bench/heldout.py "$d" --samples 16 --out "$O/heldout.jsonl" > /dev/null 2>&1 &
  done
  wait
  cat "$O/heldout.jsonl" >> "$O/summary.txt"
fi
cd "$W" && tar czf "$O/sweep.tgz" --exclude='*.safetensors' --exclude='checkpoint-*' --exclude='*.bin' --exclude=runs .
cat "$O/summary.txt"
