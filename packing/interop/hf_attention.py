"""``packing_varlen``: an attention implementation for transformers models that reads the packed
row's ``cu_seq_lens_q`` and ``max_length_q`` (from :func:`packing.interop.hf.pack`) and runs this
project's varlen kernel: torch's ``varlen_attn`` (or FlashAttention-3/4/2 when installed) on CUDA,
exact per-document attention on a CPU (SDPA, or the written-out softmax for softcaps and sinks;
the documents gathered into one block, eager and compiled, so memory grows with the documents, not
with T²). It needs no flash-attn package and compiles to one graph with no host read.

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

Each model keeps its own kernels: ``packing.interop.hf.pack(model, kernels=[...])`` registers an
implementation of its own for that list (``packing_varlen_fa3_torch`` runs FA3, then torch's kernel)
and switches the model to it, so two models in one process run different kernels; the plain
``packing_varlen`` runs every kernel that loads, best first.

Examples:
    >>> import packing.interop.hf  # registers "packing_varlen" with transformers
    >>> # model = AutoModelForCausalLM.from_config(config, attn_implementation="packing_varlen")
    >>> # packed = packing.interop.hf.pack(model); loss = model(**packed(samples)).loss
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from packing.boundaries import block_causal_mask, block_rows, to_blocks
from packing.kernels.choice import KernelSet

NAME = "packing_varlen"

# Each registered implementation's CUDA kernels, resolved once, outside any compiled step (a lookup
# that resolved them inside every layer's call broke the torch.compile graph: a compiled Llama ran
# as 22 graphs). The plain NAME's set is resolved at its first use (None until then).
_kernel_sets: dict[str, KernelSet | None] = {NAME: None}
# Short names for the implementation names of kernel lists: no "flash" in them, which transformers
# would take for its own flash-attention implementations.
_SHORT = {"flash-attn-3": "fa3", "flash-attn-4": "fa4", "flash-attn-2": "fa2", "torch.varlen_attn": "torch"}
last_kernel: str | None = None  # the kernel the last CUDA layer ran (traced once under torch.compile): for records

# Keywords computed exactly (read by layer_options), besides the signature's dropout, scaling and
# is_causal: the boundaries, and the per-layer options.
COMPUTED = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "sliding_window", "softcap", "s_aux",
            "sinks", "packing_context", "packing_context_group")
# Keywords that change nothing computed here, with why. Any value is accepted.
INERT = {
    "position_ids": "the rotary embedding already applied the positions to q and k",
    "cache_position": "a packed row has no cache; its kwargs set use_cache=False",
    "use_cache": "a packed row has no cache",
    "past_key_values": "a packed row has no cache",
    "layer_idx": "names the layer only",
    "output_attentions": "attention weights are never returned (None), as with every flash implementation",
    "return_dict": "the attention output only",
    "target_dtype": "the kernel runs in v's dtype",
    # The model's own keywords, which transformers hands every layer down to attention unread:
    "shift_labels": "the loss's, from the packed kwargs",
    "labels": "the loss's",
    "num_items_in_batch": "the loss's",
    "output_router_logits": "the mixture-of-experts router's",
    "output_hidden_states": "the model's outputs",
    "seq_idx": "the Mamba / linear-attention layers' document index (packed kwargs); attention reads cu_seq_lens_q",
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
    """Deprecated: ``packing.interop.hf.pack(model, kernels=...)`` gives each model its own kernels,
    and importing :mod:`packing.interop.hf` registers ``packing_varlen``. Removed in the next release.

    Sets the kernels of the plain ``packing_varlen`` for the whole process (``kernels`` as in
    :meth:`~packing.kernels.choice.KernelSet.load`) and returns ``"packing_varlen"``.
    """
    import warnings

    warnings.warn("packing.interop.hf_attention.register() is deprecated and will be removed in the next release: "
                  "import packing.interop.hf (it registers 'packing_varlen') and use packing.interop.hf.pack(model, "
                  "kernels=...), which keeps each model's kernels its own", FutureWarning, stacklevel=2)
    _kernel_sets[NAME] = KernelSet.load(kernels)
    install()
    return NAME


def install() -> None:
    """Register the plain ``packing_varlen`` with transformers' ``AttentionInterface`` (done when
    :mod:`packing.interop.hf` is imported). It registers no mask function on purpose: for an
    implementation without one, transformers builds no attention mask, and the boundaries come only
    from ``cu_seq_lens_q``."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)


