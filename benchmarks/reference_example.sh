#!/usr/bin/env bash
# Run the diffusers example train_dreambooth_lora_sd3.py on the same model and images as yem, and time it.
# yem does not ship the example: download it from huggingface/diffusers (examples/dreambooth/) and point
# EXAMPLE at it. benchmarks/RESULTS.md says which version was run and its one edit.
#
# usage: EXAMPLE=path/to/train_dreambooth_lora_sd3.py \
#        reference_example.sh MODEL_DIR DATA_DIR STEPS RESOLUTION OUTDIR [MIXED_PRECISION] [extra script args...]
#   MIXED_PRECISION: bf16 (default, GPU) | no (CPU) | fp16
#   env: PEAK=FILE.json also records torch's allocator peak there (benchmarks/stage_peak.py).
#        VALIDATE=1 (default) renders "a photo of sks dog"; VALIDATE=0 passes no --validation_prompt.
#        PROMPT (default "a photo of sks dog") is used as instance and validation prompt.
#
# The caller provides `python` on PATH and a PYTHONPATH with torch, torchvision, diffusers, transformers,
# accelerate, peft, ... Runs offline (HF_HUB_OFFLINE=1). Plain `python`, no `accelerate launch` (single process).
#
# Fixed flags: batch 1, rank 4, lr 1e-4 constant, no warmup, seed 0, 1 validation image. No --lora_layers:
# this script version has no such flag; it always targets to_q/to_k/to_v/to_out.0 of the transformer.
# Validation: the pipeline's default 28 inference steps (the script does not pass num_inference_steps). With
# VALIDATE=1 it renders TWICE: after epoch 0 inside the loop (epoch % validation_epochs == 0 always holds at
# epoch 0, so no --validation_epochs value avoids it) and again at the end after reloading the pipeline + LoRA.
set -euo pipefail

if [ $# -lt 5 ]; then
    sed -n '2,8p' "$0" >&2
    exit 2
fi
MODEL_DIR=$1 DATA_DIR=$2 STEPS=$3 RESOLUTION=$4 OUTDIR=$5
MIXED_PRECISION=${6:-bf16}
shift $(( $# >= 6 ? 6 : 5 ))
PROMPT=${PROMPT:-a photo of sks dog}
VALIDATE=${VALIDATE:-1}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT=${EXAMPLE:-$HERE/train_dreambooth_lora_sd3.py}
[ -f "$SCRIPT" ] || { echo "EXAMPLE: no file $SCRIPT (download the diffusers example first)" >&2; exit 2; }
# PEAK=out.json: run it through stage_peak.py to record torch's allocator peak as well
PEAK_WRAPPER=$HERE/stage_peak.py

export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1

# The script Image.open()s every file in --instance_data_dir, so caption .txt files (or anything else) crash it.
# Give it a folder holding links to the image files only.
IMGDIR=$(mktemp -d "${TMPDIR:-/tmp}/refimgs.XXXXXX")
SMI_LOG=$(mktemp "${TMPDIR:-/tmp}/refsmi.XXXXXX")
trap 'rm -rf "$IMGDIR" "$SMI_LOG"; [ -n "${SMI_PID:-}" ] && kill "$SMI_PID" 2>/dev/null || true' EXIT
n=0
for f in "$DATA_DIR"/*; do
    case "${f,,}" in
        *.png|*.jpg|*.jpeg|*.webp|*.bmp) ln -s "$(cd "$(dirname "$f")" && pwd)/$(basename "$f")" "$IMGDIR/"; n=$((n + 1)) ;;
    esac
done
[ "$n" -gt 0 ] || { echo "no images in $DATA_DIR" >&2; exit 2; }

ARGS=(
    --pretrained_model_name_or_path "$MODEL_DIR"
    --instance_data_dir "$IMGDIR"
    --instance_prompt "$PROMPT"
    --resolution "$RESOLUTION"
    --train_batch_size 1
    --rank 4
    --max_train_steps "$STEPS"
    --learning_rate 1e-4
    --lr_scheduler constant
    --lr_warmup_steps 0
    --seed 0
    --output_dir "$OUTDIR"
    --mixed_precision "$MIXED_PRECISION"
)
if [ "$VALIDATE" = 1 ]; then
    ARGS+=(--validation_prompt "$PROMPT" --num_validation_images 1 --validation_epochs 1000)
fi
ARGS+=("$@")

# Whole-device peak memory (includes the CUDA context), sampled every 100 ms, if nvidia-smi is there.
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$SMI_LOG" 2>/dev/null &
    SMI_PID=$!
fi

echo "reference: python $SCRIPT ${ARGS[*]}"
echo "python: $(command -v python)  images: $n"
start=$(date +%s.%N); echo "REFERENCE_START=$start"
set +e
if [ -x /usr/bin/time ]; then
    /usr/bin/time -v python ${PEAK:+$PEAK_WRAPPER $PEAK} "$SCRIPT" "${ARGS[@]}"
else
    time python ${PEAK:+$PEAK_WRAPPER $PEAK} "$SCRIPT" "${ARGS[@]}"
fi
rc=$?
set -e
end=$(date +%s.%N)

if [ -n "${SMI_PID:-}" ]; then
    kill "$SMI_PID" 2>/dev/null || true
    wait "$SMI_PID" 2>/dev/null || true
    SMI_PID=
    peak=$(sort -n "$SMI_LOG" | tail -1)
    echo "REFERENCE_PEAK_GPU_MEM_MIB=${peak:-unknown}  (nvidia-smi memory.used, whole device)"
fi
echo "REFERENCE_EXIT=$rc"
echo "REFERENCE_WALL_S=$(python -c "print(f'{$end - $start:.2f}')")"
exit $rc
