"""Verify a transformers config on packed rows, live: a reduced copy of the user's own config, one
packed row against each document alone, in fp32 on the CPU, before the first step.

A family passing with some tiny config says little about the config a user trains: a window that
only the attention mask carries, a bias, a rope scaling or a softcap that the tiny config leaves
off can each make packed rows silently differ from the documents alone. So the config itself is
verified. :func:`reduce_config` keeps every feature of it and cuts only its size:

- **kept:** each distinct kind of layer (its ``layer_types`` entry, every other per-layer list,
  dense or mixture-of-experts MLP), the window (cut to :data:`WINDOW` tokens, so the documents
  outrun it), the rope type and scaling, softcaps, sinks, scalings, biases, head dimensions, the
  grouped-query ratio and the experts' routing (top-k, groups);
- **cut:** the depth to one layer per distinct kind, the heads to a few (ratio kept), the width
  with them, the MLP widths, the vocabulary to :data:`VOCAB` and the experts to a few.

:func:`verify_config` builds the model's causal LM from the reduced config, runs documents of
:data:`LENS` tokens alone through ``eager`` and packed in one row through the implementation, and
returns a :class:`Verdict`: ``exact`` (logits and loss within :data:`TOL` relative), or the reason
it is refused, with the measured error and, where one is found, the feature that causes it (each
candidate switched off in turn until the row is exact). With ``packing_varlen`` it also counts the
layers that called it: a model that routes attention around transformers' attention interface is
refused by name. Verdicts are cached by the transformers version, the reduced config's fingerprint
and the implementation, in memory and under :func:`cache_dir`; a cached verdict costs nothing.

From the command line (a user error prints one line and exits 2)::

    python -m packing.interop.verify --config path/to/config.json --implementation packing_varlen
    python -m packing.interop.verify --family llama

Examples:
    >>> import transformers
    >>> config = transformers.MistralConfig(num_hidden_layers=32, sliding_window=4096)
    >>> small = reduce_config(config)
    >>> small.num_hidden_layers, small.sliding_window, small.head_dim == config.head_dim
    (2, 8, True)
    >>> verify_config(transformers.LlamaConfig(num_hidden_layers=3), "sdpa").status
    'exact'
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["LENS", "TOL", "VOCAB", "WINDOW", "Verdict", "cache_dir", "reduce_config", "verify_config", "verify_loss"]

LENS = (30, 17, 25)  # the documents' lengths: longer than WINDOW, unequal, none a power of two
VOCAB = 256
WINDOW = 8
TOL = 1e-5
HEADS = 4  # query heads of a multi-head config after reduction; grouped-query keeps its ratio
MLP = 64
EXPERTS = 4
VERSION = 1  # of the reduction and the measurement: a change here invalidates every cached verdict
MAX_PARAMS = 60_000_000  # a reduced model this large is not what reduce_config makes: refused as unverifiable

EXPERT_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
TOP_K_FIELDS = ("num_experts_per_tok", "moe_topk", "top_k", "moe_top_k")
MLP_FIELDS = ("intermediate_size", "moe_intermediate_size", "shared_expert_intermediate_size", "ffn_dim", "n_inner",
              "expert_intermediate_size")
TOKEN_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id")
# Fields that name a checkpoint, not a computation: left out of the fingerprint.
UNCOMPUTED = ("output_router_logits", "_name_or_path", "transformers_version", "architectures", "dtype", "torch_dtype", "_commit_hash",
              "auto_map", "use_cache", "output_attentions", "output_hidden_states", "return_dict")


@dataclass(frozen=True)
class Verdict:
    """What verifying one config with one implementation found.

    status: ``"exact"``, or why packed rows are refused; error: the packed logits' (or loss's)
    relative error against each document alone, where the packed row ran; cause: the config
    field whose feature, switched off, made the row exact (None if none was found or needed);
    seconds: the measurement's time (0 when cached); cached: from this process's memory or the
    cache folder, not measured by this call.
    """

    implementation: str
    status: str
    error: float | None = None
    cause: str | None = None
    seconds: float = 0.0
    cached: bool = False

    @property
    def exact(self) -> bool:
        return self.status == "exact"


def _text_config(config: Any) -> Any:
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):
        return config


def _get(config: Any, key: str) -> Any:
    try:
        return getattr(config, key, None)
    except Exception:  # noqa: BLE001 - a heterogeneous config raises on a global read of a per-layer field
        return None


def _set(config: Any, key: str, value: Any) -> None:
    # A read-only property, or a value the config's own validation refuses: keep what it has.
    with contextlib.suppress(Exception):
        setattr(config, key, value)


def _per_layer(text: Any, n: Any) -> dict[str, Any]:
    """The config's fields that hold one entry per layer (``layer_types``, ``no_rope_layers``, ...)."""
    return {k: v for k, v in vars(text).items()
            if isinstance(v, (list, tuple)) and len(v) == n and k != "architectures"}


