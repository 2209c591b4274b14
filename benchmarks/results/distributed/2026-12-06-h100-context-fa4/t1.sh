# Trip 1: carry .whl .whl-fa4a (stages FA4's first half). CP --simulate with torch's varlen kernel.
. .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
{ nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c "import torch,transformers;print('torch',torch.__version__,'transformers',transformers.__version__)"; } > $OUT/gpu.txt 2>&1; cat $OUT/gpu.txt
mkdir -p /tmp/fa4 && cp .whl-fa4a/* /tmp/fa4/
echo 131072 > /tmp/one_doc.txt
K="--kernel torch.varlen_attn"
for n in 2 4 8; do
  timeout 80 python -m benchmarks.cp --simulate $n --device cuda $K --split-fraction 0.5 0.1 0.25 1 --json $OUT/lognormal_n$n.json > $OUT/lognormal_n$n.txt 2>&1; echo "lognormal n=$n rc=$?"; tail -6 $OUT/lognormal_n$n.txt
done
for c in 1 0.0013; do
  timeout 60 python -m benchmarks.cp --simulate 8 --device cuda $K --area-cost $c --split-fraction 0.5 0.1 0.25 --json $OUT/lognormal_area${c}_n8.json > $OUT/lognormal_area${c}_n8.txt 2>&1; echo "lognormal area-cost $c n=8 rc=$?"; tail -5 $OUT/lognormal_area${c}_n8.txt
done
for n in 2 4 8; do
  timeout 80 python -m benchmarks.cp --simulate $n --device cuda $K --lengths /tmp/one_doc.txt --repeats 5 --json $OUT/one_doc_n$n.json > $OUT/one_doc_n$n.txt 2>&1; echo "one doc n=$n rc=$?"; tail -3 $OUT/one_doc_n$n.txt
done
