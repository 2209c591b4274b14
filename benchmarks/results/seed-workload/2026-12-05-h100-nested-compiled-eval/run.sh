# Trip 3: carry .whl .whl-c47b. Stale claims re-measured (no FA on the path): compiled NestedTensors in eval; eager GPT-2 layouts.
cp .whl-c47b/* /tmp/c47/
. .whl/setup.sh
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
timeout 200 python -m benchmarks.varlen --collate nested --mode eval --compile --json $OUT/nested_eval.json > $OUT/nested_eval.log 2>&1; echo "nested rc=$?"
timeout 170 python -m benchmarks.hf --json $OUT/hf_train.json > $OUT/hf_train.log 2>&1; echo "hf train rc=$?"
timeout 150 python -m benchmarks.hf --mode eval --json $OUT/hf_eval.json > $OUT/hf_eval.log 2>&1; echo "hf eval rc=$?"
tail -8 $OUT/nested_eval.log $OUT/hf_train.log $OUT/hf_eval.log
