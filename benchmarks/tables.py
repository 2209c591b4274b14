"""The docs' tables of measured numbers, generated from the JSON records in ``benchmarks/results/``.

    python -m benchmarks.tables            # rewrite every generated table in README.md and docs/
    python -m benchmarks.tables --check    # exit 1 naming each table that differs from its records

A generated table sits between ``<!-- table:NAME -->`` and ``<!-- /table:NAME -->`` in a Markdown
file. Its first line names where its numbers come from (the GPU or machine, the torch version and
the command), read from the records themselves, so no number is typed by hand and each lives in one
record. ``tests/benchmarks/test_tables.py`` fails when a committed table is not what this makes.

Example:
    >>> print(splice("a\\n<!-- table:x -->\\nold\\n<!-- /table:x -->\\nb", "x", "new"))
    a
    <!-- table:x -->
    new
    <!-- /table:x -->
    b
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def _records(path: Path) -> list[dict]:
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else data.get("records", [data])


def _pick(records: list[dict], **match) -> dict:
    found = [r for r in records if all(r.get(k) == v for k, v in match.items())]
    if len(found) != 1:
        raise ValueError(f"{len(found)} records match {match}; expected one")
    return found[0]


def headline() -> str:
    """The seed workload on one H100: padded eager against packed, compiled, fused, CUDA graphs."""
    folder = RESULTS / "seed-workload" / "2026-11-24-h100-speed2"
    lines = []
    rows = []
    for mode, name in (("train", "r_all_bw.json"), ("eval", "e_r_all.json")):
        records = _records(folder / name)
        base, packed = _pick(records, collate="pad_max"), _pick(records, collate="concat")
        rows.append((mode, base, packed))
    first = rows[0][2]
    lines.append(f"{first['gpu']}, torch {first['torch']}, `{_short(first['command'])}` "
                 f"(`--mode eval` without `--bf16-weights` for eval); records in `{folder.relative_to(ROOT)}/`:")
    lines.append("")
    lines.append("| seed workload, 16,384-token packs | pad_max + sdpa eager | concat + flash "
                 f"({first['backend']}), fused, CUDA graphs | matmul roofline |")
    lines.append("|---|---|---|---|")
    for mode, base, packed in rows:
        lines.append(f"| {mode} | {base['ms_per_step']:.1f} ms | {packed['ms_per_step']:.1f} ms, "
                     f"{packed['speedup_vs_baseline']:.2f}x | {packed['roofline_fraction']:.0%} |")
    return "\n".join(lines)


def seed_h100() -> str:
    """Every collate and adapter on the seed workload, eager, train and eval, each against pad_max."""
    folder = RESULTS / "seed-workload" / "2026-11-22-h100-kernels"
    runs = [("train.json", "eval.json", ""), ("flex_train.json", "flex_eval.json", ", separate run"),
            ("fa4_train.json", "fa4_eval.json", ", separate run")]
    first = _records(folder / "train.json")[0]
    lines = [f"{first['gpu']}, torch {first['torch']}, `{_short(first['command'])}` and `--mode eval` (the flex and "
             f"flash-attn-4 rows: `--collate concat`, `--attn flex`, in separate runs); records in "
             f"`{folder.relative_to(ROOT)}/`:", "",
             "| collate + adapter (backend) | padding | train ms/step | train real tok/s | x pad_max | eval ms/step "
             "| eval real tok/s | x pad_max |", "|---|---|---|---|---|---|---|---|"]
    seen = set()
    for train_file, eval_file, note in runs:
        train, evals = _records(folder / train_file), _records(folder / eval_file)
        for t in train:
            key = (t["collate"], t["attn"], t["backend"])
            if key in seen:
                continue  # a separate run's own pad_max baseline: its ratio is in the row
            seen.add(key)
            e = _pick(evals, collate=t["collate"], attn=t["attn"], backend=t["backend"])
            name = f"{t['collate']}{' x64' if t['collate'] == 'pad_longest' else ''} + {t['attn']}"
            if t["collate"] in ("concat", "xformers"):
                name += f" ({t['backend']}{note})"
            lines.append(f"| {name} | {t['padding_fraction']:.1%} | {t['ms_per_step']:.1f} | {_k(t['tokens_per_s'])} | "
                         f"{t['speedup_vs_baseline']:.2f} | {e['ms_per_step']:.1f} | {_k(e['tokens_per_s'])} | "
                         f"{e['speedup_vs_baseline']:.2f} |")
    return "\n".join(lines)


def seed_h200() -> str:
    """The seed and long-context workloads on an H200: eager padding against packed, eager and compiled."""
    folder = RESULTS / "seed-workload" / "2026-11-22-h200-seed"
    rows = [("seed, train", "seed_train", "seed_compiled_train"), ("seed, eval", "seed_eval", "seed_compiled_eval"),
            ("long, train", "long_train", "long_compiled_train"), ("long, eval", "long_eval", None),
            ("long, train, FlashAttention-4", "long_fa4_train", "long_fa4_compiled_train"),
            ("long, eval, FlashAttention-4", "long_fa4_eval", None)]
    first = _records(folder / "seed_train.json")[0]
    lines = [f"{first['gpu']}, torch {first['torch']}; each file's command is in its records, in "
             f"`{folder.relative_to(ROOT)}/`:", "",
             "| workload | pad_max + sdpa eager, ms/step | concat + flash eager | concat + flash compiled |",
             "|---|---|---|---|"]
    for label, eager_name, compiled_name in rows:
        eager = _records(folder / f"{eager_name}.json")
        base, packed = _pick(eager, collate="pad_max"), _pick(eager, collate="concat")
        cells = [f"{base['ms_per_step']:.1f} ({_k(base['tokens_per_s'])} tok/s)",
                 f"{packed['ms_per_step']:.1f} ms, {packed['speedup_vs_baseline']:.2f}x"]
        if compiled_name is None:
            cells.append("not run")
        else:
            compiled = _pick(_records(folder / f"{compiled_name}.json"), collate="concat")
            cells.append(f"{compiled['ms_per_step']:.1f} ms, {compiled['speedup_vs_baseline']:.2f}x")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def static_h200() -> str:
    """Static 16,384-token packs, compiled once, against the same packs padded, on an H200."""
    folder = RESULTS / "seed-workload" / "2026-11-22-h200-static"
    first = _records(folder / "static_compiled_train.json")[1]
    lines = [f"{first['gpu']}, torch {first['torch']}, `{_short(first['command'])}` and `--mode eval`; records in "
             f"`{folder.relative_to(ROOT)}/`:", "",
             "| seed workload, 16,384-token packs | pad_max + sdpa eager (same packs) | concat + flash, compiled, static |",
             "|---|---|---|"]
    for mode in ("train", "eval"):
        records = _records(folder / f"static_compiled_{mode}.json")
        base, packed = _pick(records, collate="pad_max"), _pick(records, collate="concat")
        lines.append(f"| {mode} | {base['ms_per_step']:.1f} ms ({_k(base['tokens_per_s'])} tok/s) | "
                     f"{packed['ms_per_step']:.1f} ms, {_k(packed['tokens_per_s'])} tok/s, "
                     f"{packed['speedup_vs_baseline']:.2f}x |")
    return "\n".join(lines)


def hf_h100() -> str:
    """Seed-size transformers models compiled on an H100: padded, packed static, and the peer collator."""
    folder = RESULTS / "transformers" / "2026-11-24-h100-hf-compiled"
    first = _records(folder / "llama_train.json")[0]
    lines = [f"{first['gpu']}, torch {first['torch']}, transformers {first['transformers']}, "
             f"`python -m benchmarks.hf --compile --arch llama|gpt2 --steps 40`; records in `{folder.relative_to(ROOT)}/`:",
             "", "| real tok/s | padded + sdpa, eager | padded + sdpa, compiled | **packed static, compiled** | "
             "x compiled padded | x eager padded | peer, compiled |", "|---|---|---|---|---|---|---|"]
    eager_packed = []
    for arch, name in (("llama", "Llama"), ("gpt2", "GPT-2")):
        records = _records(folder / f"{arch}_train.json")
        pad = _pick(records, method="pad_max+sdpa", compiled=False)
        pad_c = _pick(records, method="pad_max+sdpa", compiled=True)
        packed = _pick(records, method="static+packing_varlen", compiled=True)
        peer = _pick(records, method="flatten+flash_attention_4", compiled=True)
        eager_packed.append((name, _pick(records, method="static+packing_varlen", compiled=False)))
        lines.append(f"| {name} | {_k(pad['tokens_per_s'])} | {_k(pad_c['tokens_per_s'])} | "
                     f"**{_k(packed['tokens_per_s'])}** ({packed['graphs']} graph, {packed['recompiles']} recompiles) | "
                     f"{packed['speedup_vs_compiled_baseline']:.2f} | {packed['speedup_vs_baseline']:.2f} | "
                     f"{_k(peer['tokens_per_s'])} ({peer['recompiles']} recompiles; median step "
                     f"{_k(peer['median_tokens_per_s'])}) |")
    lines += ["", "Uncompiled, the same static packs run at " + " and ".join(
        f"{_k(r['tokens_per_s'])} ({name})" for name, r in eager_packed) + ", "
        + " and ".join(f"{r['speedup_vs_baseline']:.2f}x" for _, r in eager_packed) + " eager padding."]
    return "\n".join(lines)


def nested_h100() -> str:
    """Compiled NestedTensors in eval against eager padding, on the current code (H100)."""
    folder = RESULTS / "seed-workload" / "2026-12-05-h100-nested-compiled-eval"
    records = _records(folder / "nested_eval.json")
    base, nested = _pick(records, collate="pad_max"), _pick(records, collate="nested")
    return "\n".join([
        f"{nested['gpu']}, torch {nested['torch']}, `{_short(nested['command'])}`; record in `{folder.relative_to(ROOT)}/`:",
        "", "| seed workload, eval | ms/step | real tok/s | recompiles | x pad_max |", "|---|---|---|---|---|",
        f"| pad_max + sdpa, eager | {base['ms_per_step']:.1f} | {_k(base['tokens_per_s'])} | - | 1.00 |",
        f"| nested + sdpa_nested, compiled | {nested['ms_per_step']:.1f} | {_k(nested['tokens_per_s'])} | "
        f"{nested['recompiles']} | {nested['speedup_vs_baseline']:.2f} |"])


def gpt2_eager_h100() -> str:
    """A transformers GPT-2 at the seed size, eager: each batch layout against padding (H100)."""
    folder = RESULTS / "transformers" / "2026-12-05-h100-gpt2-eager"
    train, evals = _records(folder / "hf_train.json"), _records(folder / "hf_eval.json")
    lines = [f"{train[0]['gpu']}, torch {train[0]['torch']}, transformers {train[0]['transformers']}, "
             f"`{_short(train[0]['command'])}` and `--mode eval`; records in `{folder.relative_to(ROOT)}/`:", "",
             "| method | train ms/step | train real tok/s | x pad_max | eval ms/step | eval real tok/s | x pad_max |",
             "|---|---|---|---|---|---|---|"]
    for row in train:
        other = _pick(evals, method=row["method"])
        lines.append(f"| {row['method']} | {row['ms_per_step']:.1f} | {_k(row['tokens_per_s'])} | "
                     f"{row['speedup_vs_baseline']:.2f} | {other['ms_per_step']:.1f} | {_k(other['tokens_per_s'])} | "
                     f"{other['speedup_vs_baseline']:.2f} |")
    return "\n".join(lines)


def qwen3_same_run() -> str:
    """The compiled Qwen3-0.6B-shape step of pack(model) against the tree before it, one device call."""
    folder = RESULTS / "transformers" / "2026-12-05-h100-pack-same-run"
    base, new = _records(folder / "base_1.json")[0], _records(folder / "new_1.json")[0]
    lines = [f"{new['gpu']}, torch {new['torch']}, transformers {new['transformers']}, `{_short(new['command'])}`, "
             f"the baseline tree first, in the same device call; records in `{folder.relative_to(ROOT)}/`:", "",
             "| tree | ms/step | real tok/s | peak memory | graphs | recompiles |", "|---|---|---|---|---|---|"]
    for name, r in (("before `pack(model)` (6837b42)", base), ("`pack(model)`", new)):
        lines.append(f"| {name} | {r['ms_per_step']:.1f} | {_k(r['tokens_per_s'])} | "
                     f"{r['peak_mem_bytes'] / 2**30:.2f} GiB | {r['graphs']} | {r['recompiles']} |")
    lines += ["", f"`pack(model)`'s step is {new['ms_per_step'] / base['ms_per_step']:.3f}x the baseline's."]
    return "\n".join(lines)


def context_balance() -> str:
    """The context-parallel layout's balance by its cost model, against a contiguous split."""
    folder = RESULTS / "distributed" / "2026-12-07-cpu-context-balance"
    records = _records(folder / "dim1024.json")
    lines = [f"`{_short(records[0]['command'])}` (the cost model, d = {records[0]['dim']}: no GPU); record in "
             f"`{folder.relative_to(ROOT)}/`:", "",
             "| row of 131,072 tokens | N | contiguous: attention max/mean | contiguous: work max/mean | layout: attention "
             "max/mean | layout: work max/mean | documents cut | tokens all-gathered (none padded) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['row']} ({r['docs']} documents, longest {r['longest']:,}) | {r['world_size']} | "
                     f"{r['contiguous_attention_max_over_mean']:.3f} | {r['contiguous_work_max_over_mean']:.3f} | "
                     f"{r['layout_attention_max_over_mean']:.3f} | {r['layout_work_max_over_mean']:.3f} | "
                     f"{r['cut_documents']} | {r['gathered_tokens']:,} |")
    return "\n".join(lines)


