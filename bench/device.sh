#!/usr/bin/env bash
# The GPU benchmarks (throughput of our loop against the Trainer, TFLOP/s and MFU, of MPNet-base,
# SmolLM2-135M and a 1B Llama shape on an H100/H200), in one call (8 minutes) on a lent GPU machine, which has PyTorch with CUDA but none of
# the project's packages, models or data:
#
#   here, once:  python bench/device_pack.py pack      # .device/: configs, tokenizers, data, wheels (~21 MiB)
#                echo /.device/ >> .git/info/exclude
#   there:       device tool: run(command="bash bench/device.sh", carry=[".device"], timeout_s=540)
#
# Models train from random weights there (bench/device_pack.py says why); throughput and
# FLOPs are those of the real architectures. Results land in $OUT (the device tool brings
# them back): device.log, bench.md, bench.json, throughput_runs_<model>.jsonl (each run's figures,
# written as soon as it ends), profile_<model>.txt. Each stage has its own time limit so that
# one stuck stage still leaves the others' files.
set -uo pipefail
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-bench/out/device}
BUDGET=${BENCH_SECONDS:-180}      # the default shapes' throughput runs (batch 32 x ~35 tokens)
LONG_BUDGET=${LONG_SECONDS:-150}  # the generative shape's (batch 8 x 512 tokens)
PROFILE_STEPS=${PROFILE_STEPS:-20} PROFILE_SECONDS=${PROFILE_SECONDS:-30}  # per model: the stage ends within 60 s
MODELS=${MODELS:-mpnet-base smollm2-135m llama-1b-shape}  # a CPU rehearsal names smaller ones
LONG_MODELS=${LONG_MODELS:-llama-1b-shape smollm2-135m mpnet-base}
PROFILE_MODELS=${PROFILE_MODELS:-mpnet-base llama-1b-shape}
SKIP_WHEELS=${SKIP_WHEELS:-0}  # 1: a rehearsal where the packages are installed already
mkdir -p "$OUT"
exec > >(tee "$OUT/device.log") 2>&1
started=$(date +%s)
stamp() { echo "== $(( $(date +%s) - started )) s: $*"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
if [ ! -d .device/wheels ]; then
  echo "no .device/ here: run 'python bench/device_pack.py pack' first and carry .device"; exit 2
fi
if [ "$SKIP_WHEELS" != 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .device/wheels/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/bench
python3 - <<'PY' || exit 1
import torch, transformers, peft, peftlab.train  # noqa: F401  (every import the runs need, before any run)
print(f"torch {torch.__version__}, CUDA {torch.cuda.is_available()}, "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; "
      f"transformers {transformers.__version__}, peft {peft.__version__}")
PY
stamp "random-weight models"
python3 bench/device_pack.py materialize .device/models /tmp/models || exit 1

stamp "profile (our LoRA step: 10 steps recorded of $PROFILE_STEPS)"
for model in $PROFILE_MODELS; do
  timeout -k 5 "$PROFILE_SECONDS" python3 bench/gpu_profile.py --model "$model" --pretrained "/tmp/models/$model" \
    --data ".device/data/$model/rotten_tomatoes" --batch-size 32 --steps "$PROFILE_STEPS" \
    > "$OUT/profile_$model.txt" 2> "/tmp/profile_$model.err" \
    || { echo "profile of $model failed:"; tail -25 "/tmp/profile_$model.err"; }
  head -8 "$OUT/profile_$model.txt"
done

stamp "throughput (ours vs Trainer + peft; TFLOP/s, MFU)"
timeout "$BUDGET" python3 bench/run.py --only throughput --models $MODELS --methods full lora \
  --model-root /tmp/models --data-root .device/data --seeds 0 --batch-size 32 --out /tmp/bench \
  || { echo "throughput stopped (exit $?): the models finished are in bench.md"; pkill -f "in_process\(" || true; }
stamp "throughput at the generative shape, batch 8 x 512 tokens (full and LoRA)"
timeout "$LONG_BUDGET" python3 bench/run.py --only throughput --models $LONG_MODELS \
  --methods lora full --model-root /tmp/models --data-root .device/data --seeds 0 --batch-size 8 --seq-len 512 \
  --epochs 0.25 --tag=_8x512 --out /tmp/bench \
  || { echo "8 x 512 stopped (exit $?): the runs finished are in throughput_runs_*.jsonl"; pkill -f "in_process\(" || true; }
python3 bench/run.py --collect --out /tmp/bench > /dev/null 2>&1 || true
cp /tmp/bench/bench.md /tmp/bench/bench.json "$OUT"/ 2>/dev/null || true
for f in /tmp/bench/throughput/*/throughput_runs.jsonl; do
  [ -f "$f" ] && cp "$f" "$OUT/throughput_runs_$(basename "$(dirname "$f")").jsonl"
done
stamp "done"