def _kept_layers(text: Any) -> list[int]:
    """Indices of one layer per distinct kind: the per-layer lists' entries and dense or MoE MLP."""
    n = _get(text, "num_hidden_layers")
    if not isinstance(n, int) or n < 1:
        return []
    lists = _per_layer(text, n)
    dense_first = _get(text, "first_k_dense_replace")
    mlp_only = set(_get(text, "mlp_only_layers") or ())
    step = _get(text, "decoder_sparse_step")

    def kind(i: int) -> tuple:
        dense = (isinstance(dense_first, int) and i < dense_first) or i in mlp_only or (
            isinstance(step, int) and step > 1 and (i + 1) % step != 0)
        return tuple(json.dumps(v[i], sort_keys=True, default=str) for v in lists.values()) + (dense,)

    seen: dict[tuple, int] = {}
    for i in range(n):
        seen.setdefault(kind(i), i)
    kept = sorted(seen.values())
    if len(kept) == 1 and n > 1:
        kept.append(1)  # two layers at least: the second sees the first's output across documents
    return kept


def reduce_config(config: Any) -> Any:
    """A copy of ``config`` with every feature kept and its size cut (module docstring).

    The copy's text config has one layer per distinct kind (at least two), a few heads with the
    grouped-query ratio and head dimension kept, MLP widths of ``MLP``, ``VOCAB`` tokens, a window of
    at most ``WINDOW``, and ``EXPERTS`` experts or as many as its routing needs. Dropout is 0.
    """
    config = copy.deepcopy(config)
    text = _text_config(config)
    n = _get(text, "num_hidden_layers")
    kept = _kept_layers(text)
    if kept:
        for key, value in _per_layer(text, n).items():
            _set(text, key, type(value)(value[i] for i in kept))
        if isinstance(_get(text, "first_k_dense_replace"), int):
            _set(text, "first_k_dense_replace", sum(i < text.first_k_dense_replace for i in kept))
        if _get(text, "mlp_only_layers"):
            _set(text, "mlp_only_layers", [j for j, i in enumerate(kept) if i in set(text.mlp_only_layers)])
        if isinstance(_get(text, "max_window_layers"), int):
            _set(text, "max_window_layers", sum(i < text.max_window_layers for i in kept))
        _set(text, "num_hidden_layers", len(kept))
    heads, kv = _get(text, "num_attention_heads"), _get(text, "num_key_value_heads")
    if isinstance(heads, int) and heads > 0:
        kv = kv if isinstance(kv, int) and kv > 0 and heads % kv == 0 else heads
        ratio = heads // kv
        new_kv = 1 if kv == 1 else min(kv, HEADS if ratio == 1 else 2)
        new_heads = new_kv * ratio if kv > 1 else min(heads, HEADS)
        hidden = _get(text, "hidden_size")
        if isinstance(hidden, int) and hidden * new_heads % heads == 0:
            if _get(text, "head_dim") is None and hidden % heads == 0:
                _set(text, "head_dim", hidden // heads)  # the head dimension stays what it was
            _set(text, "hidden_size", hidden * new_heads // heads)
            _set(text, "num_attention_heads", new_heads)
            if _get(text, "num_key_value_heads") is not None:
                _set(text, "num_key_value_heads", new_kv)
    for key in MLP_FIELDS:
        if isinstance(_get(text, key), int) and _get(text, key) > MLP:
            _set(text, key, MLP)
    top_k = max([_get(text, k) for k in TOP_K_FIELDS if isinstance(_get(text, k), int)] or [1])
    groups, topk_groups = _get(text, "n_group"), _get(text, "topk_group")
    for key in EXPERT_FIELDS:
        experts = _get(text, key)
        if isinstance(experts, int) and experts > EXPERTS:
            want = max(EXPERTS, top_k)
            if isinstance(groups, int) and groups > 1:  # grouped routing: every group keeps enough experts
                per_group = max(2, math.ceil(top_k / max(1, topk_groups or 1)))
                want = groups * per_group
            _set(text, key, min(experts, want))
    if isinstance(_get(text, "vocab_size"), int):
        _set(text, "vocab_size", VOCAB)
    for key in TOKEN_FIELDS:
        if isinstance(_get(text, key), int) and _get(text, key) >= VOCAB:
            _set(text, key, 0)
    window = _get(text, "sliding_window")
    if isinstance(window, int) and not isinstance(window, bool) and window > WINDOW:
        _set(text, "sliding_window", WINDOW)
    for key, value in list(vars(text).items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            _set(text, key, 0.0)
    return config


def fingerprint(config: Any, implementation: str) -> str:
    """The cache key of verifying ``config`` (already reduced) with ``implementation`` here."""
    import transformers

    meta = {k: v for k, v in config.to_dict().items() if k not in UNCOMPUTED}
    text = json.dumps({"config": meta, "model_type": getattr(config, "model_type", None),
                       "implementation": implementation, "transformers": transformers.__version__,
                       "torch": torch.__version__.split("+")[0], "version": VERSION}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def cache_dir() -> Path:
    """Where verdicts are kept: ``$PACKING_CACHE_DIR``, else ``$XDG_CACHE_HOME/packing``, else
    ``~/.cache/packing``; a ``verdicts/`` folder inside it."""
    root = os.environ.get("PACKING_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "packing")
    return Path(root) / "verdicts"


_memo: dict[str, Verdict] = {}


def verify_config(config: Any, implementation: str, *, cache: bool = True) -> Verdict:
    """The verdict on packed rows for ``config`` (a transformers model's config, not reduced) with
    ``implementation``; measured once on a reduced copy (:func:`reduce_config`), then cached.

    ``flash_attention_2|3|4`` take ``packing_varlen``'s verdict: they read the same boundaries and
    options, and the CPU verification cannot run them.
    """
    from packing.interop.hf_families import VERDICT_OF

    measured_as = VERDICT_OF.get(implementation, implementation)
    reduced = reduce_config(config)
    return _cached(reduced, measured_as, lambda: _measure(reduced, measured_as), cache)


def verify_loss(config: Any, loss: Any, *, router: bool = False, cache: bool = True) -> Verdict:
    """Whether ``loss(model, kwargs)`` (the chunked causal-LM loss) equals ``model(**kwargs).loss``
    for ``config``: measured once on a reduced copy, packed through the config's implementation
    (``flash_attention_*`` as ``packing_varlen``), with the router's load-balancing loss on where
    ``router`` is, then cached as :func:`verify_config` does."""
    from packing.interop.hf_families import VERDICT_OF

    reduced = reduce_config(config)
    implementation = getattr(config, "_attn_implementation", None) or "eager"
    implementation = VERDICT_OF.get(implementation, implementation)

    def measure() -> tuple[str, float | None, None]:
        with _quiet():
            return (*_run_loss(reduced, loss, router, implementation), None)

    return _cached(reduced, f"causal_lm_loss{'+router' if router else ''}:{implementation}", measure, cache)


def _cached(reduced: Any, what: str, measure: Any, cache: bool) -> Verdict:
    """The verdict of ``what`` on ``reduced``: this process's, else the cache folder's (``cache``),
    else ``measure()`` -> (status, error, cause), timed, remembered and written to the folder."""
    key = fingerprint(reduced, what)
    if key in _memo:
        return replace(_memo[key], seconds=0.0, cached=True)
    path = cache_dir() / f"{key}.json"
    verdict = _read(path, what) if cache else None
    if verdict is None:
        start = time.perf_counter()
        status, error, cause = measure()
        verdict = Verdict(what, status, error, cause, time.perf_counter() - start)
        if cache:
            _write(path, verdict)
    _memo[key] = verdict
    return verdict


def _run_loss(reduced: Any, loss: Any, router: bool, implementation: str) -> tuple[str, float | None]:
    from packing import get_collator
    from packing.interop.hf import checked_kwargs
    from packing.interop.hf_families import unverified

    try:
        model = _model(causal_lm_class(reduced), reduced, router)
        _use(model, implementation)
        with unverified():
            kwargs = checked_kwargs(get_collator("concat")(_documents()), model)
        with torch.no_grad():
            ref = model(**kwargs).loss
            got = loss(model, kwargs, chunk=16)  # several chunks, as a long row has
    except ValueError as e:
        return f"refused: {_first_line(e)}", None
    except Exception as e:  # noqa: BLE001
        return f"not verifiable ({type(e).__name__}: {_first_line(e)})", None
    err = _rel(got, ref)
    return ("exact" if err <= TOL else f"it differs from the model's own loss by {err:.2%}"), err


def _read(path: Path, implementation: str) -> Verdict | None:
    """A cached verdict, or None where there is none or it is not one this code wrote."""
    try:
        data = json.loads(path.read_text())
        verdict = Verdict(implementation, data["status"], data["error"], data["cause"], 0.0, True)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    ok = (isinstance(verdict.status, str) and data.get("implementation") == implementation
          and (verdict.error is None or isinstance(verdict.error, float))
          and (verdict.cause is None or isinstance(verdict.cause, str)))
    return verdict if ok else None


def _write(path: Path, verdict: Verdict) -> None:
    """Write atomically (a temporary file renamed); a cache that cannot be written is skipped."""
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        record = {k: v for k, v in asdict(verdict).items() if k not in ("seconds", "cached")}
        temporary.write_text(json.dumps(record) + "\n")
        os.replace(temporary, path)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the reduced config's own warnings are not the user's
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def causal_lm_class(config: Any) -> Any:
    """The transformers causal-LM class of ``config``'s model type, or a ValueError naming it."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))
    if name is None or not hasattr(transformers, name):
        raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} has no causal LM in transformers "
                         f"{transformers.__version__}; register its causal LM with transformers' auto classes so it "
                         "can be verified")
    return getattr(transformers, name)


def _documents() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, VOCAB, (n,), generator=g) for n in LENS]


def _measure(reduced: Any, implementation: str) -> tuple[str, float | None, str | None]:
    """(status, error, cause) of one packed row of the reduced config against each document alone."""
    with _quiet():
        status, error = _run(reduced, implementation)
        cause = None
        if status != "exact" and error is not None:  # a mismatch: find the feature that causes it
            for feature, switched_off in _ablations(reduced):
                if _run(switched_off, implementation)[0] == "exact":
                    cause = feature
                    break
    return status, error, cause


def _model(cls: Any, reduced: Any, router: bool) -> Any:
    """The reduced config's causal LM: seeded, fp32, eval, eager, the router's loss on or off."""
    torch.manual_seed(0)
    model = cls._from_config(reduced, attn_implementation="eager").float().eval()
    _set(_text_config(model.config), "output_router_logits", router)
    _set(model.config, "output_router_logits", router)
    return model


def _use(model: Any, implementation: str) -> None:
    """Switch ``model`` to ``implementation`` (registering packing_varlen on first use)."""
    import packing.interop.hf_attention as hf_attention

    if implementation == hf_attention.NAME:
        hf_attention.install()
    model.set_attn_implementation(implementation)


def _run(reduced: Any, implementation: str) -> tuple[str, float | None]:
    from packing import get_collator
    import packing.interop.hf_attention as hf_attention
    from packing.interop.hf import checked_kwargs
    from packing.interop.hf_families import unverified

    try:
        cls = causal_lm_class(reduced)
    except ValueError as e:
        return f"not verifiable: {e}", None
    try:
        with torch.device("meta"):
            params = sum(p.numel() for p in cls._from_config(reduced, attn_implementation="eager").parameters())
        if params > MAX_PARAMS:
            return f"not verifiable: its reduced copy still has {params / 1e6:.0f}M parameters", None
        # The router's load-balancing loss is the batch's by definition (over every token routed
        # together), never the documents' alone: the loss compared is the language model's.
        model = _model(cls, reduced, router=False)
        docs = _documents()
        with torch.no_grad():
            alone = [model(input_ids=d[None], use_cache=False).logits[0] for d in docs]
    except Exception as e:  # noqa: BLE001 - any failure here means the config could not be verified
        return f"not verifiable: a reduced copy of it did not run alone with eager ({_first_line(e)})", None
    ref = torch.cat(alone)
    ref_loss = torch.nn.functional.cross_entropy(torch.cat([a[:-1] for a in alone]), torch.cat([d[1:] for d in docs]))
    try:
        _use(model, implementation)
        with torch.no_grad(), unverified(), hf_attention.counting_calls() as calls:
            out = model(**checked_kwargs(get_collator("concat")(docs), model))
    except Exception as e:  # noqa: BLE001
        if isinstance(e, ValueError) and _raised_by_packing(e):
            return f"refused: {_first_line(e)}", None
        return f"fails packed ({type(e).__name__}: {_first_line(e)})", None
    if implementation == hf_attention.NAME:
        layers = _attention_layers(reduced)
        if calls.count < layers:
            return (f"routes attention around transformers' attention interface: {calls.count} of its {layers} "
                    f"attention layers called {implementation!r}, so the others would mix the documents"), None
    err = max(_rel(out.logits[0], ref), _rel(out.loss, ref_loss))
    return ("exact" if err <= TOL else f"packed logits {err:.1%} off each document alone"), err


def _raised_by_packing(error: BaseException) -> bool:
    """Whether ``error`` was raised in this package (a refusal by name), not inside transformers."""
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and f"{os.sep}packing{os.sep}" in tb.tb_frame.f_code.co_filename


def _attention_layers(config: Any) -> int:
    text = _text_config(config)
    from packing.interop.hf_families import ATTENTION_KINDS

    types = _get(text, "layer_types")
    if types:
        return sum(t in ATTENTION_KINDS + ("attention",) for t in types)
    return int(_get(text, "num_hidden_layers") or 0)


def _ablations(reduced: Any) -> Iterator[tuple[str, Any]]:
    """(config field, the reduced config with that feature switched off), for each feature it has."""
    text = _text_config(reduced)

    def without(**fields: Any) -> Any:
        config = copy.deepcopy(reduced)
        for key, value in fields.items():
            _set(_text_config(config), key, value)
        return config

    if _get(text, "sliding_window"):
        types = _get(text, "layer_types")
        if types and "sliding_attention" in types:  # the layers made full, the field left as the model reads it
            yield "sliding_window", without(layer_types=["full_attention" if t == "sliding_attention" else t
                                                         for t in types])
        else:
            yield "sliding_window", without(sliding_window=None, use_sliding_window=False)
    for key in ("attn_logit_softcapping", "final_logit_softcapping", "logit_softcapping"):
        if _get(text, key):
            yield key, without(**{key: None})
    rope = _get(text, "rope_parameters") or _get(text, "rope_scaling")
    if isinstance(rope, dict) and rope.get("rope_type", rope.get("type")) not in (None, "default"):
        theta = rope.get("rope_theta", _get(text, "rope_theta") or 10000.0)
        yield "rope_parameters", without(rope_parameters={"rope_type": "default", "rope_theta": theta}, rope_scaling=None)
    for key in ("attention_bias", "mlp_bias", "bias", "use_bias"):
        if _get(text, key) is True:
            yield key, without(**{key: False})


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


def main(argv: list[str] | None = None) -> int:
    import transformers

    from packing.cli import Parser

    p = Parser(prog="python -m packing.interop.verify", description=__doc__.split("\n\n")[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", metavar="PATH", help="a config.json, or a model directory holding one")
    what.add_argument("--family", metavar="MODEL_TYPE", help="the family's default config")
    p.add_argument("--implementation", default="packing_varlen",
                   help="packing_varlen (default), sdpa, eager, or flash_attention_2|3|4 (as packing_varlen)")
    p.add_argument("--no-cache", action="store_true", help="measure even where a verdict is cached")
    args = p.parse_args(argv)
    from packing.interop.hf_families import accepted_implementation

    try:
        accepted_implementation(args.implementation)
        if args.family is not None:
            if args.family not in transformers.CONFIG_MAPPING:
                raise ValueError(f"--family {args.family!r} is not a model_type transformers "
                                 f"{transformers.__version__} knows; give one of its model types (e.g. 'llama')")
            config = transformers.CONFIG_MAPPING[args.family]()
        else:
            path = Path(args.config)
            path = path / "config.json" if path.is_dir() else path
            if not path.is_file():
                raise ValueError(f"--config {args.config!r}: no config.json there; give a config.json or a model "
                                 "directory holding one")
            config = transformers.AutoConfig.from_pretrained(str(path))
    except (ValueError, OSError) as e:
        return p.fail(e)
    verdict = verify_config(config, args.implementation, cache=not args.no_cache)
    error = "" if verdict.error is None else f", error {verdict.error:.2e}"
    cause = "" if verdict.cause is None else f", exact with its {verdict.cause} switched off"
    source = "cached" if verdict.cached else f"measured in {verdict.seconds:.2f} s"
    print(f"{config.model_type} with {args.implementation}: {verdict.status}{error}{cause} ({source}, "
          f"transformers {transformers.__version__})")
    return 0 if verdict.exact else 1


if __name__ == "__main__":
    sys.exit(main())
