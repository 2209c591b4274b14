"""``packing_varlen``: an attention implementation for transformers models that reads the packed
row's ``cu_seq_lens_q`` and ``max_length_q`` (from :func:`packing.interop.hf.hf_kwargs`) and runs this
project's varlen kernel: torch's ``varlen_attn`` (or FlashAttention-3/4/2 when installed) on CUDA,
exact per-document attention on a CPU (SDPA, or the written-out softmax for softcaps and sinks;
eager, the documents gathered into one block, memory linear in the row for bounded documents;
compiled, a (T, T) document mask). It needs no flash-attn package and compiles to one graph with
no host read.

**The rule: every keyword is implemented or refused.** transformers' attention modules hand an
attention function their options as keywords. Each one :func:`varlen_attention` receives is in
exactly one of three tables below, checked in one place (:func:`layer_options`): computed exactly
(``scaling``, ``sliding_window``, ``softcap``, ``s_aux`` / ``sinks``, ...), inert (it changes
nothing this function computes, such as ``position_ids``, already applied to q and k by the rotary
embedding), or refused with a ValueError naming it, its value and the nearest supported path. A
keyword in none of the tables is refused too: a new transformers option is never dropped silently.

What runs each option (a layer takes the first kernel that has all it asks for):

=====================  ======  =========  ==============================  ====================
option                 CPU     torch      FA2 / FA3 / FA4                 otherwise
=====================  ======  =========  ==============================  ====================
``scaling``            exact   >= 2.11    yes                             --
``sliding_window``     exact   >= 2.11    yes                             --
``softcap``            exact   no         yes                             refused on CUDA
sinks (``s_aux``)      exact   no         FA4 only                        refused on CUDA
v head dim != q's      exact   no         no                              refused on CUDA
=====================  ======  =========  ==============================  ====================

Example:
    >>> from packing.interop.hf_attention import register
    >>> name = register()  # once per process
    >>> # model = AutoModelForCausalLM.from_config(config, attn_implementation=name)
    >>> # loss = model(**packing.interop.hf.hf_kwargs(batch, model)).loss
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from packing.kernels import head_dim_check, varlen_kernels, varlen_options
from packing.boundaries import block_causal_mask, block_rows, to_blocks

NAME = "packing_varlen"

# The CUDA kernels, best first with the options each computes, resolved once by register(): the
# cached lookup that every layer's call made broke the torch.compile graph (issue 13, H200: with it
# and the cache on, a compiled Llama ran as 22 graphs).
_kernels: list[tuple[str, Callable[..., Tensor], frozenset[str], Callable[[int], bool]]] | None = None
last_kernel: str | None = None  # the kernel the last CUDA layer ran (traced once under torch.compile): for records

# Keywords computed exactly (read by layer_options), besides the signature's dropout, scaling and
# is_causal: the boundaries, and the per-layer options.
COMPUTED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "sliding_window", "softcap", "s_aux",
            "sinks")
# Keywords that change nothing computed here, with why. Any value is accepted.
INERT = {
    "position_ids": "the rotary embedding already applied the positions to q and k",
    "cache_position": "a packed row has no cache; hf_kwargs sets use_cache=False",
    "use_cache": "a packed row has no cache",
    "past_key_values": "a packed row has no cache",
    "layer_idx": "names the layer only",
    "output_attentions": "attention weights are never returned (None), as with every flash implementation",
    "return_dict": "the attention output only",
    "target_dtype": "the kernel runs in v's dtype",
    # The model's own keywords, which transformers hands every layer down to attention unread:
    "shift_labels": "the loss's, from hf_kwargs",
    "labels": "the loss's",
    "num_items_in_batch": "the loss's",
    "output_router_logits": "the mixture-of-experts router's",
    "output_hidden_states": "the model's outputs",
    "seq_idx": "the Mamba / linear-attention layers' document index (hf_kwargs); attention reads cu_seq_lens_q",
}
# Keywords inert only while they are None (a value would change the result).
INERT_WHEN_NONE = ("head_mask",)


@dataclass(frozen=True)
class LayerOptions:
    """What one attention layer asks for, as Python constants (so a compiled graph holds them).

    causal: keys after the query are hidden; scale: the softmax scale (None: 1/sqrt(D));
    window: transformers' sliding_window, keys counting the query itself (None: unbounded);
    softcap: logits capped as softcap·tanh(x/softcap) (None: none); sinks: a per-head (H,) or per-token
    (1, H, T, 1) logit that joins every softmax's denominator (gpt-oss' s_aux; None: none).
    """

    causal: bool
    scale: float | None = None
    window: int | None = None
    softcap: float | None = None
    sinks: Tensor | None = None

    def cuda_options(self) -> dict[str, Any]:
        """The keyword options a CUDA varlen kernel must take for this layer."""
        options = {"scale": self.scale, "window": self.window, "softcap": self.softcap, "sinks": self.sinks}
        return {k: v for k, v in options.items() if v is not None}


def register(kernels: Sequence[str] | None = None) -> str:
    """Register ``packing_varlen`` with transformers' ``AttentionInterface``; returns the name.

    It resolves the CUDA kernels here, once (:func:`kernel_name` says which comes first). ``kernels``
    names the varlen kernels to use, best first (``"flash-attn-3"``, ``"flash-attn-4"``,
    ``"flash-attn-2"``, ``"torch.varlen_attn"``); by default every one that loads, in
    :func:`packing.kernels.varlen_kernels`' order. A named kernel that does not load here is a
    ValueError naming those that do. It registers no mask function on purpose: for an
    implementation without one, transformers builds no attention mask, and the boundaries come only
    from ``cu_seq_lens_q``.
    """
    from transformers import AttentionInterface

    global _kernels
    found = varlen_kernels() if torch.cuda.is_available() else {}
    if kernels is not None:
        if isinstance(kernels, str):
            raise TypeError(f"kernels takes a sequence of names, got the string {kernels!r}; write [{kernels!r}]")
        missing = [k for k in kernels if k not in found]
        if missing or not kernels:
            raise ValueError(
                f"packing_varlen kernels={list(kernels)}: "
                + (f"{missing} {'does' if len(missing) == 1 else 'do'} not load here" if missing else "names no kernel")
                + f"; the varlen kernels that load here are {list(found) or 'none (no CUDA)'}: name some of those, "
                "or leave kernels=None"
            )
        found = {k: found[k] for k in kernels}
    _kernels = [(name, run, varlen_options(name), head_dim_check(name)) for name, run in found.items()]
    AttentionInterface.register(NAME, varlen_attention)
    return NAME


def kernel_name(options: dict[str, Any] | None = None, head_dim: int = 64) -> str | None:
    """The kernel ``packing_varlen`` runs on CUDA for a layer asking ``options`` (``scale``,
    ``window``, ``softcap``, ``sinks``; none by default) at ``head_dim``, or None where there is none
    (a CPU machine, no kernel with those options, or before :func:`register`)."""
    chosen = _kernel_for(options or {}, head_dim)
    return None if chosen is None else chosen[0]


def _kernel_for(options: dict[str, Any], head_dim: int) -> tuple[str, Callable[..., Tensor], frozenset[str],
                                                                   Callable[[int], bool]] | None:
    # (name, fn, options, takes_head_dim), each resolved by register(): nothing here imports or caches
    return next((k for k in _kernels or () if set(options) <= k[2] and k[3](head_dim)), None)


def layer_options(module: torch.nn.Module, query: Tensor, attention_mask: Tensor | None, dropout: float,
                  scaling: float | None, is_causal: bool | None, kwargs: dict[str, Any]) -> LayerOptions:
    """The one check of every keyword a layer hands :func:`varlen_attention`: computed, inert, or a
    ValueError naming it, its value and the nearest supported path."""
    for key, value_ in kwargs.items():
        if key in COMPUTED or key in INERT or (key in INERT_WHEN_NONE and value_ is None):
            continue
        raise ValueError(
            f"'packing_varlen' does not implement the attention keyword {key}={_show(value_)} that "
            f"{type(module).__name__} passes, and will not drop it; load the model with attn_implementation='eager' "
            "(packed rows through packing.interop.hf.hf_kwargs) or train without packing"
        )
    if attention_mask is not None:
        raise ValueError("'packing_varlen' takes no attention_mask: the boundaries come from cu_seq_lens_q")
    if dropout:
        raise ValueError(
            f"'packing_varlen' has no attention dropout, got dropout={dropout}; set the config's attention "
            "dropout (attn_pdrop, attention_dropout) to 0 or call model.eval()"
        )
    head_dim = query.shape[-1]
    # A scale equal to 1/sqrt(D) is the kernels' default: None keeps every kernel eligible.
    scale = None if scaling is None or abs(scaling - head_dim**-0.5) <= 1e-7 * head_dim**-0.5 else float(scaling)
    window = kwargs.get("sliding_window")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"'packing_varlen' takes sliding_window as a positive int (keys counting the query), got {window!r}")
    softcap = kwargs.get("softcap")
    softcap = float(softcap) if softcap else None
    sinks = kwargs.get("s_aux")
    if kwargs.get("sinks") is not None:
        if sinks is not None:
            raise ValueError("'packing_varlen' got both s_aux and sinks; a layer has one kind of attention sink")
        sinks = kwargs["sinks"]
    causal = module.is_causal if is_causal is None else is_causal
    return LayerOptions(causal=bool(causal), scale=scale, window=window, softcap=softcap, sinks=sinks)


def _show(value: Any) -> str:
    return f"Tensor{tuple(value.shape)}" if isinstance(value, Tensor) else repr(value)


def varlen_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """transformers' attention signature: query (1, H, T, D), key (1, H_kv, T, D), value
    (1, H_kv, T, D_v); returns ((1, T, H, D_v), None). The documents are the blocks of
    ``kwargs["cu_seq_lens_q"]`` (num_docs + 1,); the layer's options are :func:`layer_options`.

    Nothing here reads a tensor's values on the host, so under ``torch.compile`` the call is part of
    the graph, and with static kwargs (``HFPackedCollator(..., total_tokens=, max_seqs=,
    max_seqlen=)``) every batch has the same shapes and constants: one compilation.
    """
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            f"attn_implementation 'packing_varlen' needs cu_seq_lens_q and max_length_q, and {type(module).__name__} "
            "called it without them: either the model's kwargs did not come from packing.interop.hf.hf_kwargs "
            "(or HFPackedCollator), or this model does not hand them down to its attention layers (then load it "
            "with attn_implementation 'sdpa' or 'eager')"
        )
    # The keys' boundaries must be the queries': a packed row attends each document to itself, so
    # the kernel reads cu_seq_lens_q for both, and a different cu_seq_lens_k would be dropped.
    cu_k, max_k = kwargs.get("cu_seq_lens_k", cu), kwargs.get("max_length_k", max_len)
    if cu_k is not cu and (torch.compiler.is_compiling() or cu_k.shape != cu.shape or not torch.equal(cu_k, cu)):
        raise ValueError("'packing_varlen' got cu_seq_lens_k other than cu_seq_lens_q; a packed row attends each "
                         "document to itself: pass the same boundaries for both (hf_kwargs does)")
    if max_k != max_len:
        raise ValueError(f"'packing_varlen' got max_length_k={max_k!r} and max_length_q={max_len!r}; a packed row "
                         "attends each document to itself: pass the same (hf_kwargs does)")
    if query.shape[0] != 1:
        raise ValueError(f"'packing_varlen' takes one packed row, got batch size {query.shape[0]}")
    layer = layer_options(module, query, attention_mask, dropout, scaling, is_causal, kwargs)
    if torch.compiler.is_compiling():
        # The same check while dynamo traces, with the module as it is (nothing enters the graph):
        # a compiled model given the bare name is checked as an eager one is.
        from torch._dynamo.comptime import comptime

        comptime(_check_traced)
    else:
        # The config check (packing.interop.hf.check_model) once per config, for a model whose
        # kwargs came from a bare name (a no-op where hf_kwargs saw the model: checked there).
        _check_family(getattr(module, "config", None))
    for counter in _counters:  # only while the verifier counts (its own eager run, even inside a trace)
        counter.count += 1
    # (T, H, D) and (T, H_kv, D): grouped-query attention goes to the kernel as it is, k and v unrepeated
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if not q.is_cuda:
        return _masked(q, k, v, cu, layer)[None], None
    return _on_cuda(q, k, v, cu, max_len, layer)[None], None


class _Calls:
    count = 0


_counters: list[_Calls] = []


@contextlib.contextmanager
def counting_calls() -> Iterator[_Calls]:
    """Count the layers that call :func:`varlen_attention` inside the block (eager only): how the
    verifier finds a model that routes attention around transformers' attention interface."""
    calls = _Calls()
    _counters.append(calls)
    try:
        yield calls
    finally:
        _counters.remove(calls)


