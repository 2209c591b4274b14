"""The family matrix: every causal LM of the installed transformers, packed against each document alone.

Every family transformers' auto classes know, each implementation packing accepts on a CPU, measured
by :func:`packing.interop.hf_verify.verify` (a tiny config verified as check_model verifies a
user's: one packed row of three documents against each alone through ``eager``; ``exact`` within
1e-5 relative, or the reason it is refused).

``packing/interop/hf_families.json`` holds the verdicts for the release it names: documentation of
the families (check_model verifies each user's own config). ``--write --family F`` merges F's
verdicts into it. The docs' family table is generated from it by ``python -m benchmarks.tables``.

Usage:
    python -m benchmarks.hf_families --write             # re-run all, rewrite the committed table
    python -m benchmarks.hf_families --write --family F  # re-run F, merged into the committed table
    python -m benchmarks.hf_families --family mistral    # one family, printed
    python -m benchmarks.hf_families --router-tail       # how a static padding tail moves MoE aux losses
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

import torch

from packing.interop.hf_verify import (  # noqa: F401  (the matrix's measurement, shared with check_config)
    IMPLEMENTATIONS, LENS, TOL, VOCAB, WINDOW, Verdict, build, families, tiny_config, verify)

# The families that must be exact with packing_varlen (issue 21): the README recipe's users.
MUST = ("llama", "qwen2", "qwen3", "qwen3_moe", "mistral", "mixtral", "gemma2", "gemma3_text", "phi3", "olmo2", "gpt2",
        "gpt_neox", "granite", "gpt_oss")

ROUTER_FAMILIES = ("mixtral", "qwen3_moe")
TAILS = (96, 144, 288)  # rows of these many slots around the 72 tokens of LENS


def router_tail(family: str) -> list[dict[str, float]]:
    """How far a static padding tail moves a mixture-of-experts model's router load-balancing loss.

    The tail's slots are routed like tokens, and ``load_balancing_loss_func`` gets no mask on the
    varlen path, so they count in the experts' load. Returns, per row length in TAILS, the aux loss
    with the tail, without it, and the language-model loss with and without (which the tail, having
    no targets, must not move).
    """
    from packing.interop.hf import pack

    model, docs = build(family)
    model.config.output_router_logits = True
    model.set_attn_implementation("packing_varlen")
    coef = model.config.router_aux_loss_coef
    rows = []
    with torch.no_grad():
        exact = model(**pack(model)(docs))
        for slots in TAILS:
            tail = model(**pack(model, pad_to_multiple_of=slots)(docs))
            rows.append({"slots": slots, "tokens": sum(LENS), "aux": tail.aux_loss.item(), "aux_no_tail": exact.aux_loss.item(),
                         "lm": tail.loss.item() - coef * tail.aux_loss.item(),
                         "lm_no_tail": exact.loss.item() - coef * exact.aux_loss.item(), "coef": coef})
    return rows


def table(verdicts: list[Verdict]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for v in verdicts:
        out.setdefault(v.family, {})[v.implementation] = v.status
    return out


def markdown(rows: dict[str, dict[str, str]]) -> str:
    """A Markdown table: one line a family, the verdict per implementation."""
    lines = ["| family | " + " | ".join(f"`{i}`" for i in IMPLEMENTATIONS) + " |",
             "|---|" + "---|" * len(IMPLEMENTATIONS)]
    for family, verdicts in rows.items():
        cells = ["exact" if verdicts.get(i) == "exact" else "refused: " + verdicts.get(i, "-").removeprefix("refused: ")
                 for i in IMPLEMENTATIONS]
        lines.append(f"| {family} | " + " | ".join(c.replace("|", "/")[:160] for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", action="append", help="only these model_types (repeatable)")
    parser.add_argument("--write", action="store_true", help="rewrite packing/interop/hf_families.json")
    parser.add_argument("--markdown", help="write the measured verdicts as a Markdown table to this file")
    parser.add_argument("--router-tail", action="store_true",
                        help=f"measure how a static padding tail moves the router aux loss of {', '.join(ROUTER_FAMILIES)}")
    args = parser.parse_args(argv)
    if args.router_tail:
        warnings.filterwarnings("ignore")
        for family in ROUTER_FAMILIES:
            for r in router_tail(family):
                print(f"{family}: {r['tokens']} tokens in {r['slots']} slots: aux loss {r['aux']:.5f} vs {r['aux_no_tail']:.5f} "
                      f"without the tail ({r['aux'] / r['aux_no_tail'] - 1:+.1%}); lm loss {r['lm']:.6f} vs "
                      f"{r['lm_no_tail']:.6f} (coef {r['coef']})")
        return 0
    known = families()
    chosen = args.family or list(known)
    unknown = [f for f in chosen if f not in known]
    if unknown:
        print(f"error: unknown model_type {unknown[0]!r}; transformers {transformers.__version__} knows "
              f"{len(known)} causal-LM families (e.g. {', '.join(list(known)[:5])})", file=sys.stderr)
        return 2
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    verdicts = []
    for family in chosen:
        for v in verify(family):
            verdicts.append(v)
            print(f"{family:28s} {v.implementation:15s} {v.status[:150]}", flush=True)
    rows = table(verdicts)
    exact = {i: sum(r.get(i) == "exact" for r in rows.values()) for i in IMPLEMENTATIONS}
    print(f"{len(rows)} families; exact: " + ", ".join(f"{i} {n}" for i, n in exact.items()))
    if args.write:
        from packing.interop.hf_families import TABLE

        committed = json.loads(TABLE.read_text())
        if args.family:  # some families: merged into the committed matrix, never cut down to them
            if committed["transformers"] != transformers.__version__:
                print(f"error: the committed matrix is of transformers {committed['transformers']}, this is "
                      f"{transformers.__version__}; merging one release's verdicts into another's would mix them: "
                      "run --write without --family", file=sys.stderr)
                return 2
            rows = dict(sorted({**committed["families"], **rows}.items()))
        TABLE.write_text(json.dumps({"transformers": transformers.__version__, "families": rows}, indent=1) + "\n")
        print(f"wrote {TABLE} ({len(rows)} families)")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
