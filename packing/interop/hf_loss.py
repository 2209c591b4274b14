"""A causal-LM loss that never holds the (tokens, vocabulary) logits: the LM head and the
cross-entropy computed a chunk of tokens at a time, for large vocabularies (Qwen3's 151,936).

transformers' ``ForCausalLM`` loss upcasts the whole (T, V) logits to fp32: at T = 16,384 and
V = 151,936 that is 10 GB, plus the bf16 logits and their gradient. :func:`chunked_lm_loss` takes
the final hidden states instead, and for each chunk of ``chunk`` tokens computes the logits, the
summed cross-entropy, and right away the chunk's gradients for the hidden states and the head
weight (the way Liger Kernel's fused linear cross-entropy does), so one chunk's logits are alive at
a time. It is a ``torch.autograd.Function`` of plain torch ops with a fixed number of chunks per
shape, so ``torch.compile`` traces it into the model's graph.

Targets are ``shift_labels`` (the next token at each position, -100 where there is none), the
convention of the kwargs of :func:`packing.interop.hf.pack`; the loss is their sum over real targets divided
by ``normalizer`` (default: their count), as transformers' loss with ``num_items_in_batch``.

Examples:
    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> hidden, weight = torch.randn(7, 8), torch.randn(50, 8)
    >>> labels = torch.tensor([3, 9, -100, 4, 4, 1, -100])
    >>> ref = torch.nn.functional.cross_entropy(hidden @ weight.T, labels)
    >>> bool(torch.allclose(chunked_lm_loss(hidden, weight, labels, chunk=3), ref))
    True
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

from packing.sample import IGNORE_INDEX


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """hidden (T, d), weight (V, d), labels (T,) -> the summed cross-entropy over real labels (fp32
    scalar); gradients for hidden and weight made in the forward, a chunk at a time."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, chunk: int,
                ignore_index: int) -> Tensor:
        total = hidden.new_zeros((), dtype=torch.float32)
        need = ctx.needs_input_grad
        d_hidden = torch.empty_like(hidden) if need[0] else None
        d_weight = torch.zeros_like(weight, dtype=torch.float32) if need[1] else None
        d_bias = torch.zeros_like(bias, dtype=torch.float32) if bias is not None and need[2] else None
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk], labels[start:start + chunk]
            logits = h @ weight.T
            logits = (logits if bias is None else logits + bias).float()  # (c, V): the only logits alive
            valid = y != ignore_index
            target = torch.where(valid, y, 0)
            lse = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target[:, None]).squeeze(1)
            total = total + torch.where(valid, lse - picked, 0.0).sum()
            if d_hidden is None and d_weight is None and d_bias is None:
                continue
            # d(sum CE)/d logits = softmax - onehot(target), zero on ignored rows.
            grad = torch.exp(logits - lse[:, None])
            grad.scatter_add_(1, target[:, None], torch.full_like(picked[:, None], -1.0))
            grad = (grad * valid[:, None]).to(hidden.dtype)
            if d_hidden is not None:
                d_hidden[start:start + chunk] = grad @ weight.to(hidden.dtype)
            if d_weight is not None:
                d_weight += (grad.T @ h).float()
            if d_bias is not None:
                d_bias += grad.float().sum(0)
        ctx.save_for_backward(*(t for t in (d_hidden, d_weight, d_bias) if t is not None))
        ctx.has = (d_hidden is not None, d_weight is not None, d_bias is not None)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        saved = iter(ctx.saved_tensors)
        d_hidden = (next(saved) * grad_total).to(ctx.dtypes[0]) if ctx.has[0] else None
        d_weight = (next(saved) * grad_total).to(ctx.dtypes[1]) if ctx.has[1] else None
        d_bias = (next(saved) * grad_total).to(ctx.dtypes[2]) if ctx.has[2] else None
        return d_hidden, d_weight, d_bias, None, None, None


def chunked_lm_loss(hidden: Tensor, weight: Tensor, shift_labels: Tensor, *, bias: Tensor | None = None,
                    chunk: int = 4096, normalizer: int | Tensor | None = None,
                    ignore_index: int = IGNORE_INDEX) -> Tensor:
    """The causal-LM loss from final hidden states, never materialising the full logits.

    hidden: (..., T, d) the model's last hidden state (before the LM head); weight: (V, d) the LM
    head's weight (tied or not); shift_labels: (..., T) next-token targets, ``ignore_index`` where
    none; bias: (V,) the LM head's bias, if it has one. ``chunk`` tokens' logits exist at a time. Returns sum(CE over real targets) / normalizer
    (default: the count of real targets, at least 1). Under ``torch.autocast`` the head GEMMs run in
    the autocast dtype and the softmax in fp32, as transformers' own loss does.
    """
    if hidden.shape[:-1] != shift_labels.shape:
        raise ValueError(f"hidden has tokens {tuple(hidden.shape[:-1])} but shift_labels has {tuple(shift_labels.shape)}; "
                         "pass the model's last hidden state and the batch's shift_labels")
    if chunk < 1:
        raise ValueError(f"chunk is {chunk}; expected >= 1 tokens")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = shift_labels.reshape(-1)
    if torch.is_autocast_enabled(hidden.device.type):
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        total = _ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, chunk, ignore_index)
    if normalizer is None:
        normalizer = (labels != ignore_index).sum().clamp(min=1)
    return total / normalizer



