# Trip 1 (profile): carry .whl .whl-fa4a devrun. Stages FA4's first half; torch's varlen kernel profiled.
. .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
mkdir -p /tmp/fa4 && cp .whl-fa4a/* /tmp/fa4/
timeout 150 python -m benchmarks.cp --simulate 8 --device cuda --kernel torch.varlen_attn --repeats 5 --profile $OUT/profile_torch_n8 > $OUT/profile_torch_n8.txt 2>&1; echo "torch profile rc=$?"; tail -3 $OUT/profile_torch_n8.txt
ls $OUT/profile_torch_n8
