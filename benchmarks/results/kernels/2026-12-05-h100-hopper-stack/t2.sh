# Trip 2: carry .whl .whl-fa4b .whl-c47a. FA4 (cutlass-dsl 4.8.1) installed; GPU tests with FA4 required.
mkdir -p /tmp/c47 && cp .whl-c47a/* /tmp/c47/
export USE_FA4=1; . .whl/setup.sh
python -c "
from importlib import metadata as m
for p in ('flash-attn-4','quack-kernels','nvidia-cutlass-dsl'): print(p, m.version(p))
from models.fusion import quack_problem; print('quack_problem:', quack_problem())
from packing.kernels import varlen_kernels; print('varlen kernels:', varlen_kernels())
" > $OUT/stack_481.txt 2>&1; cat $OUT/stack_481.txt
REQUIRE_KERNELS=fa4 timeout 520 python -m pytest -q -rs -m gpu tests/models/test_cuda.py tests/packing/test_hf.py tests/packing/test_hf_pack.py tests/packing/test_hf_families.py tests/benchmarks/test_attention_kernels.py tests/benchmarks/test_harness.py > $OUT/gpu_tests_fa4.txt 2>&1; echo "tests rc=$?"
tail -25 $OUT/gpu_tests_fa4.txt
