# Trip 2: carry .whl .whl-fa4b, right after trip 1. FA4 (nvidia-cutlass-dsl 4.8.1): CP chunk kernels' GPU tests and FA4 --simulate, then the GPU tests with fa4,quack required, then CP=2 on one GPU (gloo).
export USE_FA4=1; . .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python -c "
import torch; print(torch.cuda.get_device_name(), torch.__version__)
from importlib import metadata as m
for p in ('flash-attn-4','quack-kernels','nvidia-cutlass-dsl','transformers'): print(p, m.version(p))
from models.fusion import quack_problem; print('quack_problem norm:', quack_problem('norm')); print('quack_problem mlp:', quack_problem('mlp'))
from packing.kernels import varlen_kernels, chunk_varlen_kernels; print('varlen kernels:', list(varlen_kernels())); print('chunk kernels:', list(chunk_varlen_kernels()))
" > $OUT/stack.txt 2>&1; cat $OUT/stack.txt
REQUIRE_KERNELS=fa4 timeout 120 python -m pytest -q -rs -m gpu tests/packing/test_context_cuda.py > $OUT/context_cuda.txt 2>&1; echo "context tests rc=$?"; tail -4 $OUT/context_cuda.txt
echo 131072 > /tmp/one_doc.txt
K="--kernel flash-attn-4"
timeout 50 python -m benchmarks.cp --simulate 8 --device cuda $K --split-fraction 0.5 0.1 0.25 --json $OUT/fa4_lognormal_n8.json > $OUT/fa4_lognormal_n8.txt 2>&1; echo "fa4 lognormal n=8 rc=$?"; tail -5 $OUT/fa4_lognormal_n8.txt
timeout 60 python -m benchmarks.cp --simulate 8 --device cuda $K --lengths /tmp/one_doc.txt --repeats 5 --json $OUT/fa4_one_doc_n8.json > $OUT/fa4_one_doc_n8.txt 2>&1; echo "fa4 one doc n=8 rc=$?"; tail -3 $OUT/fa4_one_doc_n8.txt
REQUIRE_KERNELS=fa4,quack timeout 260 python -m pytest -q -rs -m gpu tests/models/test_cuda.py tests/packing/test_hf.py tests/packing/test_hf_pack.py tests/packing/test_hf_families.py tests/benchmarks/test_attention_kernels.py tests/benchmarks/test_harness.py > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$?"
tail -25 $OUT/gpu_tests.txt
A="--device cuda --check --tokens 131072 --heads 16 --kv-heads 8 --head-dim 128"
timeout 90 torchrun --standalone --nproc-per-node 2 -m benchmarks.cp $A --kernel flash-attn-4 > $OUT/check_fa4_lognormal_n2.txt 2>&1; echo "check rc=$?"; grep -v "^W1\|^\*" $OUT/check_fa4_lognormal_n2.txt | tail -6
