#!/usr/bin/env bash
# Every GPU check of POF in one call, for a session that is lent a GPU (about 8 minutes on an H200):
#   1. bench/gpu_check.py: POF trained on the CPU and the GPU from the same weights agrees, pruned masks identical,
#      save_pretrained on the GPU / from_pretrained on the CPU round trip, bf16 steps finite, device waits per step;
#   2. bench/penalty_stacking_cost.py: the penalty layer by layer against stacked by fan-in, interleaved;
#   3. bench/pof_step_cost.py: both fine-tuning recipes' step against plain training (and ResNet-50 at 224 px).
# Results under $RESULTS (default bench/results/gpu). Where timm is missing (a bare machine with torch only), the
# wheels in .whl/ (carried along: pip download timm datasets dill multiprocess --no-deps -d .whl) are installed
# first, then this checkout without its dependencies.
#
#   bash bench/gpu_session.sh                  # DEVICE=cuda
#   DEVICE=cpu STEPS=2 BATCH=4 RESULTS=/tmp/gpu_dry bash bench/gpu_session.sh    # a dry run, on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
RESULTS=${RESULTS:-bench/results/gpu}
STEPS=${STEPS:-100}
BATCH=${BATCH:-128}
PYTHON=${PYTHON:-python}

if ! "$PYTHON" -c "import timm" 2>/dev/null; then
    "$PYTHON" -m pip install -q --no-deps .whl/*.whl
fi
"$PYTHON" -c "import timm_prune" 2>/dev/null || "$PYTHON" -m pip install -q --no-deps -e .

HALF_WIDTH='{"channels": [32, 64, 128, 256], "stem_width": 32}'
RESNET_RECIPE=recipes/configs/cifar10_finetune_pof.yaml

"$PYTHON" bench/gpu_check.py --device "$DEVICE" --results "$RESULTS" --steps "$(( STEPS < 8 ? STEPS : 8 ))"
"$PYTHON" bench/penalty_stacking_cost.py --device "$DEVICE" --results "$RESULTS" --rounds "$(( STEPS < 40 ? STEPS : 40 ))"
"$PYTHON" bench/pof_step_cost.py --device "$DEVICE" --config "$RESNET_RECIPE" --no-bf16 --model resnet18 \
    --model_kwargs "$HALF_WIDTH" --img_sizes 36 224 --steps "$STEPS" --batch_size "$BATCH" --results "$RESULTS/resnet18_half" \
    --variants recipe "no pruned forwards" "plain weights, penalty every 4th call"
"$PYTHON" bench/pof_step_cost.py --device "$DEVICE" --img_sizes 32 224 --steps "$STEPS" --batch_size "$BATCH" \
    --results "$RESULTS/convnext_atto" --variants recipe "no pruned forwards"
"$PYTHON" bench/pof_step_cost.py --device "$DEVICE" --config "$RESNET_RECIPE" --bf16 --model resnet50 \
    --img_sizes 224 --steps "$(( STEPS < 40 ? STEPS : 40 ))" --batch_size "$BATCH" --variants recipe --results "$RESULTS/resnet50"