# Config fields that change the logits after the LM head: the chunked loss does not apply them, so a
# model that sets them is refused rather than trained on other logits.
_LOGIT_FIELDS = {"final_logit_softcapping": None, "logit_softcapping": None, "logits_scaling": 1.0, "logit_scale": 1.0,
                 "output_multiplier_scale": None}


def causal_lm_loss(model, kwargs: dict, *, chunk: int = 4096, normalizer: int | Tensor | None = None) -> Tensor:
    """Deprecated: ``packing.interop.hf.pack(model).loss(kwargs)``. Removed in the next release."""
    import warnings

    warnings.warn("packing.interop.hf_loss.causal_lm_loss is deprecated and will be removed in the next release: "
                  "use packing.interop.hf.pack(model).loss(kwargs)", FutureWarning, stacklevel=2)
    return checked_loss(model, kwargs, chunk=chunk, normalizer=normalizer)


def checked_loss(model, kwargs: dict, *, chunk: int = 4096, normalizer: int | Tensor | None = None) -> Tensor:
    """The loss of a transformers causal LM on packed kwargs (``pack(model)``'s), through
    :func:`chunked_lm_loss`: the base model's last hidden state, then the LM head (its weight and
    bias) and cross-entropy a chunk at a time, plus the router's load-balancing loss where the model
    adds it (``output_router_logits``). Equal to ``model(**kwargs).loss`` without the (T, V) logits.

    What it computes is checked, not assumed: at the first call for a config, a reduced copy of it
    (:func:`packing.interop.verify.verify_loss`) must give ``model(**kwargs).loss`` within 1e-5 in
    fp32, or the config is refused with the difference measured. A config that transforms the logits
    after the head (a final softcap, a logit scale) or a head that is not a ``torch.nn.Linear`` is
    refused by name.
    """
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    for field, neutral in _LOGIT_FIELDS.items():
        value = getattr(config, field, neutral)
        if value is not None and value != neutral:
            raise ValueError(f"{type(model).__name__} has {field}={value!r}, which the chunked loss does not apply after "
                             "the LM head; use model(**kwargs).loss for this model")
    if not torch.compiler.is_compiling():  # checked at the eager first call; a compiled loss is not re-measured
        _check_loss(model, kwargs)
    return _loss(model, kwargs, chunk=chunk, normalizer=normalizer)


def _router(model, kwargs: dict) -> bool:
    flag = kwargs.get("output_router_logits")
    if flag is None:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        flag = getattr(config, "output_router_logits", None) or getattr(model.config, "output_router_logits", None)
    return bool(flag)


def _loss(model, kwargs: dict, *, chunk: int = 4096, normalizer: int | Tensor | None = None) -> Tensor:
    """The loss itself (module docstring of :func:`causal_lm_loss`), unchecked."""
    if "shift_labels" not in kwargs:
        raise ValueError("the chunked loss needs kwargs with shift_labels (pack(model) makes them)")
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        raise ValueError(f"{type(model).__name__}'s LM head is a {type(head).__name__}, not a torch.nn.Linear; the chunked "
                         "loss computes a linear head only: use model(**kwargs).loss for this model")
    inputs = {k: v for k, v in kwargs.items() if k not in ("labels", "shift_labels")}
    router = _router(model, kwargs)
    if router:
        inputs["output_router_logits"] = True
    out = model.base_model(**inputs)
    if normalizer is None:  # the step's count where the kwargs carry one (a context-parallel shard's: the row's)
        normalizer = kwargs.get("num_items_in_batch")
    loss = chunked_lm_loss(out.last_hidden_state, head.weight, kwargs["shift_labels"], bias=head.bias, chunk=chunk,
                           normalizer=normalizer)
    if router:
        # The router's load-balancing loss, as the model's forward adds it: its module's own function
        # over the routers' logits, scaled by the model's coefficient.
        balance = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
        fields = [getattr(model, k, None) for k in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef")]
        if balance is None or None in fields or getattr(out, "router_logits", None) is None:
            raise ValueError(f"{type(model).__name__} with output_router_logits=True adds a router loss the chunked loss "
                             "does not know how to compute; use model(**kwargs).loss, or set output_router_logits=False")
        aux = balance(out.router_logits, fields[0], fields[1], inputs.get("attention_mask"))
        loss = loss + fields[2] * aux.to(loss.device)
    return loss


_loss_checked: dict[tuple[int, bool], object] = {}  # (id(config), router) -> config, kept so no id is reused


def _check_loss(model, kwargs: dict) -> None:
    key = (id(model.config), _router(model, kwargs))
    if key in _loss_checked:
        return
    from packing.interop.hf_families import verify_loss

    verdict = verify_loss(model.config, _loss, router=key[1])
    if not verdict.exact:
        raise ValueError(f"causal_lm_loss is not {type(model).__name__}'s own loss for this config: {verdict.status} "
                         "(measured on a reduced copy of it); use model(**kwargs).loss for this model")
    _loss_checked[key] = model.config
