# Trip 2: carry .whl .whl-fa4b devrun, right after trip 1. FA4 (nvidia-cutlass-dsl 4.8.1).
export USE_FA4=1; . .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
python -c "
import torch; print(torch.cuda.get_device_name(), torch.__version__)
from importlib import metadata as m
for p in ('flash-attn-4','nvidia-cutlass-dsl','transformers'): print(p, m.version(p))
from packing.kernels import chunk_varlen_kernels; print('chunk kernels:', list(chunk_varlen_kernels()))
" > $OUT/stack.txt 2>&1; cat $OUT/stack.txt
echo 131072 > /tmp/one_doc.txt
K="--kernel flash-attn-4"
timeout 70 python -m benchmarks.cp --simulate 8 --device cuda $K --split-fraction 0.5 0.25 --json $OUT/fa4_lognormal_n8.json > $OUT/fa4_lognormal_n8.txt 2>&1; echo "fa4 lognormal n=8 rc=$?"; tail -8 $OUT/fa4_lognormal_n8.txt
A="--device cuda --check --tokens 131072 --heads 16 --kv-heads 8 --head-dim 128"
timeout 90 torchrun --standalone --nproc-per-node 2 -m benchmarks.cp $A --kernel flash-attn-4 > $OUT/check_fa4_lognormal_n2.txt 2>&1; echo "check rc=$?"; grep -v "^W1\|^\*" $OUT/check_fa4_lognormal_n2.txt | tail -6
timeout 80 python -m benchmarks.cp --simulate 8 --device cuda $K --lengths /tmp/one_doc.txt --repeats 2 --json $OUT/fa4_one_doc_n8.json > $OUT/fa4_one_doc_n8.txt 2>&1; echo "fa4 one doc n=8 rc=$?"; tail -6 $OUT/fa4_one_doc_n8.txt
for n in 4 2; do
timeout 45 python -m benchmarks.cp --simulate $n --device cuda $K --split-fraction 0.5 --json $OUT/fa4_lognormal_n$n.json > $OUT/fa4_lognormal_n$n.txt 2>&1; echo "fa4 lognormal n=$n rc=$?"; tail -6 $OUT/fa4_lognormal_n$n.txt
done