# The configs checked, by id; each is kept, so no later config can reuse a checked one's id.
_checked: dict[int, Any] = {}


def _check_traced(ctx: Any) -> None:
    # Called by dynamo at trace time with varlen_attention's frame: its ``module`` local, resolved
    # to the module itself (a tracked attribute module by its key, an unspecialized one by value).
    module = None
    try:  # dynamo's private trace-time view: resolved defensively, as its API moves between releases
        tracker = ctx.get_local("module")._i_will_not_complain_if_bc_breaks_VariableTracker()
        module = getattr(tracker, "value", None)
        if module is None and hasattr(tracker, "module_key"):
            module = ctx._ComptimeContext__tx.output.get_submodule(tracker.module_key)
    except Exception:  # noqa: BLE001 - not resolvable on this torch: decided below
        module = None
    if module is None:
        from packing.interop.hf_families import checked_any

        if checked_any(NAME):  # kwargs built from a model: hf_kwargs checked it
            return
        raise ValueError("'packing_varlen' under torch.compile could not see the calling module's config to check it; "
                         "build the kwargs from the model (HFPackedCollator(model), hf_kwargs(batch, model))")
    _check_family(getattr(module, "config", None))


def _check_family(config: Any) -> None:
    if config is None or id(config) in _checked:
        return
    from packing.interop.hf_families import check_model

    check_model(config, NAME)
    _checked[id(config)] = config


