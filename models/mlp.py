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
    first GEMM is quack's ``gemm_act`` (the GELU and its bf16 output in its epilogue, the
    pre-activation kept for the backward) and the backward's d(postact) GEMM is ``gemm_dact`` (the
    GELU derivative in its epilogue, which also re-makes postact for the second weight's
    gradient); see :class:`_GeluMLP`. Otherwise it is the torch path.

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
    """fc2(gelu(fc1(x))) with the exact GELU in quack GEMM epilogues, the other GEMMs in cuBLAS.

    x (..., dim) on a Hopper-or-newer GPU, computed in the autocast dtype; returns (..., dim).
    """
    dtype = half_compute_dtype(x)
    train = torch.is_grad_enabled() and any(t.requires_grad for t in (x, fc1.weight, fc2.weight))
    out = _GeluMLP.apply(x.reshape(-1, x.shape[-1]), fc1.weight, fc1.bias, fc2.weight, fc2.bias, dtype, train)
    return out.reshape(*x.shape[:-1], out.shape[-1])


class _GeluMLP(torch.autograd.Function):
    """x (M, dim) -> fc2(gelu(fc1(x))) (M, dim), weights cast to ``dtype`` as autocast would.

    Only the two GEMMs that carry the GELU are quack's: ``gemm_act`` (x W1ᵀ + b1, GELU in the
    epilogue, pre-activation stored for the backward) and ``gemm_dact`` (dout W2 times GELU'(preact)
    in the epilogue, which also re-makes postact for W2's gradient). The other four GEMMs stay in
    cuBLAS: each quack launch costs about 0.2 ms of host time (H100 profile,
    benchmarks/results/seed-workload/2026-11-24-h100-speed2), and quack's own MLP, six quack GEMMs a layer, left
    the compiled step host-bound.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, dtype, train):
        from quack.gemm_interface import gemm_act

        x, w1c, w2c = x.to(dtype), w1.to(dtype), w2.to(dtype)
        preact, postact = gemm_act(x, w1c.T, bias=b1, activation="gelu_erf", store_preact=train)
        out = torch.addmm(b2.to(dtype), postact, w2c.T)
        if train:
            ctx.save_for_backward(x, w1c, w2c, preact)
            ctx.dtypes = (w1.dtype, b1.dtype, w2.dtype, b2.dtype)
        return out

    @staticmethod
    def backward(ctx, dout):
        from quack.gemm_interface import gemm_dact

        x, w1c, w2c, preact = ctx.saved_tensors
        dout = dout.to(x.dtype).contiguous()
        dpreact, postact = gemm_dact(dout, w2c, preact, activation="gelu_erf")
        w1_dtype, b1_dtype, w2_dtype, b2_dtype = ctx.dtypes
        dw2 = (dout.T @ postact).to(w2_dtype)
        db2 = dout.sum(0, dtype=b2_dtype)
        dw1 = (dpreact.T @ x).to(w1_dtype)
        db1 = dpreact.sum(0, dtype=b1_dtype)
        dx = dpreact @ w1c
        return dx, dw1, db1, dw2, db2, None, None
