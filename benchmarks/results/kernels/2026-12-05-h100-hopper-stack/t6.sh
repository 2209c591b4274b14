# Trip Y: carry .whl .whl-c47b: install quack 0.6.5 + FA4 b36 on nvidia-cutlass-dsl 4.7.1; GPU tests with fa4,quack required.
cp .whl-c47b/* /tmp/c47/
cat /tmp/c47/cu13.part.1 /tmp/c47/cu13.part.2 /tmp/c47/cu13.part.3 > "/tmp/c47/$(cat /tmp/c47/cu13.name)"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-q47 /tmp/c47/*.whl 2>&1 | tail -3
. .whl/setup.sh
export PYTHONPATH=$PWD:/tmp/site:/tmp/site-q47:/tmp/site-q47/nvidia_cutlass_dsl/dsl_packages
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python -c "
import torch; print(torch.cuda.get_device_name(), torch.__version__)
from importlib import metadata as m
for p in ('flash-attn-4','quack-kernels','nvidia-cutlass-dsl','nvidia-cutlass-dsl-libs-cu13','transformers'): print(p, m.version(p))
from models.fusion import quack_problem; print('quack_problem:', quack_problem())
from packing.kernels import varlen_kernels; print('varlen kernels:', sorted(varlen_kernels()))
" > $OUT/stack_471.txt 2>&1
python -c "import quack.linear, quack.rmsnorm, flash_attn.cute" >> $OUT/stack_471.txt 2>&1 || { tail -20 $OUT/stack_471.txt; exit 3; }; cat $OUT/stack_471.txt
REQUIRE_KERNELS=fa4,quack timeout 480 python -m pytest -q -rs -m gpu tests/models/test_cuda.py tests/packing/test_hf.py tests/packing/test_hf_pack.py tests/packing/test_hf_families.py tests/benchmarks/test_attention_kernels.py tests/benchmarks/test_harness.py > $OUT/gpu_tests_q47.txt 2>&1; echo "tests rc=$?"
tail -15 $OUT/gpu_tests_q47.txt
