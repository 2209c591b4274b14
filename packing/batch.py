"""The one batch type every collator returns and every attention adapter consumes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor

from packing.boundaries import block_lengths, cumulative_lengths, packed_positions, static_boundaries
from packing.sample import IGNORE_INDEX, Sample

LAYOUTS = ("padded", "nested", "packed")


@dataclass(frozen=True, eq=False, kw_only=True)
class Batch:
    """A batch of variable-length sequences in one of three layouts.

    Worked example: three sequences of token ids ``[11, 12]``, ``[21, 22, 23]``, ``[31, 32]``
    (lengths 2, 3, 2). Each position's label is the next token of its own sequence; the last
    position of a sequence has none and holds the ignore index -100, so no label ever points
    across a document boundary.

    ``layout="packed"`` (``ConcatCuSeqlens``), one row of T = 7 tokens::

        input_ids    [[11, 12,   21, 22, 23,   31, 32]]        (1, T)
        labels       [[12, -100, 22, 23, -100, 32, -100]]      (1, T)
        position_ids [[0, 1,     0, 1, 2,      0, 1]]          (1, T), restart per sequence
        cu_seqlens   [0, 2, 5, 7]                              (num_seqs + 1,) int32
        max_seqlen 3, num_tokens 7, num_slots 7, num_targets 4

    With ``pad_to_multiple_of=4`` the row grows to T = 8: the extra slot holds the pad id, label
    -100 and position 0, and lies past ``cu_seqlens[-1]`` so no sequence attends to it.

    Static shapes (``ConcatCuSeqlens(total_tokens=8, max_seqs=4, max_seqlen=3)``) add what a varlen
    kernel needs to see the same shapes every step::

        static_cu_seqlens [0, 2, 5, 7, 8, 8, 8, 8]   (max_seqs + ceil(T / max_seqlen) + 1,) int32
        static_max_seqlen 3

    The padding slot is a block of its own and the trailing entries are empty sequences.

    ``layout="padded"`` (``PadToLongest(pad_to_multiple_of=4)``), B = 3 rows of L = 4::

        input_ids      [[11, 12, 0, 0], [21, 22, 23, 0], [31, 32, 0, 0]]          (B, L)
        labels         [[12, -100, -100, -100], [22, 23, -100, -100], [32, -100, -100, -100]]
        position_ids   [[0, 1, 0, 0], [0, 1, 2, 0], [0, 1, 0, 0]]
        attention_mask [[T, T, F, F], [T, T, T, F], [T, T, F, F]]                 (B, L) bool key mask
        cu_seqlens [0, 2, 5, 7], max_seqlen 3, num_tokens 7, num_slots 12

    ``layout="nested"`` (``NestedJagged``): ``input_ids``, ``labels`` and ``position_ids`` are
    jagged NestedTensors of shape (B, j) sharing one offsets tensor ``[0, 2, 5, 7]``, built with
    ``min_seqlen``/``max_seqlen`` so nothing later has to read them back from the device.
    num_slots equals num_tokens: nothing is padded.

    Fields:
        layout: "padded", "nested" or "packed".
        input_ids: int64 token ids in the layout's shape; padding holds the collator's pad id.
        labels: int64 next-token targets, same shape; padding holds ``ignore_index``.
        position_ids: int64 positions, same shape, restarting at 0 for each sequence.
        seq_lens: host-side Python ints, one per sequence, each >= 1.
        cu_seqlens: (num_seqs + 1,) int32 cumulative lengths starting at 0. In the packed layout,
            slots past ``cu_seqlens[-1]`` are padding.
        attention_mask: (B, L) bool key mask, True at real tokens; padded layout only.
        attn_bias: the xFormers ``BlockDiagonalMask`` (``XformersBlockDiagonal`` only). When the row
            is padded, the padding tail is one extra block of its own, so real tokens never see it.
        static_cu_seqlens: packed layout only, optional: (S,) int32 boundaries of a fixed length S
            for every batch of a static-shape run (see :func:`static_boundaries`). Its first
            num_seqs + 1 entries are ``cu_seqlens``; the padding tail follows as blocks of at most
            ``static_max_seqlen`` slots, then empty sequences up to ``num_slots``.
        static_max_seqlen: host int, a fixed bound >= ``max_seqlen`` that goes to the kernel with
            ``static_cu_seqlens``, so a compiled step sees the same constant every batch.
        ignore_index: the label value that contributes no loss.
        num_targets: host int, labels that are not ``ignore_index``: the loss denominator.
        max_token_id: host int, the largest id in ``input_ids`` and ``labels``, so a model can check
            its vocabulary without a device sync.
        context: packed layout only, optional: a :class:`packing.context.shard.ContextShard` when
            this batch is one context-parallel rank's part of a row (:func:`packing.context.shard`).
            Its sequences are then the rank's chunks, its positions the whole row's, and only an
            attention that reads ``context`` may run it; the loss divides by ``context.num_targets``.

    Derived at construction: ``num_tokens`` (real tokens), ``num_slots`` (positions the model
    computes, padding included) and ``max_seqlen`` (a host int, never ``.item()`` on a device).

    Invariants are checked at construction and a violation raises ``ValueError`` naming the field.
    Value checks that read tensor contents run only for CPU tensors, because on a GPU they would
    force a device-to-host sync; ``.to(device)`` keeps the host fields of a checked CPU batch.
    """

    layout: str
    input_ids: Tensor
    labels: Tensor
    position_ids: Tensor
    seq_lens: tuple[int, ...]
    cu_seqlens: Tensor
    attention_mask: Tensor | None = None
    attn_bias: Any = None
    static_cu_seqlens: Tensor | None = None
    static_max_seqlen: int | None = None
    ignore_index: int = IGNORE_INDEX
    num_targets: int | None = None
    max_token_id: int | None = None
    context: Any = None
    num_tokens: int = field(init=False)
    num_slots: int = field(init=False)
    max_seqlen: int = field(init=False)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"Batch.layout is {self.layout!r}; expected one of {LAYOUTS}")
        seq_lens = tuple(int(n) for n in self.seq_lens)
        if not seq_lens:
            raise ValueError("Batch.seq_lens is empty; a batch holds at least one sequence")
        if min(seq_lens) < 1:
            i = min(range(len(seq_lens)), key=seq_lens.__getitem__)
            raise ValueError(f"Batch.seq_lens[{i}] is {seq_lens[i]}; every sequence has >= 1 token")
        self._set("seq_lens", seq_lens)
        self._set("num_tokens", sum(seq_lens))
        self._set("max_seqlen", max(seq_lens))
        self._set("num_slots", self._check_shapes())
        if self.input_ids.device.type == "cpu":
            self._check_values()
        elif self.num_targets is None or self.max_token_id is None:
            raise ValueError(
                f"Batch on {self.input_ids.device} needs num_targets and max_token_id given; "
                "computing them from device tensors would sync. Build the batch on the CPU, then .to()"
            )

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)  # frozen dataclass: only __post_init__ writes

    def _check_shapes(self) -> int:
        """Check dtypes and shapes; return num_slots."""
        n = len(self.seq_lens)
        cu = self.cu_seqlens
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or tuple(cu.shape) != (n + 1,):
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(f"Batch.cu_seqlens is {got}; expected int32 of shape ({n + 1},)")
        for name in ("input_ids", "labels", "position_ids"):
            t = getattr(self, name)
            if not isinstance(t, Tensor) or t.dtype != torch.int64:
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"Batch.{name} is {got}; expected an int64 tensor")
            if t.is_nested != (self.layout == "nested"):
                raise ValueError(
                    f"Batch.{name}.is_nested is {t.is_nested} but layout is {self.layout!r}; "
                    "only the nested layout holds NestedTensors"
                )
        if self.attention_mask is not None and self.layout != "padded":
            raise ValueError(f"Batch.attention_mask is set for layout {self.layout!r}; only 'padded' has one")
        if self.context is not None and self.layout != "packed":
            raise ValueError(f"Batch.context is set for layout {self.layout!r}; only 'packed' has one")
        if self.attn_bias is not None and self.layout != "packed":
            raise ValueError(f"Batch.attn_bias is set for layout {self.layout!r}; only 'packed' has one")

        self._check_static_shapes()
        if self.layout == "nested":
            for name in ("input_ids", "labels", "position_ids"):
                t = getattr(self, name)
                if t.layout != torch.jagged or t.dim() != 2 or t.size(0) != n:
                    raise ValueError(
                        f"Batch.{name} is a {t.layout} NestedTensor with {t.size(0)} rows; "
                        f"expected jagged (num_seqs={n}, j)"
                    )
            return self.num_tokens

        shape = tuple(self.input_ids.shape)
        for name in ("labels", "position_ids"):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"Batch.{name} has shape {tuple(getattr(self, name).shape)}; expected {shape} like input_ids"
                )
        if self.layout == "packed":
            if len(shape) != 2 or shape[0] != 1 or shape[1] < self.num_tokens:
                raise ValueError(
                    f"Batch.input_ids has shape {shape}; the packed layout is one row (1, T) "
                    f"with T >= num_tokens = {self.num_tokens}"
                )
            return shape[1]
        if len(shape) != 2 or shape[0] != n or shape[1] < self.max_seqlen:
            raise ValueError(
                f"Batch.input_ids has shape {shape}; the padded layout is (num_seqs={n}, L) "
                f"with L >= max_seqlen = {self.max_seqlen}"
            )
        mask = self.attention_mask
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != shape:
            got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else mask
            raise ValueError(f"Batch.attention_mask is {got}; the padded layout needs a bool mask of shape {shape}")
        return shape[0] * shape[1]

    def _check_static_shapes(self) -> None:
        cu, bound = self.static_cu_seqlens, self.static_max_seqlen
        if cu is None and bound is None:
            return
        if self.layout != "packed":
            raise ValueError(f"Batch.static_cu_seqlens is set for layout {self.layout!r}; only 'packed' has one")
        if cu is None or bound is None:
            raise ValueError("Batch.static_cu_seqlens and static_max_seqlen go together; set both or neither")
        n = len(self.seq_lens)
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.shape[0] < n + 1:
            got = f"{cu.dtype} {tuple(cu.shape)}" if isinstance(cu, Tensor) else type(cu).__name__
            raise ValueError(f"Batch.static_cu_seqlens is {got}; expected int32 of shape (S,) with S >= {n + 1}")
        if not isinstance(bound, int) or bound < self.max_seqlen:
            raise ValueError(f"Batch.static_max_seqlen is {bound!r}; expected an int >= max_seqlen {self.max_seqlen}")

    def _check_values(self) -> None:
        """Check tensor contents (CPU only) and fill in num_targets and max_token_id.

        Cheap enough to run on every batch: a fraction of the collation's own time.
        """
        expected_cu = cumulative_lengths(self.seq_lens)
        if not torch.equal(self.cu_seqlens, expected_cu):
            raise ValueError(
                f"Batch.cu_seqlens is {self.cu_seqlens.tolist()}; expected {expected_cu.tolist()} "
                f"from seq_lens {list(self.seq_lens)}"
            )
        if self.layout == "nested":
            offsets = self.input_ids.offsets()
            for name in ("labels", "position_ids"):
                if not torch.equal(getattr(self, name).offsets(), offsets):
                    raise ValueError(f"Batch.{name} offsets differ from input_ids offsets")
            if not torch.equal(offsets.to(torch.int32), expected_cu):
                raise ValueError(f"Batch.input_ids offsets are {offsets.tolist()}; expected {expected_cu.tolist()}")
        if self.layout == "padded":
            L = self.input_ids.shape[1]
            expected_mask = torch.arange(L) < torch.tensor(self.seq_lens)[:, None]
            if not torch.equal(self.attention_mask, expected_mask):
                raise ValueError(
                    "Batch.attention_mask does not match seq_lens; expected right padding with "
                    "True at the first seq_lens[b] positions of row b"
                )

        ids, labels, positions = (self.real(self.unwrap(t)) for t in (self.input_ids, self.labels, self.position_ids))
        expected = packed_positions(self.seq_lens) if self.context is None else self.context.positions()
        if not torch.equal(positions, expected):
            raise ValueError("Batch.position_ids must restart at 0 for each sequence and count up by 1"
                             + ("" if self.context is None else ", as in the whole row (a context-parallel shard)"))
        if ids.numel() and int(self._all(self.input_ids).min()) < 0:
            raise ValueError(f"Batch.input_ids has min {int(self._all(self.input_ids).min())}; ids must be >= 0")
        bad = (labels < 0) & (labels != self.ignore_index)
        if bool(bad.any()):
            raise ValueError(
                f"Batch.labels holds {int(labels[bad][0])}; labels are >= 0 or ignore_index {self.ignore_index}"
            )
        pad_labels = self._padding(self.labels)
        if pad_labels is not None and bool((pad_labels != self.ignore_index).any()):
            raise ValueError(f"Batch.labels at padding must be ignore_index {self.ignore_index}")

        num_targets = int((labels != self.ignore_index).sum())
        max_token_id = max(int(self._all(self.input_ids).max()), int(labels.max()))
        for name, value in (("num_targets", num_targets), ("max_token_id", max_token_id)):
            given = getattr(self, name)
            if given is not None and given != value:
                raise ValueError(f"Batch.{name} is {given}; the tensors say {value}")
            self._set(name, value)
        if self.static_cu_seqlens is not None:
            expected_static = static_boundaries(
                self.seq_lens, self.num_slots, self.static_cu_seqlens.shape[0], self.static_max_seqlen
            )
            if not torch.equal(self.static_cu_seqlens, expected_static):
                raise ValueError(
                    f"Batch.static_cu_seqlens is {self.static_cu_seqlens.tolist()}; expected "
                    f"{expected_static.tolist()} (the sequences, the padding tail in blocks of at most "
                    f"static_max_seqlen {self.static_max_seqlen}, then empty sequences)"
                )
        if self.attn_bias is not None:
            starts_py = list(self.attn_bias.q_seqinfo.seqstart_py)
            expected = cumulative_lengths(block_lengths(self.seq_lens, self.num_slots)).tolist()
            if starts_py != expected:
                raise ValueError(
                    f"Batch.attn_bias has block starts {starts_py}; expected {expected} "
                    "(the sequences, then one block for the padding tail if any)"
                )

    def _all(self, t: Tensor) -> Tensor:
        return t.values() if t.is_nested else t

    def real(self, x: Tensor) -> Tensor:
        """(num_tokens, ...) the rows of a token-form tensor (see :meth:`unwrap`) at real positions,
        in sequence order: the packed row's first ``num_tokens``, the padded rows' masked positions,
        or the nested values as they are.

        Examples:
            >>> from packing import get_collator
            >>> b = get_collator("pad_longest", pad_to_multiple_of=4)([[5, 6, 7], [8]])
            >>> b.real(b.unwrap(b.input_ids)).tolist()
            [5, 6, 7, 8]
        """
        if self.layout == "nested":
            return x
        if self.layout == "packed":
            return x[: self.num_tokens]
        return x[self.attention_mask]

    def _padding(self, t: Tensor) -> Tensor | None:
        if self.layout == "nested":
            return None
        if self.layout == "packed":
            return t[0, self.num_tokens :]
        return t[~self.attention_mask]

    @property
    def padding_fraction(self) -> float:
        """Share of computed positions that are padding: 1 - num_tokens / num_slots."""
        return 1.0 - self.num_tokens / self.num_slots

    def per_sequence(self, x: Tensor) -> list[Tensor]:
        """Split a tensor in this batch's layout into one (L_i, ...) tensor per sequence.

        ``x`` is ``input_ids``, ``labels`` or any model output in the same layout, such as logits
        of shape (B, L, V), (1, T, V) or a jagged (B, j, V). Padding is dropped.
        """
        if self.layout == "nested":
            return list(x.values().split(self.seq_lens))
        if self.layout == "packed":
            return list(x[0, : self.num_tokens].split(self.seq_lens))
        return [x[b, :n] for b, n in enumerate(self.seq_lens)]

    def unwrap(self, x: Tensor) -> Tensor:
        """The dense token form a model computes on, for a tensor in this batch's layout.

        padded (B, L, ...) stays as it is; packed (1, T, ...) becomes (T, ...); nested (B, j, ...)
        becomes its values (N, ...). Per-token layers (embeddings, Linear, LayerNorm, the loss) run
        on this form, and only attention needs the sequence boundaries.
        """
        if self.layout == "nested":
            return x.values()
        if self.layout == "packed":
            return x[0]
        return x

    def wrap(self, x: Tensor) -> Tensor:
        """The inverse of :meth:`unwrap`: a dense token-form tensor back in this batch's layout."""
        if self.layout == "nested":
            return torch.nested.nested_tensor_from_jagged(
                x, self.input_ids.offsets(), min_seqlen=min(self.seq_lens), max_seqlen=self.max_seqlen
            )
        if self.layout == "packed":
            return x[None]
        return x

    def split(self) -> list[Sample]:
        """The inverse of collation: one :class:`Sample` per sequence, padding removed."""
        return [Sample(i, l) for i, l in zip(self.per_sequence(self.input_ids), self.per_sequence(self.labels))]

    def _map(self, fn: Callable[[Tensor], Tensor], bias_fn: Callable[[Any], Any] | None = None) -> Batch:
        """A new Batch with ``fn`` applied to every tensor; NestedTensors keep one shared offsets."""
        changes: dict[str, Any] = {"cu_seqlens": fn(self.cu_seqlens)}
        if self.static_cu_seqlens is not None:
            changes["static_cu_seqlens"] = fn(self.static_cu_seqlens)
        if self.layout == "nested":
            offsets = fn(self.input_ids.offsets())
            for name in ("input_ids", "labels", "position_ids"):
                changes[name] = torch.nested.nested_tensor_from_jagged(
                    fn(getattr(self, name).values()),
                    offsets,
                    min_seqlen=min(self.seq_lens),
                    max_seqlen=self.max_seqlen,
                )
        else:
            for name in ("input_ids", "labels", "position_ids"):
                changes[name] = fn(getattr(self, name))
        if self.attention_mask is not None:
            changes["attention_mask"] = fn(self.attention_mask)
        if self.attn_bias is not None and bias_fn is not None:
            changes["attn_bias"] = bias_fn(self.attn_bias)
        if self.context is not None:
            changes["context"] = self.context.map(fn)
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """Move every tensor, the xFormers bias included, to ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking), lambda b: b.to(device))

    def pin_memory(self) -> Batch:
        """Pin every tensor so ``.to("cuda", non_blocking=True)`` overlaps with compute.

        ``DataLoader(pin_memory=True)`` calls this on custom batch types. The xFormers bias is left
        as it is: it holds (num_seqs + 1) ints, too few for pinning to matter.
        """
        return self._map(lambda t: t.pin_memory())
