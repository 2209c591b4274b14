# Trip 3: carry .whl devrun, while the machine that ran trip 2 is warm (FA4 installed in /tmp/site-fa4). The context-parallel GPU tests with FA4 required.
export USE_FA4=1; . .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
REQUIRE_KERNELS=fa4 timeout 400 python -m pytest -q -rs -m gpu tests/packing/test_context_cuda.py > $OUT/context_cuda.txt 2>&1; echo "context tests rc=$?"; tail -12 $OUT/context_cuda.txt