def context_tiles() -> str:
    """The layouts' work in a tiled kernel's (128 x 128) blocks, per spread and alignment, on the
    log-normal mix (one document costs its own tiles at every setting)."""
    folder = RESULTS / "distributed" / "2026-12-07-cpu-context-balance"
    records = [r for r in _records(folder / "tiles.json") if r["docs"] > 1 and r["world_size"] > 2]
    first = records[0]
    lines = [f"`{_short(first['command'])}` (tiles of {first['tile']} tokens, d = {first['dim']}: a count, no GPU); "
             f"record `{folder.relative_to(ROOT)}/tiles.json`, on the log-normal mix ({first['docs']} documents, "
             f"longest {first['longest']:,}):", "",
             "| N | spread | align | attention max/mean | tiles: slowest x N / whole row | tiles: sum of ranks / whole row |",
             "|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['world_size']} | {r['spread']} | {r['align']} | {r['layout_attention_max_over_mean']:.3f} | "
                     f"{r['tiles_slowest_x_n_over_whole']:.3f} | {r['tiles_sum_over_whole']:.3f} |")
    return "\n".join(lines)


def context_simulate() -> str:
    """Each context-parallel rank's attention on one GPU (``benchmarks.cp --simulate``): the
    contiguous split against the head-tail layout, cut anywhere or on 128-token edges, over every
    rank or the fewest, on one long document and on a log-normal mix."""
    folder = RESULTS / "distributed" / "2026-12-07-h100-context-align"
    runs = [_records(folder / f"{name}.json")[0] for name in
            ("fa4_one_doc_n8", "fa4_lognormal_n8", "torch_one_doc_n8", "torch_lognormal_n8", "torch_lognormal_n8_fewest")]
    first = runs[1]
    lines = [f"{first['gpu']}, torch {first['torch']}, flash-attn-4 {first['kernels']['flash-attn-4']} (and torch's "
             f"`varlen_attn`), {first['dtype']}, {first['heads']} heads of {first['head_dim']}, forward and backward, "
             f"ranks one after another; `{_short(first['command'])}` (one document: `--lengths` of 131072; torch's "
             f"kernel: `--kernel torch.varlen_attn`; the last rows `--spread fewest --align 128 --order planned "
             f"tails-first`); records and the commands in `{folder.relative_to(ROOT)}/`. The step includes the picking "
             "of the cut documents' keys and the gradients' return; the GPU-busy time leaves out the host's launch "
             "gaps; the kernel alone runs the step's call on keys picked beforehand:", "",
             "| row of 131,072 tokens | kernel | N | unsharded step | layout | documents cut | max/mean | "
             "slowest x N / unsharded: step | GPU busy | kernel alone |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        name = "one document" if r["docs"] == 1 else f"log-normal mix ({r['docs']} documents, longest {r['longest']:,})"
        for layout in r["layouts"]:
            lines.append(f"| {name} | {r['kernel']} | {r['world_size']} | {r['whole_row_ms']:.1f} ms | {layout['layout']} | "
                         f"{layout['cut_documents']} | {_cost_cells(layout)} |")
    return "\n".join(lines)


def _cost_cells(layout: dict) -> str:
    """A simulated layout's max/mean and its slowest rank x N over the unsharded row (the step, GPU
    busy, the kernel alone), as table cells."""
    return (f"{layout['max_over_mean']:.3f} | {layout['slowest_x_n_over_whole']:.3f} | "
            f"{layout['busy_slowest_x_n_over_whole']:.3f} | {layout['kernel_slowest_x_n_over_whole']:.3f}")


def context_sweep() -> str:
    """The split fraction, the spread and the cost model the layout is planned with, swept on one
    GPU for both kernels (``benchmarks.cp --simulate 8``); each record's contiguous split is left
    out (the table above has it)."""
    folder = RESULTS / "distributed" / "2026-12-07-h100-context-sweep"
    names = ("torch_mix", "torch_mix_area", "fa4_mix", "fa4_mix_again", "fa4_mix_area", "fa4_mix_area_again",
             "one_doc_torch", "one_doc_fa4")
    runs = [(name, _records(folder / f"{name}.json")[0]) for name in names]
    first, fa4 = runs[0][1], dict(runs)["fa4_mix"]
    lines = [f"{first['gpu']}, torch {first['torch']}, flash-attn-4 {fa4['kernels']['flash-attn-4']}, "
             f"{first['dtype']}, {first['heads']} heads of {first['head_dim']}, N = {first['world_size']}, one warm "
             f"machine; `{_short(first['command'])}` (FA4: `--kernel flash-attn-4`; attention only: `--area-cost 1`; the "
             f"runs marked again: `--split-fraction 0.5 1 --repeats 20`; one document: `--lengths` of 131072 `--repeats 3`); records "
             f"in `{folder.relative_to(ROOT)}/`. The area cost is what the layout balances: 0.000163 (1/6144, the default) "
             "weighs a (query, key) pair against a token as a width-1024 model's layers do; 1 weighs the pairs almost "
             "alone, as this benchmark times attention alone. The runs marked again passed 0.000163, which plans "
             "the same layouts as 1/6144:", "",
             "| row of 131,072 tokens | kernel | area cost | layout | documents cut | all-gathered | max/mean | "
             "slowest x N / unsharded: step | GPU busy | kernel alone |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs:
        row = "one document" if r["docs"] == 1 else "log-normal mix"
        cost = f"{r['area_cost']:.3g}" + (" (attention only)" if r["area_cost"] == 1 else "")
        again = ", again" if name.endswith("again") else ""
        for layout in r["layouts"][1:]:
            lines.append(f"| {row} | {r['kernel']} | {cost}{again} | {layout['layout']} | {layout['cut_documents']} | "
                         f"{layout['gathered_pct']:.1f}% | {_cost_cells(layout)} |")
    return "\n".join(lines)


def _k(tokens_per_s: float) -> str:
    """98,364 -> 98.4k; 271,034 -> 271k (three significant figures)."""
    k = tokens_per_s / 1000
    return f"{k:.1f}k" if k < 100 else f"{k:.0f}k"


def samplers() -> str:
    """Each sampling strategy's token efficiency on the seed distribution."""
    path = RESULTS / "samplers" / "samplers.json"
    record = json.loads(path.read_text())
    machine = record["machine"]
    names = {"random batches of 32 padded to max_len": f"random batches of 32 padded to {record['max_len']}",
             "random batches of 32 padded to the longest": "random batches of 32 padded to the longest",
             "random batches of 32 padded to the longest, x64": "random batches of 32 padded to the longest, rounded to 64",
             "LengthBucketSampler": "`LengthBucketSampler`", "PackingSampler": "`PackingSampler`",
             "StreamPacker, buffer 4096": "`StreamPacker`, 4096-document buffer"}
    lines = [f"{record['docs']:,} seed lengths, budget {record['max_tokens']:,} tokens; {machine['cpu']}, "
             f"{machine['cores_visible']} core, Python {machine['python']}, numpy {machine['numpy']}; "
             f"`{_short(record['command'])}`:", "",
             "| strategy | real tokens / computed positions |", "|---|---|"]
    for row in record["efficiency"]:
        lines.append(f"| {names[row['strategy']]} | {row['efficiency']:.2%} |")
    plans = ", ".join(f"{p['seconds']:.2f} s (`{p['sampler']}`)" for p in record["plan_seconds"])
    lines += ["", f"Planning one epoch of {record['plan_seconds'][0]['docs']:,} lengths takes {plans}."]
    return "\n".join(lines)


def families() -> str:
    """The committed family matrix: every causal LM of one transformers release, per implementation."""
    from benchmarks.hf_families import IMPLEMENTATIONS

    table = json.loads((ROOT / "packing" / "interop" / "hf_families.json").read_text())
    lines = [f"transformers {table['transformers']}, CPU, fp32; `python -m benchmarks.hf_families --write`; "
             "record `packing/interop/hf_families.json`:", "",
             "| family | " + " | ".join(f"`{i}`" for i in IMPLEMENTATIONS) + " |",
             "|---|" + "---|" * len(IMPLEMENTATIONS)]
    for family, verdicts in sorted(table["families"].items()):
        cells = [_verdict(verdicts.get(i, "-")) for i in IMPLEMENTATIONS]
        lines.append(f"| {family} | " + " | ".join(cells) + " |")
    exact = {i: sum(v.get(i) == "exact" for v in table["families"].values()) for i in IMPLEMENTATIONS}
    lines += ["", "Exact: " + ", ".join(f"{n} families with `{i}`" for i, n in exact.items()) + "."]
    return "\n".join(lines)


def _verdict(status: str) -> str:
    return "exact" if status == "exact" else "refused: " + status.removeprefix("refused: ").replace("|", "/")[:160]


def _short(command: str) -> str:
    """A recorded command without its output paths (they name the machine the run wrote to)."""
    return re.sub(r" --(json|profile) \S+", "", command)


TABLES: dict[str, Callable[[], str]] = {"headline": headline, "seed_h100": seed_h100, "seed_h200": seed_h200, "static_h200": static_h200, "hf_h100": hf_h100,
                                         "nested_h100": nested_h100, "gpt2_eager_h100": gpt2_eager_h100,
                                         "qwen3_same_run": qwen3_same_run, "context_balance": context_balance,
                                         "context_tiles": context_tiles, "context_simulate": context_simulate,
                                         "context_sweep": context_sweep,
                                         "samplers": samplers,
                                         "families": families}
PAGES = (ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")))


def splice(text: str, name: str, table: str) -> str:
    """``text`` with the block between table ``name``'s markers replaced by ``table``."""
    pattern = re.compile(rf"(<!-- table:{name} -->\n)(?:.*?\n)?(<!-- /table:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- table:{name} --> ... <!-- /table:{name} --> markers")
    return pattern.sub(lambda m: m[1] + table + "\n" + m[2], text)


def regenerate(check: bool) -> list[str]:
    """Rewrite (or, ``check``, compare) every generated table; returns 'page: table' for each that differs."""
    stale = []
    for page in PAGES:
        text = page.read_text()
        names = re.findall(r"<!-- table:([a-z0-9_]+) -->", text)
        new = text
        for name in names:
            if name not in TABLES:
                raise ValueError(f"{_name(page)}: unknown table {name!r}; known: {', '.join(TABLES)}")
            new = splice(new, name, TABLES[name]())
        if new != text:
            stale += [f"{_name(page)}: {n}" for n in names if splice(text, n, TABLES[n]()) != text]
            if not check:
                page.write_text(new)
    return stale


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else str(page)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.tables", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 if a table differs from its records")
    args = p.parse_args(argv)
    stale = regenerate(args.check)
    for line in stale:
        print(f"{'stale' if args.check else 'rewrote'}: {line}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