def implementation_for(kernels: Sequence[str] | None) -> str:
    """The attention implementation name that runs ``kernels`` (best first; None: every kernel that
    loads, as the plain ``packing_varlen``), registered with transformers on first use; the kernels
    are resolved now, and a name that does not load is a ValueError naming those that do."""
    if kernels is None:
        install()
        if _kernel_sets[NAME] is None:
            _kernel_sets[NAME] = KernelSet.load()
        return NAME
    resolved = KernelSet.load(kernels)
    import re

    name = "_".join([NAME, *(_SHORT.get(k) or re.sub(r"\W", "_", k) for k in resolved.names)])
    if name not in _kernel_sets:
        from transformers import AttentionInterface

        from packing.interop.hf_families import VERDICT_OF

        _kernel_sets[name] = resolved
        VERDICT_OF[name] = NAME  # the same computation as packing_varlen: its verdict
        AttentionInterface.register(name, _bound(name))
    return name


def kernels_of(implementation: str) -> KernelSet | None:
    """The kernels an implementation registered here runs on CUDA (None: not resolved yet)."""
    return _kernel_sets.get(implementation)


def _bound(name: str) -> Callable[..., tuple[Tensor, None]]:
    def attention(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                  **kwargs: Any) -> tuple[Tensor, None]:
        return _attention(name, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)

    attention.__name__ = attention.__qualname__ = f"varlen_attention[{name}]"
    return attention


