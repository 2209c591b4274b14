"""The decoder's MLP, with the exact GELU fused into its GEMMs where quack runs (fusion ``mlp``)."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from models.fusion import half_compute_dtype


class MLP(nn.Sequential):
    """Linear(dim, hidden) -> exact (erf) GELU -> Linear(hidden, dim); (..., dim) -> (..., dim).

    A ``Sequential`` so the parameters keep the names ``0.weight`` ... ``2.bias`` of the plain
    model: checkpoints load either way.

    With ``fused=True`` and a tensor quack can take (:func:`models.fusion.half_compute_dtype`), the
    forward is quack's ``gemm_act`` (the GELU and its bf16 output in the first GEMM's epilogue, the
    pre-activation kept for the backward) and the backward is ``gemm_dact`` (the GELU derivative
    in the epilogue of the GEMM that makes d(postact), which also re-makes postact for the second
    weight's gradient). Otherwise it is the torch path.

    Example:
        >>> import torch
        >>> mlp = MLP(8, 32)
        >>> mlp(torch.randn(5, 8)).shape
        torch.Size([5, 8])
        >>> [name for name, _ in mlp.named_parameters()]
        ['0.weight', '0.bias', '2.weight', '2.bias']
    """

    def __init__(self, dim: int, hidden: int, *, fused: bool = False) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if self.fused and half_compute_dtype(x) is not None:
            return quack_gelu_mlp(x, self[0], self[2])
        return super().forward(x)


def quack_gelu_mlp(x: Tensor, fc1: nn.Linear, fc2: nn.Linear) -> Tensor:
    """fc2(gelu(fc1(x))) through quack's GEMMs with the exact GELU in their epilogues.

    x (..., dim) on a Hopper-or-newer GPU, computed in the autocast dtype (quack casts the fp32
    weights itself, as autocast would); returns (..., dim).
    """
    from quack.linear import act_linear_func, linear_act_func

    # Without autograd (eval) the pre-activation is not stored: one (T, hidden) write less.
    preact, postact = linear_act_func(x, fc1.weight, "gelu_erf", bias=fc1.bias, store_preact=torch.is_grad_enabled())
    return act_linear_func(preact, fc2.weight, postact, "gelu_erf", bias=fc2.bias)
