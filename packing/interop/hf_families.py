"""Which transformers model families train exactly on packed rows, and the config check that refuses the rest.

A packed row equals each document run alone only if every layer of the model keeps the documents
apart. Attention does, through the boundaries :func:`packing.interop.hf.pack` hands it; but a
family may also carry state across tokens some other way (a Mamba or linear-attention layer, a
convolution), take its positions from the row instead of ``position_ids``, or pass its attention
an option the implementation does not compute. No config field says which, so the rule is:

- **the config must ask for nothing packing cannot reproduce** (:func:`check_config`, by its fields
  alone): a rotary scaling that depends on the row's length, a kind of attention layer with no
  packed mask.
- **the user's own config must be verified** (:func:`check_model`): a reduced copy of it, every
  feature kept, runs one packed row against each document alone on the installed transformers
  (:mod:`packing.interop.verify`; cached per transformers version, config and implementation). It
  is exact, or refused with the measured error and, where found, the field that causes it.

``hf_families.json`` beside this file is the family matrix: every causal LM's default config
verified the same way on the transformers release it names (``python -m benchmarks.hf_families
--write``). It documents the families; it decides nothing.

Every refusal is a ValueError that names the family or field, its value and the nearest supported
path, raised when the model is known (``pack(model)``) or
else at ``packing_varlen``'s first call.

Examples:
    >>> import transformers
    >>> config = transformers.MistralConfig(sliding_window=8, attn_implementation="sdpa")
    >>> layer_windows(config)
    {'sliding_attention': 8}
    >>> check_config(config, "sdpa")  # nothing it cannot reproduce: returns None
    >>> check_model(config)  # and a reduced copy of it is exact packed
    'sdpa'
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
from pathlib import Path
from typing import Any, Iterator

__all__ = ["ATTENTION_KINDS", "check_config", "family_table", "has_state_layers", "layer_windows", "unverified"]

TABLE = Path(__file__).with_name("hf_families.json")

# The layer types (config.layer_types) whose packed mask we build: full causal attention, and
# transformers' sliding window (key j is seen by query i when j > i - sliding_window).
ATTENTION_KINDS = ("full_attention", "sliding_attention")

# Rotary scalings that read the row's longest position (torch.max(position_ids) + 1) to choose their
# frequencies: in a packed row that is the longest document's, not each document's own.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")

# transformers' own flash implementations take the same cu_seq_lens kwargs and the same per-layer
# options as packing_varlen (and raise where their kernel lacks one), but need a GPU the CPU matrix
# has not: they take packing_varlen's verdict, checked on a GPU by tests/packing/test_hf.py. The
# packing_varlen of a model's own kernel list (pack(model, kernels=...)) joins here when registered.
VERDICT_OF = {"flash_attention_2": "packing_varlen", "flash_attention_3": "packing_varlen",
              "flash_attention_4": "packing_varlen"}

_unverified = contextvars.ContextVar("packing_hf_unverified", default=False)


@contextlib.contextmanager
def unverified() -> Iterator[None]:
    """Skip the family table (not the config check) inside the block: how the family matrix
    measures a family before the table has a verdict on it."""
    token = _unverified.set(True)
    try:
        yield
    finally:
        _unverified.reset(token)


@functools.cache
def family_table() -> dict[str, Any]:
    """The committed family matrix: ``{"transformers": version, "families": {model_type: {implementation:
    "exact" or the reason it is refused}}}``."""
    return json.loads(TABLE.read_text())


def layer_windows(config: Any) -> dict[str, int | None]:
    """{layer type: its sliding window (None for full attention)} over the model's attention layers.

    A config without ``layer_types`` is all sliding when it sets ``sliding_window`` (Mistral), else
    all full attention. Layer types that are not attention (Mamba, linear attention, convolutions)
    take no mask and are left out; whether their family is exact is the family table's question.
    """
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if types is None:
        return {"sliding_attention": window} if window else {"full_attention": None}
    kinds = [t for t in dict.fromkeys(types) if t in ATTENTION_KINDS]
    return {kind: (window if kind == "sliding_attention" else None) for kind in kinds} or {"full_attention": None}


def has_state_layers(config: Any) -> bool:
    """Whether the model has layers that carry state along the row besides attention (Mamba, linear
    attention, convolutions: any ``layer_types`` / ``layers_block_type`` entry that is not attention,
    the kinds :func:`layer_windows` leaves out)."""
    kinds = []
    for field in ("layer_types", "layers_block_type"):
        try:
            kinds += list(getattr(config, field, None) or ())
        except Exception:  # noqa: BLE001 - a heterogeneous config that will not say
            continue
    return any(kind not in ATTENTION_KINDS + ("attention",) for kind in kinds)


def check_config(config: Any, implementation: str) -> None:
    """Refuse a text config that asks for something packing cannot reproduce, by its fields alone
    (no model is run; :func:`check_model` then verifies the config live).

    Raises:
        ValueError: a config field asks for something packing cannot reproduce (the field and value).
    """
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_types = {p.get("rope_type", p.get("type")) for p in (rope.values() if _nested(rope) else [rope])}
    for rope_type in rope_types & set(LENGTH_DEPENDENT_ROPE):
        raise ValueError(
            f"config rope type {rope_type!r} chooses its frequencies from the row's longest position, which in a packed "
            "row is the longest document's, not each document's own; use rope_type 'default', 'linear', 'yarn' or "
            "'llama3', or train unpacked"
        )
    kinds = set(getattr(config, "layer_types", None) or ())
    for kind in sorted(kinds & {"chunked_attention"}):
        raise ValueError(
            f"config layer_types has {kind!r} (attention_chunk_size={getattr(config, 'attention_chunk_size', None)}): "
            "its chunks are counted from the row's start, not each document's; train unpacked or set layer_types to "
            "full_attention"
        )
    if "sliding_attention" in kinds and not getattr(config, "sliding_window", None):
        raise ValueError(
            f"config layer_types has 'sliding_attention' but sliding_window={getattr(config, 'sliding_window', None)!r}; "
            "set sliding_window to the window in tokens"
        )


def _nested(rope: dict) -> bool:
    """Whether ``rope_parameters`` is keyed by layer type (Gemma 3: {"full_attention": {...}, ...})."""
    return bool(rope) and all(isinstance(v, dict) for v in rope.values())


def causal_lm_families() -> dict[str, str]:
    """{model_type: causal-LM class name} for every family transformers' auto classes know."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return dict(sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.items()))


