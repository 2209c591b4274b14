# Trip 2 (profile): carry .whl .whl-fa4b devrun, right after trip 1. FA4 profiled, then the toy GPT's and transformers GPU tests with FA4 and quack required.
export USE_FA4=1; . .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 100 python -m benchmarks.cp --simulate 8 --device cuda --kernel flash-attn-4 --repeats 5 --profile $OUT/profile_fa4_n8 > $OUT/profile_fa4_n8.txt 2>&1; echo "fa4 profile rc=$?"; tail -3 $OUT/profile_fa4_n8.txt
REQUIRE_KERNELS=fa4,quack timeout 330 python -m pytest -q -rs -m gpu tests/models/test_cuda.py tests/packing/test_hf.py tests/packing/test_hf_pack.py tests/packing/test_hf_families.py tests/benchmarks/test_attention_kernels.py tests/benchmarks/test_harness.py > $OUT/gpu_tests.txt 2>&1; echo "tests rc=$?"; tail -12 $OUT/gpu_tests.txt