def _on_cuda(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, layer: LayerOptions) -> Tensor:
    if _kernels is None:
        raise ValueError(
            "'packing_varlen' on CUDA needs a varlen kernel (torch >= 2.10, flash-attn-3/4 or flash-attn 2), "
            "resolved by packing.interop.hf_attention.register(): call it after CUDA is available"
        )
    if layer.sinks is not None and layer.sinks.dim() != 1:
        raise ValueError(
            f"'packing_varlen' on CUDA takes attention sinks per head, (H,), got per-token sinks of shape "
            f"{tuple(layer.sinks.shape)}; no CUDA kernel here computes them: use attn_implementation='eager' on packed rows"
        )
    if v.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"'packing_varlen' on CUDA needs the value head dimension equal to the query's, got {v.shape[-1]} and "
            f"{q.shape[-1]} (multi-head latent attention); use attn_implementation='eager' on packed rows"
        )
    options = layer.cuda_options()
    chosen = _kernel_for(options, q.shape[-1])
    if chosen is None:
        have = ", ".join(f"{name}: {sorted(opts)}" + ("" if takes(q.shape[-1]) else
                                                      f" (not at head dimension {q.shape[-1]})")
                         for name, _, opts, takes in _kernels) or "none"
        raise ValueError(
            f"'packing_varlen' on CUDA: no varlen kernel here computes {sorted(options)} (this layer asks "
            f"{', '.join(f'{k}={_show(v)}' for k, v in options.items())}); "
            f"kernels here and their options: {have}; install flash-attn (FA2, FA3 or FA4) for softcap, FA4 for sinks, "
            "torch >= 2.11 for scale and sliding_window"
        )
    if v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"'packing_varlen' on CUDA needs bf16 or fp16, got {v.dtype}; run under torch.autocast")
    # Rotary embeddings multiply by fp32 cos/sin, so Llama's q and k arrive in fp32 under autocast
    # while v comes from a bf16 projection (seen on an H200); the kernel takes v's dtype.
    q, k = q.to(v.dtype), k.to(v.dtype)
    note_kernel(chosen[0])
    return chosen[1](q, k, v, cu, max_len, layer.causal, **options)