# How a config is verified: packing.interop (its __init__) sets these to verify.verify_config and
# verify.verify_loss. Verifying runs a model through the packed kwargs, which call check_model (and
# the loss), so this module receives the verifiers instead of importing the module that makes them.
_verifier: list = []


def set_verifier(verify, verify_loss=None) -> None:
    """Install ``verify(config, implementation) -> Verdict`` and ``verify_loss(config, loss, router=)
    -> Verdict`` (done once, by ``packing.interop``)."""
    _verifier[:] = [verify, verify_loss]


def _verify(config: Any, implementation: str):
    if not _verifier:
        raise RuntimeError("no config verifier installed: import packing.interop (it installs verify.verify_config)")
    return _verifier[0](config, implementation)


def verify_loss(config: Any, loss: Any, *, router: bool):
    """The installed loss verifier's verdict (:func:`packing.interop.verify.verify_loss`)."""
    if not _verifier or _verifier[1] is None:
        raise RuntimeError("no loss verifier installed: import packing.interop (it installs verify.verify_loss)")
    return _verifier[1](config, loss, router=router)


VARLEN_IMPLEMENTATIONS = ("flash_attention_2", "flash_attention_3", "flash_attention_4", "packing_varlen")
MASK_IMPLEMENTATIONS = ("sdpa", "eager")


