"""bf16 copies of the GEMM weights for the step, fp32 masters for SGD: no weight casts in the step.

Under ``torch.autocast`` every step casts each fp32 ``nn.Linear`` weight to bf16 in the forward, and
casts each bf16 weight gradient back to fp32 in the backward; then SGD reads and writes the fp32
weights. :class:`BF16Weights` makes the model's Linear weights bf16 parameters (autocast's cast of
them is then a no-op), keeps fp32 masters beside them, and in :meth:`step` updates each master from
the bf16 gradient and writes the new bf16 copy, in one pass.

It is the same arithmetic as autocast with fp32 SGD, bit for bit: the forward reads
``bf16(master)`` either way, the GEMM makes the same bf16 gradient, and the master takes the same
fp32 update. Everything that is not a Linear weight (embeddings, LayerNorms, biases) stays fp32 and
goes to the ``SGD`` that :meth:`step` also runs.

Example:
    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    >>> opt = BF16Weights(model, lr=0.1)
    >>> model[0].weight.dtype, model[1].weight.dtype
    (torch.bfloat16, torch.float32)
    >>> with torch.autocast("cpu", dtype=torch.bfloat16):
    ...     loss = model(torch.randn(2, 4)).float().square().sum()
    >>> loss.backward(); opt.step(); opt.zero_grad()
    >>> torch.equal(model[0].weight, opt.masters[0].to(torch.bfloat16))
    True
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
from torch import Tensor


class BF16Weights:
    """SGD (``lr``, no momentum) on fp32 masters of ``model``'s Linear weights, which become bf16;
    with ``optimizer="adamw"``, torch's AdamW on the masters (``fused`` on CUDA) and on the rest,
    each master's gradient the bf16 gradient in fp32, then the new bf16 copy written.

    A benchmark tool (``--bf16-weights``), not library API: it rewrites the model's parameters in
    its constructor and has no ``state_dict``."""

    def __init__(self, model: nn.Module, *, lr: float, dtype: torch.dtype = torch.bfloat16,
                 optimizer: str = "sgd") -> None:
        if optimizer not in ("sgd", "adamw"):
            raise ValueError(f"optimizer is {optimizer!r}; BF16Weights implements 'sgd' and 'adamw'")
        self.lr, self.optimizer = lr, optimizer
        self.copies: list[nn.Parameter] = []
        self.masters: list[Tensor] = []
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.dtype == torch.float32:
                master = module.weight.detach().clone()
                module.weight = nn.Parameter(master.to(dtype))
                self.copies.append(module.weight)
                self.masters.append(master)
        copied = {id(p) for p in self.copies}
        rest = [p for p in model.parameters() if id(p) not in copied]
        self.adamw = None
        if optimizer == "adamw":
            self.masters = [nn.Parameter(m) for m in self.masters]
            fused = bool(self.masters) and self.masters[0].is_cuda
            self.adamw = torch.optim.AdamW(self.masters, lr=lr, fused=fused) if self.masters else None
            self.rest = torch.optim.AdamW(rest, lr=lr, fused=fused) if rest else None
        else:
            self.rest = torch.optim.SGD(rest, lr=lr) if rest else None

    @torch.no_grad()
    def step(self) -> None:
        with_grad = [(c, m) for c, m in zip(self.copies, self.masters) if c.grad is not None]
        if with_grad and self.adamw is not None:
            copies, masters = zip(*with_grad)
            for c, m in with_grad:
                m.grad = c.grad.to(m.dtype)
            self.adamw.step()
            torch._foreach_copy_(list(copies), list(masters))
            for m in masters:
                m.grad = None
        elif with_grad:
            copies, masters = zip(*with_grad)
            update = _compiled_update() if copies[0].is_cuda else _update
            update(list(masters), list(copies), [c.grad for c in copies], self.lr)
        if self.rest is not None:
            self.rest.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for c in self.copies:
            c.grad = None if set_to_none else (c.grad.zero_() if c.grad is not None else None)
        if self.rest is not None:
            self.rest.zero_grad(set_to_none=set_to_none)


@functools.cache
def _compiled_update():
    return torch.compile(_update, dynamic=False)


def _update(masters: list[Tensor], copies: list[Tensor], grads: list[Tensor], lr: float) -> None:
    """master -= lr * float(grad); copy = bf16(master). Compiled on CUDA, Inductor makes this one
    read of grad and master and one write of master and copy per element."""
    for master, copy, grad in zip(masters, copies, grads):
        master.add_(grad.to(master.dtype), alpha=-lr)
        copy.copy_(master)