def note_kernel(name: str) -> None:
    """Sets :data:`last_kernel` to ``name`` without a side effect in a compiled graph.

    Under ``torch.compile`` the assignment runs while dynamo traces (``comptime``), not in the
    graph. Assigned in traced code, the module global was a side effect, and inside activation
    checkpointing's higher-order op dynamo refuses those: each checkpointed layer broke out of the
    graph and recomputed eagerly (H200, Qwen3-0.6B shape with ``gradient_checkpointing``: 3 graphs
    and 440.6 ms a step against 158.7 ms without checkpointing).

    >>> from packing.interop import hf_attention
    >>> hf_attention.note_kernel("flash-attn-3")
    >>> hf_attention.last_kernel
    'flash-attn-3'
    >>> hf_attention.last_kernel = None
    """
    if torch.compiler.is_compiling():
        from torch._dynamo.comptime import comptime

        comptime(_note_traced)
    else:
        global last_kernel
        last_kernel = name


def _note_traced(ctx: Any) -> None:
    # Called by dynamo at trace time with the tracing frame of note_kernel (ComptimeContext).
    global last_kernel
    last_kernel = ctx.get_local("name").as_python_constant()


def _masked(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, layer: LayerOptions) -> Tensor:
    """Exact attention within each block of ``cu_seqlens``, for the CPU: q (T, H, D), k (T, H_kv, D),
    v (T, H_kv, D_v) -> (T, H, D_v).

    Eager, the documents are gathered into a (docs, H, longest, D) block and attended in one SDPA
    call (:func:`_gathered`): memory grows with docs x longest², not T². Under ``torch.compile`` the
    (T, T) document mask (and window) is built on the device from the boundaries instead, so the
    graph reads nothing on the host: keep compiled CPU rows short. SDPA where it computes the layer;
    the softmax written out, as transformers' eager code does, for softcaps and sinks."""
    if not torch.compiler.is_compiling() and (layer.sinks is None or layer.sinks.dim() == 1):
        return _gathered(q, k, v, cu_seqlens, layer)  # per-token sinks (1, H, T, 1) stay in row order
    allowed = block_causal_mask(cu_seqlens, q.shape[0], causal=layer.causal, window=layer.window)  # (T, T)
    return _attend(q, k, v, allowed, layer)


