#!/usr/bin/env bash
# One prepared GPU check (under 8 minutes on one GPU): meta-training episodes/s and step GPU memory of every
# method with ResNet-12 at 84x84 (the synthetic set resized on the GPU), with and without rotation SLA,
# meta-batch 1 and 8, AMP off and on; then evaluation episodes/s with and without the feature cache; then the
# paper step's memory against the micro-batch and checkpointing, episodes read out of core onto the GPU, and two
# processes sharing the GPU.
#
#   bash benchmarks/gpu_check.sh            # from anywhere; needs torch with CUDA, numpy, scipy, h5py, tqdm, pyyaml
#
# Every code path it runs also runs on the CPU in seconds:
#   python benchmarks/bench_training.py --device cpu --tiny --amp both
#   python benchmarks/bench_eval_cache.py --device cpu --tiny
#   python benchmarks/bench_scale.py --case paper --tiny && python benchmarks/bench_scale.py --case processes --tiny
#   python benchmarks/bench_out_of_core.py --size mini --rounds 1 --steps 30
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DATA_ROOT=${FEWSHOT_SLA_DATA:-$(mktemp -d)}
status=0

"$PY" - <<'EOF' || exit 1
import sys, torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}")
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA GPU visible; run the CPU smoke modes instead (see the header of this script)")
print(f"GPU: {torch.cuda.get_device_name(0)}, {torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB")
EOF

echo "== meta-training: ResNet-12 at 84x84, 5-way 1-shot 6-query episodes (MetaOptNet's training queries) =="
timeout 300 "$PY" benchmarks/bench_training.py --device cuda --backbone resnet12 --image-size 84 --amp both \
    --queries 6 --meta-batches 1 8 --warmup 2 --seconds 1 --min-steps 2 --max-steps 10 --data-root "$DATA_ROOT" || status=1

echo "== evaluation: ProtoNet / ResNet-12 at 84x84, SLA rotation, 5-way 1-shot 15-query, cached vs uncached =="
timeout 100 "$PY" benchmarks/bench_eval_cache.py --device cuda --backbone resnet12 --image-size 84 \
    --cached 2000 --uncached 200 --data-root "$DATA_ROOT" || status=1
timeout 60 "$PY" benchmarks/bench_eval_cache.py --device cuda --backbone resnet12 --image-size 84 --amp \
    --cached 2000 --uncached 200 --data-root "$DATA_ROOT" || status=1
echo "== scale: the paper step (MetaOptNet-SVM + SLA, ResNet-12 at 84x84, 3,360 images) per micro-batch K =="
timeout 200 "$PY" benchmarks/bench_scale.py --case paper --device cuda --options 8:on,4:off,2:off,1:off || status=1

echo "== splits larger than memory: episodes read from the store onto the GPU, against in GPU memory =="
timeout 90 "$PY" benchmarks/bench_out_of_core.py --size mini --rounds 1 --steps 30 --device cuda || status=1

echo "== scale: 2 processes sharing the GPU (gloo) against 1 =="
timeout 150 "$PY" benchmarks/bench_scale.py --case processes --device cuda --rounds 1 --episodes 320 \
    --data-root "$DATA_ROOT" || status=1
exit $status
