"""Verify a transformers model family on packed rows: a tiny random model of it, one packed row of
three documents against each document alone, on the transformers installed here.

For a family (a ``model_type`` whose causal LM transformers' auto classes know) and an attention
implementation packing accepts on a CPU (``packing_varlen``, ``sdpa``, ``eager``), a tiny random
model in fp32 runs one packed row of three documents (30, 17 and 25 tokens: longer than the tiny
sliding window of 8, so windows matter) and each document alone through ``eager``. The verdict:

- ``exact``: logits and loss within 1e-5 relative;
- ``refused: <message>``: a ValueError from packing names what it does not compute;
- anything else, a mismatch or another error, is the reason the family is refused.

Each verdict is :func:`packing.interop.verify.verify_config` on the family's tiny config: the same
measurement check_model makes of a user's config. The verdicts form the family matrix
(``hf_families.json``, ``python -m benchmarks.hf_families --write``), which documents the families;
check_model verifies the user's own config and reads no verdict from it.

Examples:
    >>> [(v.implementation, v.status) for v in verify("llama", ("sdpa",))]
    [('sdpa', 'exact')]
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from packing.interop.hf_families import causal_lm_families as families
from packing.interop.verify import _first_line, _get

__all__ = ["IMPLEMENTATIONS", "Verdict", "build", "families", "measured", "tiny_config", "verify"]

IMPLEMENTATIONS = ("packing_varlen", "sdpa", "eager")
LENS = (30, 17, 25)
VOCAB = 128
WINDOW = 8
TOL = 1e-5
MAX_PARAMS = 20_000_000  # a default config this large after shrinking is not a tiny model: not verified

# Generic shrinking: every field a config has among these is set, so one rule serves most families.
SHRINK = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=VOCAB, head_dim=16, max_position_embeddings=256, n_embd=64, n_layer=2, n_head=4, d_model=64,
    num_layers=2, n_positions=256, moe_intermediate_size=32, num_experts=4, n_routed_experts=4, num_local_experts=4,
    num_experts_per_tok=2, ffn_dim=128, n_inner=128, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=128,
    sliding_window=WINDOW, attention_dropout=0.0, hidden_dropout=0.0, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, dropout=0.0, activation_dropout=0.0,
)
# Hand-written where the generic rule does not fit a family.
OVERRIDES: dict[str, dict[str, Any]] = {
    # Both kinds of layer, so the alternation is exercised: sliding first, as these families start.
    "gemma2": dict(layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32,
                   attn_logit_softcapping=50.0, final_logit_softcapping=30.0),
    "gemma3_text": dict(layer_types=["sliding_attention", "full_attention"], query_pre_attn_scalar=32),
    "gpt_oss": dict(layer_types=["sliding_attention", "full_attention"]),
    "cohere2": dict(layer_types=["sliding_attention", "full_attention"]),
    "granite": dict(attention_multiplier=0.5, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=2.0),
    "mixtral": dict(sliding_window=WINDOW),
    "phi3": dict(sliding_window=WINDOW),
    "qwen2": dict(use_sliding_window=False),
    # Mamba 2 heads that tile the shrunk inner width (mamba_expand 2 x hidden 64 = 8 heads of 16).
    "bamba": dict(mamba_n_heads=8, mamba_d_head=16),
    "granitemoehybrid": dict(mamba_n_heads=8, mamba_d_head=16),
    "mamba2": dict(num_heads=8, head_dim=16),
    "zamba2": dict(mamba_headdim=16, n_mamba_heads=8),
}


@dataclass(frozen=True)
class Verdict:
    family: str
    implementation: str
    status: str  # "exact", or the reason it is refused
    error: float | None = None  # the packed logits' relative error, where they ran


def tiny_config(family: str):
    """The family's default config shrunk to a tiny model (see SHRINK and OVERRIDES)."""
    from transformers import CONFIG_MAPPING

    config = CONFIG_MAPPING[family]()
    targets = [config] + ([config.get_text_config()] if config.get_text_config() is not config else [])
    for target in targets:
        for key, value in {**SHRINK, **OVERRIDES.get(family, {})}.items():
            if key in OVERRIDES.get(family, {}) or _get(target, key) is not None:
                with _quietly():
                    setattr(target, key, value)
        types = _get(target, "layer_types")
        if types is not None and "layer_types" not in OVERRIDES.get(family, {}):
            with _quietly():
                target.layer_types = (list(dict.fromkeys(types)) * 2)[:2]  # each kind once, two layers
        for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
            if isinstance(_get(target, key), int) and _get(target, key) >= VOCAB:
                setattr(target, key, 0)
    return config


class _quietly:
    """Skip a field a config does not let us set (a read-only property)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (AttributeError, TypeError, ValueError))


def build(family: str, **fields):
    """(tiny model in eval mode with eager attention, its documents); raises if it cannot be built.
    ``fields`` override the tiny config's (a GPU run takes head dimension 64, as every flash kernel does)."""
    import transformers

    cls = getattr(transformers, families()[family])
    config = tiny_config(family)
    for key, value in fields.items():
        setattr(config.get_text_config(), key, value)
    with torch.device("meta"):
        params = sum(p.numel() for p in cls._from_config(config, attn_implementation="eager").parameters())
    if params > MAX_PARAMS:
        raise MemoryError(f"the shrunk default config still has {params / 1e6:.0f}M parameters")
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(0)
    return model, [torch.randint(1, VOCAB, (n,), generator=g) for n in LENS]


def verify(family: str, implementations=IMPLEMENTATIONS) -> list[Verdict]:
    """The family's verdict for each implementation: its tiny config verified exactly as
    check_model verifies a user's (:func:`packing.interop.verify.verify_config`, not cached)."""
    from packing.interop.verify import verify_config

    try:
        config = tiny_config(family)
    except Exception as e:  # noqa: BLE001 - no config of the family can be made without arguments
        return [Verdict(family, impl, f"no tiny config of it could be made ({_first_line(e)})") for impl in implementations]
    verdicts = []
    for impl in implementations:
        v = verify_config(config, impl, cache=False)
        verdicts.append(Verdict(family, impl, v.status, v.error))
    return verdicts


_measured: dict[str, dict[str, str]] = {}  # {family: {implementation: verdict}}, this process's


def measured(family: str, implementation: str) -> str:
    """The verdict of ``family`` with ``implementation`` on the installed transformers, measured once
    per process for every implementation together (one tiny model; a fraction of a second for most
    families on a CPU)."""
    import transformers

    if family not in _measured:
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # a tiny default config's own warnings are not the user's
        try:
            _measured[family] = {v.implementation: v.status for v in verify(family)}
        finally:
            transformers.logging.set_verbosity(verbosity)
    return _measured[family][implementation]
