# Trip 1: carry .whl .whl-fa4a devrun. Stages FA4's first half; torch's varlen kernel under --simulate.
. .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)"; } > $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
mkdir -p /tmp/fa4 && cp .whl-fa4a/* /tmp/fa4/
K="--kernel torch.varlen_attn"
timeout 100 python -m benchmarks.cp --simulate 8 --device cuda $K --split-fraction 0.5 --json $OUT/torch_lognormal_n8.json > $OUT/torch_lognormal_n8.txt 2>&1; echo "torch lognormal n=8 rc=$?"; tail -8 $OUT/torch_lognormal_n8.txt