def _gathered(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, layer: LayerOptions) -> Tensor:
    """:func:`_masked` with the documents gathered: each document's tokens become one row of a
    (docs, longest) block, attended with a (longest, longest) mask per document, and scattered back.
    Reads the boundaries on the host (a CPU tensor: no device wait)."""
    bounds = cu_seqlens.tolist()
    if bounds[-1] < q.shape[0]:  # slots past the last boundary: one block of their own (the tail rule)
        bounds.append(q.shape[0])
    lengths = torch.tensor([b - a for a, b in zip(bounds, bounds[1:]) if b > a])  # the blocks, empty ones dropped
    docs, longest = len(lengths), int(lengths.max())
    row = block_rows(lengths, longest).to(q.device)

    def block(x: Tensor) -> Tensor:  # (T, H, D) -> (docs, H, longest, D), padding rows zero
        return to_blocks(x, row, docs, longest)

    index = torch.arange(longest, device=q.device)
    distance = index[:, None] - index[None, :]  # (L, L): i - j, the same within a document as in the row
    allowed = (index[None, None, :] < lengths.to(q.device)[:, None, None]).expand(docs, longest, longest).clone()
    if layer.causal:
        allowed &= distance >= 0
    if layer.window is not None:
        allowed &= distance.abs() < layer.window
    # A block's padding rows (past their document) see key 0, so no softmax row is empty (a NaN
    # there would reach the gradients); their outputs are never gathered back.
    allowed |= (index[None, :, None] >= lengths.to(q.device)[:, None, None]) & (index == 0)
    out = _attend(block(q), block(k), block(v), allowed[:, None], layer, batched=True)  # (docs, H, L, D_v)
    return out.transpose(1, 2).reshape(docs * longest, *out.shape[1:2], out.shape[-1]).index_select(0, row)


def _attend(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, layer: LayerOptions, *, batched: bool = False) -> Tensor:
    """Attention under a bool mask ``allowed``: (T, H, D) tensors and a (T, T) mask, or, ``batched``,
    (docs, H, L, D) blocks and a (docs, 1, L, L) mask; returns (T, H, D_v) or (docs, H, L, D_v).
    Every query row must allow a key."""
    if not batched:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (H, T, D)
    heads, kv_heads = q.shape[-3], k.shape[-3]
    if layer.softcap is None and layer.sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=layer.scale,
                                             enable_gqa=kv_heads != heads)
        return out if batched else out.transpose(0, 1)
    groups = heads // kv_heads
    k, v = k.repeat_interleave(groups, -3), v.repeat_interleave(groups, -3)
    logits = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if layer.scale is None else layer.scale)  # (.., H, T, T)
    if layer.softcap is not None:
        logits = torch.tanh(logits / layer.softcap) * layer.softcap
    logits = logits.masked_fill(~allowed, float("-inf"))
    if layer.sinks is not None:
        shape = (1,) * (logits.dim() - 3) + (heads, -1, 1)
        sinks = layer.sinks.reshape(shape).to(logits.dtype).expand(*logits.shape[:-1], 1)  # (.., H, T, 1)
        logits = torch.cat([logits, sinks], dim=-1)
        logits = logits - logits.amax(dim=-1, keepdim=True)
        probs = logits.softmax(dim=-1)[..., :-1]  # the sink takes its share of the softmax, then leaves
    else:
        probs = logits.softmax(dim=-1)
    out = probs.to(v.dtype) @ v
    return out if batched else out.transpose(0, 1)
