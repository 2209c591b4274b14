"""The one chooser of a varlen attention kernel: given what a layer asks for (its options and head
dimension), the first kernel of a :class:`KernelSet` that computes all of it.

Both transformers' ``packing_varlen`` (:mod:`packing.interop.hf_attention`) and the toy GPT's
``flash`` adapter choose through :meth:`KernelSet.choose`, so a layer runs the same kernel whichever
door it came in by. A set is resolved once (:meth:`KernelSet.load`), outside any compiled step, and
choosing is a pure loop over plain tuples: safe while ``torch.compile`` traces a layer.

Examples:
    >>> ref = lambda q, k, v, cu, max_len, causal, **options: v
    >>> kernels = KernelSet([Kernel("windowed", ref, frozenset({"window"}), lambda d: d % 8 == 0),
    ...                      Kernel("plain", ref, frozenset(), lambda d: True)])
    >>> kernels.choose({"window": 4}, head_dim=64).name, kernels.choose({}, head_dim=12).name
    ('windowed', 'plain')
    >>> kernels.choose({"softcap": 30.0}, head_dim=64) is None
    True
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from torch import Tensor

Varlen = Callable[..., Tensor]  # fn(q, k, v, cu_seqlens, max_seqlen, causal, **options) -> out


@dataclass(frozen=True)
class Kernel:
    """One varlen kernel: its name, fn(q (T, H, D), k, v (T, H_kv, D), cu_seqlens (docs + 1,),
    max_seqlen, causal, **options) -> (T, H, D), the keyword options it computes (``scale``,
    ``window``, ``softcap``, ``sinks``) and which head dimensions it computes right."""

    name: str
    run: Varlen
    options: frozenset[str]
    takes_head_dim: Callable[[int], bool]


class KernelSet:
    """Varlen kernels, best first; a layer runs the first that computes everything it asks for."""

    def __init__(self, kernels: Sequence[Kernel]) -> None:
        self.kernels = tuple(kernels)

    @classmethod
    def load(cls, names: Sequence[str] | None = None, *, who: str = "packing_varlen") -> KernelSet:
        """The kernels that load here (:func:`packing.kernels.varlen_kernels`, best first), or those
        of them named in ``names``, in that order. A name that does not load is a ValueError naming
        those that do; a bare string is a TypeError (a list of one name is meant)."""
        import torch

        from packing.kernels import varlen_kernels

        found = varlen_kernels() if torch.cuda.is_available() else {}
        if names is not None:
            if isinstance(names, str):
                raise TypeError(f"kernels takes a sequence of names, got the string {names!r}; write [{names!r}]")
            names = list(names)
            missing = [k for k in names if k not in found]
            if missing or not names:
                raise ValueError(
                    f"{who} kernels={names}: "
                    + (f"{missing} {'does' if len(missing) == 1 else 'do'} not load here" if missing else "names no kernel")
                    + f"; the varlen kernels that load here are {list(found) or 'none (no CUDA)'}: name some of those, "
                    "or leave kernels=None"
                )
            found = {k: found[k] for k in names}
        return cls.of(found)

    @classmethod
    def of(cls, found: Mapping[str, Varlen]) -> KernelSet:
        """A set of loaded kernels by name (:func:`packing.kernels.varlen_kernels`' form), each with
        the options and head dimensions :mod:`packing.kernels` says it computes."""
        from packing.kernels import head_dim_check, varlen_options

        return cls([Kernel(name, run, varlen_options(name), head_dim_check(name)) for name, run in found.items()])

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(k.name for k in self.kernels)

    def choose(self, options: Iterable[str], head_dim: int) -> Kernel | None:
        """The first kernel that computes every option named in ``options`` at ``head_dim``, or None."""
        asked = set(options)
        return next((k for k in self.kernels if asked <= k.options and k.takes_head_dim(head_dim)), None)

    def require(self, options: Mapping[str, Any], head_dim: int, *, who: str, fix: str, asks: str | None = None) -> Kernel:
        """:meth:`choose`, or a ValueError from ``who`` (saying what the layer ``asks``) listing each
        kernel's options and head dimensions, ending with ``fix``."""
        chosen = self.choose(options, head_dim)
        if chosen is not None:
            return chosen
        have = ", ".join(f"{k.name}: {sorted(k.options)}" + ("" if k.takes_head_dim(head_dim) else
                                                            f" (not at head dimension {head_dim})")
                         for k in self.kernels) or "none"
        asked = sorted(options) if options else f"head dimension {head_dim}"
        raise ValueError(f"{who}: no varlen kernel here computes {asked}" + (f" ({asks})" if asks else "")
                         + f"; kernels here and their options: {have}; {fix}")

    def __repr__(self) -> str:
        return f"KernelSet({list(self.names)})"