def is_varlen(implementation: str) -> bool:
    """Whether ``implementation`` reads the boundaries as ``cu_seq_lens_q/k`` (a varlen kernel)."""
    return VERDICT_OF.get(implementation, implementation) in VARLEN_IMPLEMENTATIONS


def accepted_implementation(model_or_name: Any) -> str:
    """The attention implementation of a transformers model or config (``_attn_implementation``),
    or the name itself; a ValueError if it is one that would attend across documents."""
    name = model_or_name
    if not isinstance(name, str):
        config = getattr(model_or_name, "config", model_or_name)
        name = getattr(config, "_attn_implementation", None)
        if not isinstance(name, str):
            raise TypeError(
                f"expected a transformers model or config (with _attn_implementation) or an implementation name, "
                f"got {type(model_or_name).__name__}"
            )
    if not is_varlen(name) and name not in MASK_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation {name!r} is refused: packing.interop.hf cannot keep its documents apart, and "
            f"it would attend across them silently; load the model with one of "
            f"{', '.join(VARLEN_IMPLEMENTATIONS + MASK_IMPLEMENTATIONS)}"
        )
    return name


def _config_of(model_or_name: Any) -> Any:
    """The model's (or config's) text config, or None for a bare implementation name."""
    if isinstance(model_or_name, str):
        return None
    config = getattr(model_or_name, "config", model_or_name)
    try:
        return config.get_text_config()
    except (AttributeError, ValueError):  # not a transformers config, or one with several text models
        return config


def check_model(model_or_config: Any, implementation: str | None = None) -> str:
    """Refuse, before the first step, a model whose packed rows would not equal its documents run
    alone with ``implementation`` (by default the model's own); returns the implementation name.

    See :mod:`packing.interop.hf_families`: the config must ask for nothing packing cannot
    reproduce, and a reduced copy of it must be exact packed. Raises a ValueError naming the family
    or config field, its value and the nearest supported path. A config object that passed is not
    checked again (the deprecated ``hf_kwargs`` calls this for every batch): configure the model before its first
    packed batch.
    """
    name = accepted_implementation(implementation or model_or_config)
    outer = getattr(model_or_config, "config", model_or_config)
    if isinstance(model_or_config, str) or not hasattr(outer, "model_type"):
        raise TypeError(f"check_model takes a transformers model or config, got {type(model_or_config).__name__}")
    verified = not _unverified.get()
    if _passed.get((id(outer), name, verified)) is outer:
        return name
    check_config(_config_of(model_or_config), name)  # the fields are its text model's
    if verified:
        _check_verified(outer, name)  # the model as a whole: a multimodal wrapper's own causal LM
    _passed[(id(outer), name, verified)] = outer  # kept: no later config can take a passed one's id
    return name


_passed: dict[tuple[int, str, bool], Any] = {}


def checked_any(implementation: str) -> bool:
    """Whether some config passed :func:`check_model` with ``implementation`` in this process."""
    return any(name == implementation and verified for _, name, verified in _passed)


def _check_verified(config: Any, implementation: str) -> None:
    """Refuse ``config`` unless a reduced copy of it is exact packed with ``implementation``
    (:func:`packing.interop.verify.verify_config`, cached)."""
    import transformers

    verdict = _verify(config, implementation)
    if verdict.exact:
        return
    cause = f"; switching off its {verdict.cause} made the row exact" if verdict.cause else ""
    others = [impl for impl in ("packing_varlen",) + MASK_IMPLEMENTATIONS
              if impl != VERDICT_OF.get(implementation, implementation) and _verify(config, impl).exact]
    fix = f"load it with attn_implementation in {others}" if others else "train it unpacked (pad_longest)"
    raise ValueError(
        f"model_type {config.model_type!r} is refused on packed rows with {implementation!r}: {verdict.status}{cause} "
        f"(verified on a reduced copy of this config, transformers {transformers.__version__}); {fix}"
    )
