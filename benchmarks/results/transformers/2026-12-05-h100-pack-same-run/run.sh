# Trip 1: carry .whl .whl-fa4a baseline. Same-run compiled Qwen3-0.6B step: 6837b42 (baseline/) then this tree.
. .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)"; } > $OUT/gpu.txt 2>&1
cat $OUT/gpu.txt
ARGS="--arch qwen3-0.6b --compile --compiled-only --methods static+packing_varlen --no-baseline --steps 10 --warmup 2"
(cd baseline && PYTHONPATH=$PWD:/tmp/site:/tmp/site-mslk timeout 280 python -m benchmarks.hf $ARGS --json $OUT/base_1.json > $OUT/base_1.log 2>&1; echo "base rc=$?")
timeout 250 python -m benchmarks.hf $ARGS --json $OUT/new_1.json > $OUT/new_1.log 2>&1; echo "new rc=$?"
grep -h "^done:" $OUT/base_1.log $OUT/new_1.log
