"""A transformers model's packed row on a CPU against the same documents padded: time and memory.

    python -m benchmarks.hf_cpu --json benchmarks/results/transformers/hf_cpu.json

One train step (forward and backward, fp32) of a small Llama (``--layers``, ``--dim``) on the seed
distribution's documents (lengths U[1, 1023]) filling ``--tokens`` real tokens: packed in one row
through ``packing_varlen`` (its CPU path gathers the documents: no (T, T) mask), against the same
documents padded to ``max_len`` (pad_max) through ``sdpa``. Each method runs in a fresh process, so
its peak resident memory (``ru_maxrss``, less the process's before the first step) is its own.
Prints each method's median step time and peak memory, and the ratio to pad_max's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.harness import Parser, positive

STEP = r"""
import json, resource, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch, transformers
transformers.logging.set_verbosity_error()
import packing.interop
from packing.data.synthetic import SyntheticDocs
from packing.interop.hf import pack
method, tokens, layers, dim, steps = sys.argv[1], *map(int, sys.argv[2:6])
torch.manual_seed(0)
docs, total = [], 0
source = SyntheticDocs(10**6, max_len=1024, vocab_size=1000, seed=0)
for i in range(len(source)):
    d = source[i][0]  # the document's tokens (its inputs)
    if total + len(d) > tokens:
        break
    docs.append(d); total += len(d)
config = transformers.LlamaConfig(vocab_size=1000, hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
                                  num_attention_heads=max(1, dim // 64), num_key_value_heads=max(1, dim // 64),
                                  max_position_embeddings=1024)
model = transformers.LlamaForCausalLM(config)
if method == "packed":
    model.set_attn_implementation("packing_varlen")
    kwargs = pack(model)(docs)
else:
    model.set_attn_implementation("sdpa")
    ids = torch.zeros(len(docs), 1024, dtype=torch.long)
    mask = torch.zeros(len(docs), 1024, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = d; mask[i, : len(d)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
times = []
for _ in range(steps):
    start = time.perf_counter()
    model(**kwargs).loss.backward()
    times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB
print(json.dumps({"seconds": statistics.median(times), "peak_gib": peak, "docs": len(docs), "tokens": total}))
"""


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.hf_cpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=positive, default=16384, help="real tokens of the row (default 16,384)")
    p.add_argument("--layers", type=positive, default=2, help="decoder layers (default 2)")
    p.add_argument("--dim", type=positive, default=128, help="hidden size (default 128)")
    p.add_argument("--steps", type=positive, default=3, help="train steps timed, median (default 3)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = {}
    for method in ("pad_max", "packed"):
        proc = subprocess.run([sys.executable, "-c", STEP, method, str(args.tokens), str(args.layers), str(args.dim),
                               str(args.steps)], capture_output=True, text=True)
        if proc.returncode:
            return p.fail(RuntimeError(f"{method}: {(proc.stderr.strip().splitlines() or ['no output'])[-1]}"))
        rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    base = rows["pad_max"]
    for method, row in rows.items():
        # A run too small to grow the process past its peak before the steps has no memory ratio.
        memory = row["peak_gib"] / base["peak_gib"] if base["peak_gib"] > 0 else None
        row.update(time_ratio=row["seconds"] / base["seconds"], memory_ratio=memory)
        print(f"{method:8} {row['docs']} docs, {row['tokens']:,} tokens: step {row['seconds']:.3f} s "
              f"({row['time_ratio']:.2f}x pad_max), peak {row['peak_gib']:.3f} GiB "
              f"({'-' if memory is None else f'{memory:.2f}x'})")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "command": p.command(argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
