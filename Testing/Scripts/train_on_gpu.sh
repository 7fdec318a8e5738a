#!/usr/bin/env bash
# Train two candidate models at once on one GPU machine from a data pack, results under $OUT.
#
# Made for a machine with PyTorch (CUDA), numpy and scipy but no SimpleITK and no network:
# training from a pack needs no SimpleITK, and MONAI travels as a wheel in .whl/ when missing.
# Prepare here (see Resources/Models/MODEL_CARD.md for the command lines actually used):
#   lungnoduleai pack --data-dir ../shared/data --output .devpack/pack.npz --bits 7 --cube-size 48 --scan-margin 32
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl monai==1.6.1
# then run this script there with .devpack and .whl carried.
#
# Stage 1 (the default):
#   a: fine-tune of the bundled model on its own fresh hard negatives;
#   b: a network trained afresh on the bundled model's hard negatives.
# Stage 2 (`train_on_gpu.sh 2`, with stage 1's b carried as .devpack/b/lung_nodule_unet.json):
#   more full-scan patches in each batch (--mix), and the checkpoint chosen with weight on
#   other candidates per cube and on false responses in the training scan's lungs;
#   c: fine-tune of stage 1's b on its own hard negatives;
#   d: the same from the bundled model.
# Stage 3 (`train_on_gpu.sh 3`, run once with MINUTES=7 on one H100; nothing kept, figures in the model card): the settings of
# the 50-minute CPU fine-tune that made 1.3.0's weights (small nodules weighed more: --size-balance,
# --small-weight; faint pasted nodules; a moving average of the weights), with GPU-sized batches,
# from the bundled model (1.4.0, itself an average of three CPU fine-tunes):
#   e: fine-tune of the bundled model;
#   f: the same with real faint nodules (mean < -450 HU) and nodules touching the pleura or a vessel
#      drawn 3x as often (--faint-weight 3 --attached-weight 3), what 1.4.0 misses most, and half
#      the pasted nodules placed against the chest wall (--pleural-fraction 0.5; on the CPU its
#      55-minute run, averaged with 1.4.0, found the same nodules: see the model card);
#   soup: the mean of the bundled model, e and f (`lungnoduleai average`), as 1.4.0 was made;
#   e and f also keep their last step (e/lung_nodule_unet_last.json), to average without a
#   checkpoint chosen on the validation cubes.
# Stage 4 (`train_on_gpu.sh 4`; run twice on one H100, MINUTES=6.5 and then SEEDS="45 46 47 48" MINUTES=4.2,
# each time all 6500 steps in under 4 minutes; nothing kept, figures in the model card): four fine-tunes of the
# bundled model side by side, each the 45-minute CPU recipe of the model card (batch 16, lr 1e-4, --ema 0.998,
# 6500 steps, the cosine decay over the steps unless MINUTES runs out first) with 3 patch workers, to be
# averaged here with `lungnoduleai average`. With SEEDS="s1 s2 s3 s4" (default "41 42 43 44"):
#   <TAG><s1>, <TAG><s2>: the options in TRIAL (default: lighter negatives at the lung's wall, --wall-negative-weight 0.3),
#                 TAG default w; e.g. TRIAL="--fade-fraction 0.5" TAG=f for real nodules faded in place, the
#                 option of 1.4.2's fine-tune (on the CPU: two seeds with it alone, two more with
#                 --attached-weight 3 --faint-weight 3 as well; see the model card); next, the loss on each
#                 nodule's best core, the first option that found a missed attached nodule on the CPU (W = 0.1,
#                 at the cost of false candidates): TRIAL="--fade-fraction 0.5 --peak-weight 0.05" TAG=k;
#   p<s3>, p<s4>: the plain recipe (the control).
#   Each run is tarred to $OUT/<run>.tar (best and last checkpoints, logs), since only 8 files come back.
# Score each here with Testing/Scripts/evaluate_model.py before bundling any.
# Where only a few files may come back, point OUT elsewhere and tar each of e, f and soup (~8 MB each).
# Each writes its best checkpoint (by in-training validation) whenever it improves,
# so a run cut short still leaves a model behind.
set -uo pipefail
OUT=${OUT:-gpu-out}
PACK=${PACK:-.devpack/pack.npz}
MINUTES=${MINUTES:-7}
WORKERS=${WORKERS:-7}
BUNDLED=LungNoduleAI/Resources/Models/lung_nodule_unet.json
mkdir -p "$OUT"
if ! python3 -c "import monai" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/LungNoduleAI${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python3 -c "import torch, monai, numpy, scipy; print('torch', torch.__version__, 'monai', monai.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
mined=(--pack "$PACK" --max-minutes "$MINUTES" --mine-hard-negatives --mine-threshold 0.3)
common=("${mined[@]}" --device cuda --workers "$WORKERS" --batch-size 32 --steps 1000000 --seed 0)
# 1.3.0's settings (small and faint nodules weighed more, checkpoints chosen with weight on false responses)
recipe130=(--save-last --attached-weight 1.5 --small-weight 3 --size-balance 500 --faint-fraction 0.25
           --mix 0.25,0.2,0.1,0.45 --fp-weight 0.2 --scan-fp-weight 0.01)
if [ "${1:-1}" = 4 ]; then
    WORK=${WORK:-/tmp/gpu4}
    mkdir -p "$WORK"
    stage4=("${mined[@]}" "${recipe130[@]}" --device "${DEVICE:-cuda}" --workers 3 --batch-size 16 --steps 6500
            --val-every 600 --ema 0.998 --lr 1e-4 --init "$BUNDLED")
    read -r s1 s2 s3 s4 <<<"${SEEDS:-41 42 43 44}"
    TRIAL=${TRIAL:---wall-negative-weight 0.3} TAG=${TAG:-w}
    runs=("$TAG$s1 $s1 $TRIAL" "$TAG$s2 $s2 $TRIAL" "p$s3 $s3" "p$s4 $s4")
    for run in "${runs[@]}"; do
        read -r name seed extra <<<"$run"
        # shellcheck disable=SC2086  # $extra holds zero or more options
        timeout "${LIMIT:-500}" python3 -m LungNoduleAILib.cli train "${stage4[@]}" --seed "$seed" $extra \
            --output "$WORK/$name/lung_nodule_unet.json" >"$WORK/$name.log" 2>&1 &
    done
elif [ "${1:-1}" = 3 ]; then
    stage3=("${recipe130[@]}" --val-every 500 --ema 0.999 --lr 2e-4)
    python3 -m LungNoduleAILib.cli train "${common[@]}" "${stage3[@]}" --output "$OUT/e/lung_nodule_unet.json" --init "$BUNDLED" >"$OUT/e.log" 2>&1 &
    python3 -m LungNoduleAILib.cli train "${common[@]}" "${stage3[@]}" --faint-weight 3 --attached-weight 3 --pleural-fraction 0.5 --output "$OUT/f/lung_nodule_unet.json" --init "$BUNDLED" >"$OUT/f.log" 2>&1 &
elif [ "${1:-1}" = 2 ]; then
    stage2=(--val-every 500 --attached-weight 1.0 --mix 0.2,0.15,0.15,0.5 --fp-weight 0.2 --scan-fp-weight 0.01 --lr 2e-4)
    python3 -m LungNoduleAILib.cli train "${common[@]}" "${stage2[@]}" --output "$OUT/c/lung_nodule_unet.json" --init .devpack/b/lung_nodule_unet.json >"$OUT/c.log" 2>&1 &
    python3 -m LungNoduleAILib.cli train "${common[@]}" "${stage2[@]}" --output "$OUT/d/lung_nodule_unet.json" --init "$BUNDLED" >"$OUT/d.log" 2>&1 &
else
    stage1=(--val-every 400 --attached-weight 2.5)
    python3 -m LungNoduleAILib.cli train "${common[@]}" "${stage1[@]}" --output "$OUT/a/lung_nodule_unet.json" --init "$BUNDLED" --lr 3e-4 >"$OUT/a.log" 2>&1 &
    python3 -m LungNoduleAILib.cli train "${common[@]}" "${stage1[@]}" --output "$OUT/b/lung_nodule_unet.json" --mine-with "$BUNDLED" --lr 1e-3 >"$OUT/b.log" 2>&1 &
fi
wait
if [ "${1:-1}" = 3 ] && [ -f "$OUT/e/lung_nodule_unet.json" ] && [ -f "$OUT/f/lung_nodule_unet.json" ]; then
    python3 -m LungNoduleAILib.cli average "$BUNDLED" "$OUT/e/lung_nodule_unet.json" "$OUT/f/lung_nodule_unet.json" --output "$OUT/soup/lung_nodule_unet.json" >"$OUT/soup.log" 2>&1
fi
if [ "${1:-1}" = 4 ]; then
    for run in "${runs[@]}"; do
        read -r name _ <<<"$run"
        (cd "$WORK" && tar cf "$OUT/$name.tar" "$name" "$name.log")
        tail -n 2 "$WORK/$name.log"
    done
else
    tail -n 2 "$OUT"/*.log
fi
