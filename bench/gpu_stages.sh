#!/usr/bin/env bash
# The `small` preset stages on GPUs, results under $OUT (device machine; trl/datasets/math-verify carried as wheels
# in .whl/). Steps: SFT on one GPU; the same SFT sharded with FSDP2 over two GPUs (if there are two);
# GRPO in colocated mode on one GPU from the first SFT.
#   bash bench/gpu_stages.sh
set -u
O=${OUT:-/tmp/gpu_out}; W=/tmp/gpu_work_$(date +%s); mkdir -p "$O" "$W"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$O/gpu.txt"
python3 -c "import torch,transformers,trl,accelerate,peft,sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'transformers', transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__)" > "$O/versions.txt" 2>&1
NGPU=$(nvidia-smi -L | wc -l)
SFT_ARGS="trainer.max_steps=60 eval.limit=100 trainer.report_to=[] trainer.disable_tqdm=true"

t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 240 python3 -m align sft --config recipes/small/sft.yaml output_dir=$W/sft1 $SFT_ARGS > "$W/sft1.log" 2>&1
echo "sft1 exit $? in $(( $(date +%s) - t0 ))s" >> "$O/summary.txt"
cp $W/sft1/metrics.json "$O/sft1_metrics.json" 2>/dev/null; tail -c 3000 "$W/sft1.log" > "$O/sft1_tail.log"

if [ "$NGPU" -ge 2 ]; then
  t0=$(date +%s)
  timeout 240 accelerate launch --config_file recipes/accelerate/fsdp2.yaml --num_processes 2 -m align sft \
    --config recipes/small/sft.yaml output_dir=$W/sft2 $SFT_ARGS > "$W/sft2.log" 2>&1
  echo "sft2 (fsdp2 x2) exit $? in $(( $(date +%s) - t0 ))s" >> "$O/summary.txt"
  cp $W/sft2/metrics.json "$O/sft2_metrics.json" 2>/dev/null; tail -c 3000 "$W/sft2.log" > "$O/sft2_tail.log"
fi

t0=$(date +%s)
CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m align grpo --config recipes/small/grpo.yaml model.path=$W/sft1 \
  output_dir=$W/grpo trainer.max_steps=10 eval.limit=100 trainer.report_to=[] trainer.disable_tqdm=true > "$W/grpo.log" 2>&1
echo "grpo exit $? in $(( $(date +%s) - t0 ))s" >> "$O/summary.txt"
cp $W/grpo/metrics.json "$O/grpo_metrics.json" 2>/dev/null
cp $W/grpo/log_history.json "$O/grpo_log_history.json" 2>/dev/null; tail -c 3000 "$W/grpo.log" > "$O/grpo_tail.log"
cat "$O/summary.txt"
