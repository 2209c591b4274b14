"""What verifying a user's config costs at its first use, and once cached.

    python -m benchmarks.verify_cost --json benchmarks/results/families/verify_cost.json

For each config (1B-class shapes as their model cards give them), in a fresh process with
transformers imported (as it is once a user has built their model) and an empty cache folder:
the seconds of ``verify_config`` measured (the reduced copy built, the documents run alone and
packed), then of the same call again in a new process reading the cache. The target is 2 s at
first use, for the implementation checked (``packing_varlen``, as the README's recipe loads).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import Parser

CONFIGS = {
    "Llama-3.2-1B": ("LlamaConfig", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                         rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                          "high_freq_factor": 4.0, "rope_theta": 500000.0,
                                                          "original_max_position_embeddings": 8192},
                                         tie_word_embeddings=True)),
    "Qwen3-0.6B": ("Qwen3Config", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "Qwen3-1.7B": ("Qwen3Config", dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936)),
    "gemma-3-1b": ("Gemma3TextConfig", dict(hidden_size=1152, intermediate_size=6912, num_hidden_layers=26,
                                            num_attention_heads=4, num_key_value_heads=1, head_dim=256,
                                            sliding_window=512, vocab_size=262144)),
    "OLMoE-1B-7B": ("OlmoeConfig", dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=16,
                                        num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                                        num_experts_per_tok=8, vocab_size=50304)),
}

ONE = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import transformers
import packing.interop
from packing.interop.verify import verify_config
name, fields, implementation = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
config = getattr(transformers, name)(**fields)
start = time.perf_counter()
verdict = verify_config(config, implementation)
print(json.dumps({"seconds": time.perf_counter() - start, "status": verdict.status, "cached": verdict.cached}))
"""


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m benchmarks.verify_cost", description=__doc__.split("\n\n")[0])
    p.add_argument("--implementation", default="packing_varlen", help="the implementation verified (default packing_varlen)")
    p.add_argument("--config", action="append", choices=list(CONFIGS), help="only these configs (repeatable)")
    p.add_argument("--json", metavar="PATH")
    args = p.parse_args(argv)
    rows = []
    for label in args.config or CONFIGS:
        name, fields = CONFIGS[label]
        cache = Path(tempfile.mkdtemp(prefix="verify-cost-"))
        try:
            runs = []
            for _ in range(2):  # first use, then cached
                proc = subprocess.run([sys.executable, "-c", ONE, name, json.dumps(fields), args.implementation],
                                      capture_output=True, text=True, env={"PACKING_CACHE_DIR": str(cache), "PATH": "/usr/bin:/bin"})
                if proc.returncode:
                    return p.fail(RuntimeError(f"{label}: {proc.stderr.strip().splitlines()[-1]}"))
                runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(cache, ignore_errors=True)
        first, cached = runs
        rows.append({"config": label, "status": first["status"], "first_use_s": first["seconds"],
                     "cached_s": cached["seconds"], "cached": cached["cached"]})
        print(f"{label:14} {first['status'][:60]:60} first use {first['seconds']:6.3f} s   cached {cached['seconds']:.4f} s",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"implementation": args.implementation, "rows": rows,
                                               "command": p.command(argv)}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
