"""Packed rows for a Hugging Face transformers model: :func:`pack` builds one object from the model
that collates samples into ``model(**kwargs)``'s kwargs, computes the loss, and names the kernel
each attention layer runs. Importing this module registers ``packing_varlen`` with transformers.

transformers computes a causal LM's loss by shifting ``labels`` itself (position t predicts
``labels[t + 1]``), so the kwargs hold labels shifted right by one against ours: the first token of
every document holds -100, and no document's last token learns to predict the next document. They
also hold ours unshifted as ``shift_labels``, which transformers' causal-LM loss uses as given: the
shifted form has no slot for the last token's target of a sample given as an (inputs, targets)
pair. How the document boundaries reach attention depends on the model's attention implementation,
and one that would let documents attend to each other is refused:

===============================================  ==============================================
``config._attn_implementation``                  what carries the boundaries
===============================================  ==============================================
``flash_attention_2|3|4``, ``packing_varlen``    ``cu_seq_lens_q/k`` and ``max_length_q/k`` (varlen kernels)
``sdpa``, ``eager``                              one 4-D additive ``attention_mask``, (1, 1, T, T): 0 where
                                                 a query sees a key, the dtype's minimum elsewhere
anything else (``flex_attention``, custom)       refused with a ValueError
===============================================  ==============================================

Why not ``position_ids`` alone, as ``DataCollatorWithFlattening`` does for sdpa and eager: on tiny
random Llama and GPT-2 models, one packed row of three documents then gave logits far off running
each document alone, silently. Why one additive mask for both: sdpa reads a bool mask right, but
eager adds whatever mask it gets to the scores (True adds 1), so kwargs built for an sdpa model and
fed to an eager copy of it would be far off, silently; the additive mask means the same to both. The
4-D mask costs T x T memory (half a GiB in bf16 at T = 16,384): for long rows use a varlen
implementation. ``packing_varlen`` is this project's (:mod:`packing.interop.hf_attention`): the
varlen kernels on CUDA without the flash-attn package, and exact per-document attention on a CPU
with memory linear in the row.

Under ``torch.compile``, ask for static shapes: ``pack(model, static={"total_tokens": 16384,
"max_seqs": 256, "max_seqlen": 1024})``, and the same ``max_tokens`` and ``max_seqs`` to
``PackingSampler`` (a low ``max_seqs`` leaves the shortest documents in part-filled packs). Every
row is then padded to ``total_tokens``, ``cu_seq_lens_q/k`` always have ``max_seqs +
ceil(total_tokens / max_seqlen) + 1`` entries (the padding tail in blocks of at most
``max_seqlen``, then empty documents) and ``max_length_q/k`` is always ``max_seqlen``, so the model
compiles once. A row with more documents or more tokens is a ValueError, never truncated. The kwargs
always carry ``use_cache=False``: a packed row is for a loss.

Example (the kwargs of two documents, from a bare implementation name; :func:`pack` does this
from the model, checked):
    >>> from packing import get_collator
    >>> batch = get_collator("concat")([[11, 12], [21, 22, 23]])
    >>> kw = checked_kwargs(batch, "packing_varlen")
    >>> kw["labels"].tolist(), kw["position_ids"].tolist()
    ([[-100, 12, -100, 22, 23]], [[0, 1, 0, 1, 2]])
    >>> kw["cu_seq_lens_q"].tolist(), kw["max_length_q"]
    ([0, 2, 5], 3)
    >>> static = get_collator("concat", total_tokens=8, max_seqs=3, max_seqlen=4)([[11, 12], [21, 22, 23]])
    >>> kw = checked_kwargs(static, "packing_varlen")
    >>> kw["cu_seq_lens_q"].tolist(), kw["max_length_q"]
    ([0, 2, 5, 8, 8, 8], 4)
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from packing.batch import Batch
from packing.boundaries import block_causal_mask, with_tail
from packing.collate import ConcatCuSeqlens
import packing.interop.hf_attention as hf_attention
from packing.interop.hf_families import (  # noqa: F401  (check_model and accepted_implementation are API here too)
    MASK_IMPLEMENTATIONS,
    VARLEN_IMPLEMENTATIONS,
    VERDICT_OF,
    _config_of,
    accepted_implementation,
    check_model,
    has_state_layers,
    is_varlen,
    layer_windows,
)
from packing.interop.hf_attention import register  # noqa: F401  (deprecated; kept importable for one release)

__all__ = ["HFPacking", "HFPackedCollator", "accepted_implementation", "block_causal_mask", "check_model",
           "check_vocab", "hf_kwargs", "pack", "shifted_labels"]

STATIC_KEYS = ("total_tokens", "max_seqs", "max_seqlen")

def check_vocab(batch: Batch, vocab_size: int) -> None:
    """A ValueError naming the first token id at or above ``vocab_size``, its position and its
    document (the embedding's bare IndexError names none of them). Reads the ids on the host: call
    it on the collated CPU batch, before the copy to the GPU."""
    ids = batch.input_ids[0, : batch.num_tokens]
    bad = (ids >= vocab_size).nonzero()
    if len(bad):
        pos = int(bad[0, 0])
        doc = int(torch.searchsorted(batch.cu_seqlens, torch.tensor(pos, dtype=batch.cu_seqlens.dtype), right=True)) - 1
        raise ValueError(
            f"token id {int(ids[pos])} at position {pos} of the packed row (document {doc}) is >= the model's vocab_size "
            f"{vocab_size} ({int(bad.numel())} such ids in the row); tokenize with the model's tokenizer, or resize its "
            "embeddings (model.resize_token_embeddings)"
        )


def hf_kwargs(batch: Batch, model_or_name: Any, *, mask_dtype: torch.dtype | None = None,
              vocab_size: int | None = None) -> dict[str, Any]:
    """Deprecated: ``pack(model).kwargs(batch)``. Removed in the next release. Arguments as
    :func:`checked_kwargs`."""
    warnings.warn("packing.interop.hf.hf_kwargs is deprecated and will be removed in the next release: use "
                  "packing.interop.hf.pack(model).kwargs(batch), which checks the model once", FutureWarning,
                  stacklevel=2)
    return checked_kwargs(batch, model_or_name, mask_dtype=mask_dtype, vocab_size=vocab_size)


def checked_kwargs(batch: Batch, model_or_name: Any, *, mask_dtype: torch.dtype | None = None,
                 vocab_size: int | None = None) -> dict[str, Any]:
    """Keyword arguments for ``model(**kwargs)``: one packed row, documents kept apart; the model
    checked (:func:`check_model`) at every call. :meth:`HFPacking.kwargs` is the same, checked once.

    Args:
        batch: a packed batch (``concat`` or ``xformers`` collator), shape (1, T).
        model_or_name: the transformers model (or its config), checked by :func:`check_model`; a
            bare ``attn_implementation`` name only for ``packing_varlen``, which checks the model
            at its first call (the masks of sdpa and eager depend on the config's windows).
        mask_dtype: the additive mask's dtype (``sdpa``, ``eager``); by default the model's dtype,
            or float32 given a config.
        vocab_size: ids at or above it are a ValueError (:func:`check_vocab`); by default the
            model's ``vocab_size``. Checked where the batch is on the CPU (no host sync on a GPU).

    Returns ``input_ids``, ``labels``, ``shift_labels`` and ``position_ids``, each (1, T) int64, plus the boundaries
    in the form the implementation reads (see the module table). A padding tail past the last
    document becomes one more block that attends only to itself, so every row stays finite.

    Raises:
        ValueError: the batch is not packed, or the implementation would attend across documents.
    """
    _check_batch(batch)
    name = accepted_implementation(model_or_name)
    config = _config_of(model_or_name)
    if config is None:
        _refuse_bare_name(name)
    else:
        check_model(model_or_name, name)
    return _kwargs(batch, name, config, mask_dtype or _model_dtype(model_or_name), vocab_size)


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, Batch):
        raise TypeError(f"the packed kwargs take a packing.Batch, got {type(batch).__name__}")
    if batch.layout != "packed":
        raise ValueError(
            f"the packed kwargs need a packed batch, got layout {batch.layout!r}; collate with "
            "get_collator('concat') (or call pack(model) on the samples) to get one row with cu_seqlens"
        )


def _kwargs(batch: Batch, name: str, config: Any, dtype: torch.dtype, vocab_size: int | None,
            context_group: Any = None) -> dict[str, Any]:
    """The kwargs of a checked model's implementation ``name`` (module docstring)."""
    if batch.context is not None:
        return _context_kwargs(batch, name, config, vocab_size, context_group)
    if batch.num_targets == 0:
        # Not an error here: under gradient accumulation transformers divides by the step's count
        # (num_items_in_batch), and this row adds nothing. Alone, its loss would be 0.0.
        warnings.warn(
            f"this packed row has no target tokens (all {len(batch.seq_lens)} documents are one token long): it adds "
            "nothing to the step, and trained alone its loss is 0.0; drop documents shorter than 2 tokens",
            stacklevel=2,
        )
    vocab_size = vocab_size or getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and batch.input_ids.device.type == "cpu":
        check_vocab(batch, vocab_size)
    if batch.static_cu_seqlens is not None and not is_varlen(name):
        raise ValueError(_static_refusal(name))
    kwargs: dict[str, Any] = {
        "input_ids": batch.input_ids,
        "labels": shifted_labels(batch),
        # Our labels are already per position. transformers' causal-LM loss takes them as they are
        # (shift_labels), which keeps the one target the shifted form cannot hold: that of the row's
        # last token, when a sample came with explicit targets and no padding follows.
        "shift_labels": batch.labels,
        "position_ids": batch.position_ids,
        # A packed row is for a loss, never for generation. With the cache on, transformers builds
        # a DynamicCache whose guards recompile a compiled model once per layer.
        "use_cache": False,
    }
    T = batch.num_slots
    if config is not None and has_state_layers(config):
        kwargs["seq_idx"] = document_index(batch)
    if is_varlen(name):
        if batch.static_cu_seqlens is not None:
            # Static shapes: boundaries of one fixed length (the padding tail in blocks of at most
            # static_max_seqlen, then empty sequences) and a constant max_length, so a compiled
            # model sees the same shapes and constants for every batch and compiles once.
            cu, longest = batch.static_cu_seqlens, batch.static_max_seqlen
        else:
            # The padding tail, if any, becomes one more block. Built on the batch's device from its
            # cu_seqlens, so a GPU batch needs no host-to-device copy (a pageable one would wait).
            cu = with_tail(batch.cu_seqlens, batch.num_tokens, T)
            longest = max(batch.max_seqlen, T - batch.num_tokens)  # a host int: no sync
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return kwargs
    cu = batch.cu_seqlens  # the mask puts slots past the last boundary, the padding tail, in a block of their own

    # One (1, 1, T, T) mask per kind of layer: a model whose layers alternate full and sliding
    # attention (Gemma 2 and 3, gpt-oss, Cohere 2) takes a dict keyed by layer type, as its own
    # create_masks_for_generate builds; a model of one kind takes the mask itself.
    masks = {kind: _mask(cu, T, window, name, dtype) for kind, window in layer_windows(config).items()}
    kwargs["attention_mask"] = next(iter(masks.values())) if len(masks) == 1 else masks
    return kwargs


def _context_kwargs(batch: Batch, name: str, config: Any, vocab_size: int | None, group: Any) -> dict[str, Any]:
    """The kwargs of one context-parallel shard (:meth:`HFPacking.kwargs`)."""
    if not is_varlen(name):
        raise ValueError(f"a context-parallel shard needs attn_implementation 'packing_varlen' (its attention gathers "
                         f"the other ranks' keys), and the model runs {name!r}")
    if config is not None and has_state_layers(config):
        raise ValueError(f"{getattr(config, 'model_type', type(config).__name__)} has state-carrying (recurrent) layers, "
                         "which context parallelism does not carry across ranks; train it without context parallelism")
    if config is not None and getattr(config, "output_router_logits", False):
        raise ValueError("output_router_logits=True: the router's load-balancing loss is not a sum over tokens, so the "
                         "ranks' shares would not add up to the row's; set output_router_logits=False under context "
                         "parallelism")
    vocab_size = vocab_size or getattr(config, "vocab_size", None)
    if isinstance(vocab_size, int) and batch.input_ids.device.type == "cpu":
        check_vocab(batch, vocab_size)
    # Each chunk a sequence: the shifted form of its targets leaves out the one that belongs to the
    # next chunk, so the loss reads shift_labels (the targets as set on the whole row), and
    # num_items_in_batch makes each rank's loss its share of the row's.
    labels = torch.nn.functional.pad(batch.labels[:, :-1], (1, 0), value=batch.ignore_index)
    starts = batch.cu_seqlens[:-1].long()
    labels[0, starts] = batch.ignore_index
    return {"input_ids": batch.input_ids, "labels": labels, "shift_labels": batch.labels,
            "position_ids": batch.position_ids, "use_cache": False,
            "cu_seq_lens_q": batch.cu_seqlens, "cu_seq_lens_k": batch.cu_seqlens,
            "max_length_q": batch.max_seqlen, "max_length_k": batch.max_seqlen,
            "num_items_in_batch": batch.context.num_targets,
            "packing_context": batch.context, "packing_context_group": group}


def _model_dtype(model_or_config: Any) -> torch.dtype:
    """The dtype of a model's parameters, for eager's additive mask; float32 for a config or a name
    (a config's ``dtype`` is the checkpoint's, may be None or a string, and is not the run's)."""
    return model_or_config.dtype if isinstance(model_or_config, torch.nn.Module) else torch.float32


def document_index(batch: Batch) -> Tensor:
    """(1, T) int32: each slot's document index, the padding tail one more (``seq_idx``, as
    ``DataCollatorWithFlattening(return_seq_idx=True)`` gives): what Mamba 2 and linear-attention
    kernels read to reset their state at each document, and what their torch fallbacks refuse."""
    cu = with_tail(batch.cu_seqlens, batch.num_tokens, batch.num_slots)
    index = torch.arange(batch.num_slots, device=cu.device)
    return (torch.searchsorted(cu, index.to(cu.dtype), right=True) - 1).to(torch.int32)[None]


def _mask(cu: Tensor, num_slots: int, window: int | None, name: str, dtype: torch.dtype) -> Tensor:
    """(1, 1, T, T) additive mask, 0 where allowed and the dtype's minimum elsewhere: eager adds it
    to the scores and sdpa takes it as a float mask, so kwargs for one are right for the other."""
    allowed = block_causal_mask(cu, num_slots, window=window)  # (T, T)
    additive = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return additive.masked_fill_(~allowed, torch.finfo(dtype).min)[None, None]


def _refuse_bare_name(name: str) -> None:
    if name != "packing_varlen":
        raise ValueError(
            f"attn_implementation {name!r} given by name alone: pass the model (or its config) instead, so its family "
            "and config are checked and sdpa/eager masks get its sliding windows; only 'packing_varlen' checks the "
            "model itself, at its first call"
        )


def _static_refusal(name: str) -> str:
    return (
        f"static boundaries (max_seqs, max_seqlen) are for varlen implementations ("
        f"{', '.join(VARLEN_IMPLEMENTATIONS)}), not {name!r}: it takes a (T, T) mask, whose shape is fixed by "
        "total_tokens alone; drop max_seqs and max_seqlen, or load the model with attn_implementation='packing_varlen'"
    )


def shifted_labels(batch: Batch) -> Tensor:
    """Our per-position labels (B, L) in transformers' convention, shifted right by one: transformers
    shifts them back, so position t predicts ``labels[t + 1]``. Each row starts with ignore_index."""
    labels = torch.full_like(batch.labels, batch.ignore_index)
    labels[:, 1:] = batch.labels[:, :-1]
    return labels


class HFPackedCollator:
    """Deprecated: ``pack(model)`` is the collate function (and ``pack(model, static=...)`` its
    static form). Removed in the next release.

    A DataLoader ``collate_fn`` that returns :func:`checked_kwargs` of a ``concat`` batch, ready for
    ``model(**kwargs)`` or a transformers ``Trainer`` (its ``data_collator``).

    Args:
        model: the transformers model (or its config), checked here by :func:`check_model`, so a
            model that would mix documents fails at construction, not after a training run; or
            the bare name ``"packing_varlen"``, which checks the model at its first call.
        dtype: the model's dtype, for the additive mask of ``sdpa`` and ``eager`` (by
            default the model's).
        vocab_size: ids at or above it are refused by name (by default the model's ``vocab_size``;
            give it with the bare name ``"packing_varlen"``).
        **options: ``ConcatCuSeqlens`` options (``pad_to_multiple_of``, ``total_tokens``, ...).
            ``total_tokens``, ``max_seqs`` and ``max_seqlen`` together give static kwargs for a
            compiled model (module docstring); they need a varlen implementation.
    """

    def __init__(self, model: Any, *, dtype: torch.dtype | None = None, vocab_size: int | None = None,
                 **options: Any) -> None:
        warnings.warn("packing.interop.hf.HFPackedCollator is deprecated and will be removed in the next release: use "
                      "packing.interop.hf.pack(model) (static shapes: pack(model, static={'total_tokens': ..., "
                      "'max_seqs': ..., 'max_seqlen': ...})) as the collate function", FutureWarning, stacklevel=2)
        self.attn_implementation = accepted_implementation(model)  # refuse a mixing one now
        # What hf_kwargs checks and reads: the model's own config (its family, as check_model saw
        # it), not the model, which DataLoader workers would each get a copy of.
        self.model = model if isinstance(model, str) else getattr(model, "config", model)
        if isinstance(model, str):
            _refuse_bare_name(model)
        else:
            check_model(model)
        self.dtype = dtype or _model_dtype(model)
        self.vocab_size = vocab_size  # by default the model's: hf_kwargs reads it from the config
        self.collator = ConcatCuSeqlens(**options)
        if self.collator.static_length is not None and not is_varlen(self.attn_implementation):
            raise ValueError(_static_refusal(self.attn_implementation))

    def __call__(self, samples: Any) -> dict[str, Any]:
        return checked_kwargs(self.collator(samples), self.model, mask_dtype=self.dtype, vocab_size=self.vocab_size)

    def __repr__(self) -> str:
        return f"HFPackedCollator({self.attn_implementation!r}, dtype={self.dtype}, collator={self.collator!r})"


class HFPacking:
    """Packed rows for one transformers model: its collate function, its kwargs, its loss, its
    kernels. Build it with :func:`pack`.

    Attributes:
        model: the transformers model (its ``config._attn_implementation`` the one in use).
        collator: the :class:`~packing.collate.ConcatCuSeqlens` that lays out each row (a sampler
            and :func:`packing.loader.make_loader` read its static budget).
        implementation: the attention implementation the model runs (``packing_varlen``, the name of
            its own kernel list, ``flash_attention_2|3|4``, ``sdpa`` or ``eager``).

    Calling it on a list of samples (token lists, ``(inputs, targets)`` pairs or transformers/TRL
    dict rows, as any collator takes them) returns ``model(**kwargs)``'s kwargs for one packed row:
    a DataLoader ``collate_fn`` and a ``Trainer``'s ``data_collator``. DataLoader workers receive a
    copy without the model (collating needs only its config).
    """

    def __init__(self, model: Any, *, kernels: Any = None, static: Any = None, vocab_size: int | None = None,
                 **collate: Any) -> None:
        model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: the model itself
        if not isinstance(model, torch.nn.Module) or not hasattr(getattr(model, "config", None), "model_type"):
            raise TypeError(f"pack takes a transformers model (a PreTrainedModel), got {type(model).__name__}; "
                            "load it with AutoModelForCausalLM.from_pretrained(..., attn_implementation='packing_varlen')")
        name = accepted_implementation(model)  # refuse an implementation that mixes documents, now
        if kernels is not None:
            if VERDICT_OF.get(name, name) != hf_attention.NAME:
                raise ValueError(
                    f"kernels={kernels!r} chooses packing_varlen's kernels, but this model runs {name!r}; load it with "
                    "attn_implementation='packing_varlen' (registered by importing packing.interop.hf), or leave "
                    "kernels=None"
                )
            name = hf_attention.implementation_for(kernels)
            if name != model.config._attn_implementation:
                model.set_attn_implementation(name)
        elif name == hf_attention.NAME:
            hf_attention.implementation_for(None)  # every kernel that loads, resolved now: never in a compiled step
        self.collator = ConcatCuSeqlens(**collate, **_static_options(static, collate))
        if self.collator.static_length is not None and not is_varlen(name):
            raise ValueError(_static_refusal(name))
        check_model(model, name)  # its family and its own config, verified once (cached across runs)
        self.model = model
        self.config = _config_of(model)
        self.implementation = name
        self.vocab_size = vocab_size
        self._dtype = _model_dtype(model)

    def __call__(self, samples: Any) -> dict[str, Any]:
        """``model(**kwargs)``'s kwargs for ``samples`` collated into one packed row."""
        return self.kwargs(self.collator(samples))

    def kwargs(self, batch: Batch, *, context_group: Any = None) -> dict[str, Any]:
        """``model(**kwargs)``'s kwargs for a packed :class:`~packing.batch.Batch` (the module
        docstring says what they hold). The model was checked when this object was built; a model
        switched to another implementation since is checked again here.

        A context-parallel shard (:class:`packing.context.ContextCollator` on ``self.collator``)
        gives kwargs for ``packing_varlen`` that attend each local chunk to its whole document,
        keys and values all-gathered across ``context_group`` (None: the default process group),
        and whose loss is the rank's share: its cross-entropy over the whole row's target count
        (``num_items_in_batch``), so the ranks' gradients add up to the row's."""
        _check_batch(batch)
        outer = self.model.config if self.model is not None else None
        if outer is not None and outer._attn_implementation != self.implementation:
            self.implementation = check_model(self.model)
        if self.model is not None:
            self._dtype = _model_dtype(self.model)
        return _kwargs(batch, self.implementation, self.config, self._dtype, self.vocab_size, context_group)

    def loss(self, kwargs: dict[str, Any], *, chunk: int = 4096, normalizer: int | Tensor | None = None) -> Tensor:
        """``model(**kwargs).loss`` without the (T, V) logits: the LM head and cross-entropy
        ``chunk`` tokens at a time (:func:`packing.interop.hf_loss.chunked_lm_loss`), plus the
        router's load-balancing loss where the model adds one. Verified against the model's own loss
        on a reduced copy of its config at the first call; a head or config it does not compute
        exactly is refused by name. ``normalizer``: what the summed cross-entropy is divided by (by
        default the row's target count; give the step's count under gradient accumulation)."""
        from packing.interop.hf_loss import checked_loss

        return checked_loss(self._model("loss"), kwargs, chunk=chunk, normalizer=normalizer)

    def layer_kernels(self) -> dict[str, str]:
        """{attention module's name in the model: the kernel it runs}, from one short eager forward
        of two documents on the model's device (bf16 autocast on CUDA for an fp32 model, as training
        runs). transformers' own implementations (``sdpa``, ``eager``, ``flash_attention_*``) are
        one entry, ``{"*": name}``: their kernels are transformers'."""
        model = self._model("layer_kernels")
        if VERDICT_OF.get(self.implementation, self.implementation) != hf_attention.NAME:
            return {"*": f"transformers {self.implementation}"}
        device = next(model.parameters()).device
        modes = {m: m.training for m in model.modules()}
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"
                                  and model.dtype not in (torch.bfloat16, torch.float16))
        model.eval()
        try:
            kwargs = self.kwargs(ConcatCuSeqlens()([[1] * 8, [1] * 5]).to(device))
            with torch.no_grad(), autocast, hf_attention.counting_calls() as calls:
                model(**kwargs)
        finally:
            for module, training in modes.items():
                module.training = training
        return {name: calls.kernels[module] for name, module in model.named_modules() if module in calls.kernels}

    def _model(self, what: str) -> Any:
        if self.model is None:
            raise ValueError(f"HFPacking.{what} needs the model, and this copy (a DataLoader worker's) has none; "
                             f"call it on the pack(model) object of the training process")
        return self.model

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker collates: it needs the config, not a copy of the model's weights.
        return {**self.__dict__, "model": None}

    def __repr__(self) -> str:
        kind = "static" if self.collator.static_length is not None else "dynamic"
        return f"HFPacking({type(self.model).__name__ if self.model is not None else 'no model'}, " \
               f"{self.implementation!r}, {kind} rows, collator={self.collator!r})"


def pack(model: Any, *, kernels: Sequence[str] | None = None, static: Mapping[str, int] | None = None,
         vocab_size: int | None = None, **collate: Any) -> HFPacking:
    """Packed rows for a transformers ``model``: one object that collates, makes kwargs, computes
    the loss and names each layer's kernel (:class:`HFPacking`).

    At construction the model's family and its own config are checked: a reduced copy of the config
    (one layer per kind, every feature kept) runs one packed row against each document alone, in
    fp32 on the CPU, once per transformers version and config (cached in ``~/.cache/packing``). A
    config that is not exact is refused with the measured error and the feature that causes it.

    Args:
        model: a transformers model loaded with a varlen implementation (``packing_varlen``,
            registered by importing this module, or ``flash_attention_2|3|4``) or a masked one
            (``sdpa``, ``eager``: a (T, T) mask, for short rows).
        kernels: the varlen kernels this model runs on CUDA, best first (``"flash-attn-3"``,
            ``"flash-attn-4"``, ``"flash-attn-2"``, ``"torch.varlen_attn"``); None: every one that
            loads. The model gets an implementation of its own for the list, so two models in one
            process each keep theirs. Needs ``packing_varlen``.
        static: ``{"total_tokens": T, "max_seqs": S, "max_seqlen": L}``: every row padded to T
            slots, at most S documents, none longer than L, so a compiled model sees the same shapes
            every step and compiles once (give a sampler the same ``max_tokens`` and ``max_seqs``).
            A row that does not fit is a ValueError, never truncated. Needs a varlen implementation.
        vocab_size: ids at or above it are refused by name (default: the model's).
        **collate: :class:`~packing.collate.ConcatCuSeqlens` options (``pad_to_multiple_of``,
            ``pad_id``, ``ignore_index``, ``ignore_keys``).

    Examples:
        >>> import torch, transformers
        >>> from packing.interop.hf import pack
        >>> config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        ...                                   num_attention_heads=2, vocab_size=16)
        >>> model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="packing_varlen")
        >>> packed = pack(model)
        >>> kwargs = packed([[5, 6, 7], [8, 9]])  # two documents, one row of 5 tokens
        >>> kwargs["cu_seq_lens_q"].tolist(), kwargs["labels"].tolist()
        ([0, 3, 5], [[-100, 6, 7, -100, 9]])
        >>> loss = packed.loss(kwargs)  # model(**kwargs).loss, without the (T, V) logits
        >>> bool(torch.allclose(loss, model(**kwargs).loss))
        True
        >>> packed.layer_kernels()
        {'model.layers.0.self_attn': 'cpu: sdpa, documents gathered'}
    """
    return HFPacking(model, kernels=kernels, static=static, vocab_size=vocab_size, **collate)


def _static_options(static: Any, collate: dict[str, Any]) -> dict[str, int]:
    """``static`` as ConcatCuSeqlens' total_tokens, max_seqs and max_seqlen; refuses them in
    ``collate`` (they come in ``static``, all three or none)."""
    given = [k for k in STATIC_KEYS if k in collate]
    if given:
        raise TypeError(f"pack takes {', '.join(given)} in static={{...}}, not as a keyword of its own: "
                        f"pack(model, static={{'total_tokens': ..., 'max_seqs': ..., 'max_seqlen': ...}})")
    if static is None:
        return {}
    if not isinstance(static, Mapping):
        raise TypeError(f"static takes a mapping {{'total_tokens': T, 'max_seqs': S, 'max_seqlen': L}}, got "
                        f"{type(static).__name__}")
    if set(static) != set(STATIC_KEYS):
        missing, unknown = sorted(set(STATIC_KEYS) - set(static)), sorted(set(static) - set(STATIC_KEYS))
        raise ValueError(f"static needs exactly total_tokens, max_seqs and max_seqlen"
                         + (f"; missing {missing}" if missing else "") + (f"; unknown {unknown}" if unknown else ""))
    return dict(static)


try:  # a model can be loaded with attn_implementation="packing_varlen" once this module is imported
    import transformers  # noqa: F401
except ImportError:  # the hf extra is not installed: the kwargs still work from a bare name
    pass
else:
    hf_attention.install()