def kernel_name(options: dict[str, Any] | None = None, head_dim: int = 64, implementation: str = NAME) -> str | None:
    """The kernel ``implementation`` runs on CUDA for a layer asking ``options`` (``scale``,
    ``window``, ``softcap``, ``sinks``; none by default) at ``head_dim``, or None where there is none
    (a CPU machine, no kernel with those options, or kernels not resolved yet)."""
    kernels = _kernel_sets.get(implementation)
    chosen = None if kernels is None else kernels.choose(options or {}, head_dim)
    return None if chosen is None else chosen.name


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
            "(packed rows through packing.interop.hf.pack(model)) or train without packing"
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
    the graph, and with static kwargs (``pack(model, static=...)``) every batch has the same shapes
    and constants: one compilation.
    """
    return _attention(NAME, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def _attention(name: str, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
               attention_mask: Tensor | None, dropout: float, scaling: float | None, is_causal: bool | None,
               kwargs: dict[str, Any]) -> tuple[Tensor, None]:
    cu, max_len = kwargs.get("cu_seq_lens_q"), kwargs.get("max_length_q")
    if cu is None or max_len is None:
        raise ValueError(
            f"attn_implementation 'packing_varlen' needs cu_seq_lens_q and max_length_q, and {type(module).__name__} "
            "called it without them: either the model's kwargs did not come from packing.interop.hf.pack(model), "
            "or this model does not hand them down to its attention layers (then load it "
            "with attn_implementation 'sdpa' or 'eager')"
        )
    # The keys' boundaries must be the queries': a packed row attends each document to itself, so
    # the kernel reads cu_seq_lens_q for both, and a different cu_seq_lens_k would be dropped.
    same_keys(cu, max_len, kwargs.get("cu_seq_lens_k", cu), kwargs.get("max_length_k", max_len))
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
        # kwargs came from a bare name (a no-op where pack(model) saw the model: checked there).
        _check_family(getattr(module, "config", None), name)
    # (T, H, D) and (T, H_kv, D): grouped-query attention goes to the kernel as it is, k and v unrepeated
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))
    if kwargs.get("packing_context") is not None:
        out, kernel = _context(q, k, v, kwargs["packing_context"], kwargs.get("packing_context_group"), layer, name)
    elif not q.is_cuda:
        out, kernel = _masked(q, k, v, cu, max_len, layer), _cpu_kernel(layer)
    else:
        out, kernel = _on_cuda(q, k, v, cu, max_len, layer, _resolved(name))
    for counter in _counters:  # only while the verifier or layer_kernels counts (eager runs)
        counter.count += 1
        counter.kernels[module] = kernel
    return out[None], None


def same_keys(cu: Tensor, max_len: int, cu_k: Tensor, max_k: int) -> None:
    """Refuse keys' boundaries other than the queries': a packed row attends each document to
    itself, so the kernel reads ``cu_seq_lens_q`` and ``max_length_q`` for both, and a different
    ``cu_seq_lens_k`` or ``max_length_k`` would be dropped. Under ``torch.compile`` the keys'
    boundaries must be the queries' very tensor, and ``max_length_k`` is not read (see the code).

    Examples:
        >>> cu = torch.tensor([0, 3, 5], dtype=torch.int32)
        >>> same_keys(cu, 3, cu, 3)
        >>> same_keys(cu, 3, cu, 4)
        Traceback (most recent call last):
        ...
        ValueError: 'packing_varlen' got max_length_k=4 and max_length_q=3; a packed row attends each document to itself: pass the same (pack(model)'s kwargs do)
    """
    if cu_k is not cu and (torch.compiler.is_compiling() or cu_k.shape != cu.shape or not torch.equal(cu_k, cu)):
        raise ValueError("'packing_varlen' got cu_seq_lens_k other than cu_seq_lens_q; a packed row attends each "
                         "document to itself: pass the same boundaries for both (pack(model)'s kwargs do)")
    if torch.compiler.is_compiling():
        # Compiled, the lengths may be dynamic, and any comparison of the two symbols (`!=`, and
        # torch._check too) makes the shape environment replace one with the other; Inductor then
        # hands the kernel's custom op the replaced, unbound symbol (NameError inside the compiled
        # FA4 step on an H100, torch 2.11). So compiled, max_length_k is not read at all: the
        # kernels take max_length_q for the keys too, exact because the keys' boundaries are the
        # queries' very tensor (checked above). Eager, a different max_length_k is refused.
        return
    if max_k != max_len:
        raise ValueError(f"'packing_varlen' got max_length_k={max_k!r} and max_length_q={max_len!r}; {_SAME_LENGTHS}")


_SAME_LENGTHS = "a packed row attends each document to itself: pass the same (pack(model)'s kwargs do)"


def _resolved(name: str) -> KernelSet:
    kernels = _kernel_sets.get(name)
    if kernels is None:
        if torch.compiler.is_compiling():
            raise ValueError(f"{name!r} on CUDA resolves its kernels outside a compiled step: call "
                             "packing.interop.hf.pack(model) before compiling the model")
        kernels = _kernel_sets[name] = KernelSet.load()
    return kernels


def _context(q: Tensor, k: Tensor, v: Tensor, shard: Any, group: Any, layer: LayerOptions,
             name: str) -> tuple[Tensor, str]:
    """A context-parallel shard's layer (:func:`packing.context.context_attention`): each local
    chunk against its document's prefix, keys and values all-gathered across ``group``. On CUDA the
    chunks run in the first of the model's kernels that takes their own query and key boundaries
    (:func:`packing.kernels.chunk_varlen_kernels`), checked at first use; with the default kernels
    and none of those loading, SDPA with a mask per chunk."""
    from packing.context.attention import context_attention
    from packing.context.varlen import chunk_kernel

    if layer.sinks is not None and layer.sinks.dim() != 1:
        raise ValueError(f"'packing_varlen' under context parallelism takes attention sinks per head, (H,), and this "
                         f"layer gives per-token sinks of shape {tuple(layer.sinks.shape)}; train this model without "
                         "context parallelism (one rank per row)")
    if v.dtype != q.dtype:  # rotary embeddings leave q and k in fp32 under autocast while v is half
        q, k = q.to(v.dtype), k.to(v.dtype)
    options = {"scale": layer.scale, "window": layer.window, "softcap": layer.softcap, "sinks": layer.sinks}
    found = None
    if q.is_cuda:
        names = _resolved(name).names
        asked = frozenset(o for o, value in options.items() if value is not None)
        found = chunk_kernel(q.device, q.dtype, q.shape[-1], names, asked)
        if found is None and name != NAME:  # the model's own kernel list: never swapped for another path
            raise ValueError(f"this model's kernels {list(names)} have no context-parallel form here for this layer "
                             f"({sorted(asked) or 'no options'}); a shard's chunks need a kernel that takes their query "
                             "and key boundaries apart: add 'flash-attn-3', 'flash-attn-4', 'flash-attn-2' or 'torch.varlen_attn' "
                             "(no softcap; sinks: FA4 only) to pack(model, kernels=...)")
    out = context_attention(q, k, v, shard, causal=layer.causal, group=group,
                            kernel=None if found is None else found[1], **options)
    return out, f"context parallel: keys all-gathered, {'sdpa per chunk' if found is None else found[0]}"


def _cpu_kernel(layer: LayerOptions) -> str:
    """What :func:`_masked` runs for a layer on a CPU, as :meth:`HFPacking.layer_kernels` names it."""
    how = "sdpa" if layer.softcap is None and layer.sinks is None else "softmax written out"
    per = "document mask" if layer.sinks is not None and layer.sinks.dim() != 1 else "documents gathered"
    return f"cpu: {how}, {per}"


class _Calls:
    """What the layers inside :func:`counting_calls` did: how many calls, and the kernel each
    attention module ran (by module)."""

    def __init__(self) -> None:
        self.count = 0
        self.kernels: dict[torch.nn.Module, str] = {}


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
_checked: dict[tuple[int, str], Any] = {}


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
    try:
        name = ctx.get_local("name").as_python_constant()
    except Exception:  # noqa: BLE001 - as above
        name = NAME
    if module is None:
        from packing.interop.hf_families import checked_any

        if checked_any(name):  # kwargs built from a model: checked there
            return
        raise ValueError("'packing_varlen' under torch.compile could not see the calling module's config to check it; "
                         "build the kwargs from the model: packing.interop.hf.pack(model)")
    _check_family(getattr(module, "config", None), name)


def _check_family(config: Any, name: str) -> None:
    if config is None or (id(config), name) in _checked:
        return
    from packing.interop.hf_families import check_model

    check_model(config, name)
    _checked[(id(config), name)] = config


def _on_cuda(q: Tensor, k: Tensor, v: Tensor, cu: Tensor, max_len: int, layer: LayerOptions,
             kernels: KernelSet) -> tuple[Tensor, str]:
    """The layer on the first of ``kernels`` that computes it; (out (T, H, D_v), the kernel's name)."""
    if not kernels.kernels:
        raise ValueError("'packing_varlen' on CUDA needs a varlen kernel (torch >= 2.10, flash-attn-3/4 or "
                         "flash-attn 2), and none loads here")
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
    chosen = kernels.require(
        options, q.shape[-1], who="'packing_varlen' on CUDA",
        asks=f"this layer asks {', '.join(f'{k}={_show(v)}' for k, v in options.items()) or 'no option'}",
        fix="install flash-attn (FA2, FA3 or FA4) for softcap, FA4 for sinks, torch >= 2.11 for scale and "
            "sliding_window, or name other kernels in pack(model, kernels=...)")
    if v.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"'packing_varlen' on CUDA needs bf16 or fp16, got {v.dtype}; run under torch.autocast")
    # Rotary embeddings multiply by fp32 cos/sin, so Llama's q and k arrive in fp32 under autocast
    # while v comes from a bf16 projection; the kernel takes v's dtype.
    q, k = q.to(v.dtype), k.to(v.dtype)
    note_kernel(chosen.name)
    return chosen.run(q, k, v, cu, max_len, layer.causal, **options), chosen.name


def note_kernel(name: str) -> None:
    """Sets :data:`last_kernel` to ``name`` without a side effect in a compiled graph.

    Under ``torch.compile`` the assignment runs while dynamo traces (``comptime``), not in the
    graph. Assigned in traced code, the module global was a side effect, and inside activation
    checkpointing's higher-order op dynamo refuses those: each checkpointed layer broke out of the
    graph and recomputed eagerly, at several times the step's cost.

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


def _masked(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int, layer: LayerOptions) -> Tensor:
    """Exact attention within each block of ``cu_seqlens``, for the CPU: q (T, H, D), k (T, H_kv, D),
    v (T, H_kv, D_v) -> (T, H, D_v); ``max_len`` bounds every block's length, as for a varlen kernel.

    The documents are gathered into a (blocks, H, longest, D) block and attended in one SDPA call
    (:func:`_gathered`), so memory grows with blocks x longest², not T². Eager, the boundaries are
    read on the host and longest is the longest block; under ``torch.compile`` nothing is read on the
    host: the slots are placed on the device and longest is ``max_len`` (static boundaries whose
    blocks x max_len² would exceed T², or per-token sinks, take the (T, T) mask instead). SDPA where
    it computes the layer; the softmax written out, as transformers' eager code does, for softcaps
    and sinks."""
    if layer.sinks is not None and layer.sinks.dim() != 1:  # per-token sinks (1, H, T, 1) stay in row order
        return _attend(q, k, v, block_causal_mask(cu_seqlens, q.shape[0], causal=layer.causal, window=layer.window), layer)
    if not torch.compiler.is_compiling():
        return _gathered(q, k, v, cu_seqlens, layer)
    num_slots, blocks = q.shape[0], cu_seqlens.shape[0]  # blocks: those of cu_seqlens and the tail
    if all(isinstance(n, int) for n in (num_slots, blocks, max_len)) and blocks * max_len ** 2 > num_slots ** 2:
        return _attend(q, k, v, block_causal_mask(cu_seqlens, num_slots, causal=layer.causal, window=layer.window), layer)
    return _gathered_on_device(q, k, v, cu_seqlens, max_len, layer)


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
    return _attend_blocks(q, k, v, row, docs, longest, lengths.to(q.device), layer)


def _gathered_on_device(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_len: int,
                        layer: LayerOptions) -> Tensor:
    """:func:`_gathered` without a host read, for a compiled step: every block of ``cu_seqlens``
    (empty ones included) and the tail past its last boundary gets a row of ``max_len`` slots. A slot
    past ``max_len`` in its block (a tail longer than ``max_len``: padding, never a document under
    the kernels' contract) is left out and its output is zero."""
    num_slots = q.shape[0]
    bounds = F.pad(cu_seqlens.long(), (0, 1), value=num_slots)  # (blocks + 1,): the tail rule's last block
    blocks = bounds.shape[0] - 1
    index = torch.arange(num_slots, device=q.device)
    block = torch.searchsorted(bounds, index, right=True) - 1  # (T,): of equal boundaries, the last (non-empty)
    offset = index - bounds[block]
    row = torch.where(offset < max_len, block * max_len + offset, blocks * max_len)  # past max_len: a spare row
    return _attend_blocks(q, k, v, row, blocks, max_len, bounds[1:] - bounds[:-1], layer)


def _attend_blocks(q: Tensor, k: Tensor, v: Tensor, row: Tensor, docs: int, longest: int, lengths: Tensor,
                   layer: LayerOptions) -> Tensor:
    """Attention of (T, H, D) tokens gathered into ``docs`` rows of ``longest`` slots: token t goes to
    slot ``row[t]`` of the flat (docs * longest) block (``row[t] == docs * longest``: a spare slot, left
    out, output zero); ``lengths`` (docs,) on the device, a block's length (clamped to ``longest``)."""
    def block(x: Tensor) -> Tensor:  # (T, H, D) -> (docs, H, longest, D), padding rows zero
        return to_blocks(x, row, docs + 1, longest)[:docs]

    index = torch.arange(longest, device=q.device)
    lengths = lengths.clamp(max=longest)
    distance = index[:, None] - index[None, :]  # (L, L): i - j, the same within a document as in the row
    allowed = (index[None, None, :] < lengths[:, None, None]).expand(docs, longest, longest).clone()
    if layer.causal:
        allowed &= distance >= 0
    if layer.window is not None:
        allowed &= distance.abs() < layer.window
    # A block's padding rows (past their document) see key 0, so no softmax row is empty (a NaN
    # there would reach the gradients); their outputs are never gathered back.
    allowed |= (index[None, :, None] >= lengths[:, None, None]) & (index == 0)
    out = _attend(block(q), block(k), block(v), allowed[:, None], layer, batched=True)  # (docs, H, L, D_v)
    flat = out.transpose(1, 2).reshape(docs * longest, *out.shape[1:2], out.shape[-1])
    return F.pad(flat, (0, 0, 0, 0, 0, longest)).index_select(0, row)  # the spare row reads zeros


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
