"""The project's core check and the helpers the test modules share: random documents, a collator
with test-friendly options, the toy GPT with given weights, and each document run alone through
the fp32 naive adapter, the ground truth every batch is compared with (relative errors
‖got - ref‖ / ‖ref‖)."""

import torch
import torch.nn.functional as F

from models import GPT, GPTConfig
from packing import get_collator

# The CPU tests' model: small enough that every collator x adapter pair runs in seconds.
CPU_CONFIG = GPTConfig(vocab_size=97, max_len=64, n_layers=2, dim=32, n_heads=4)
CPU_TOL = 1e-5  # fp32 on CPU
GPU_TOL = 2e-2  # bf16 operands on GPU against the fp32 reference


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return ((got - ref).norm() / ref.norm()).item()


def random_docs(lens, vocab_size: int = CPU_CONFIG.vocab_size, seed: int = 0, low: int = 1) -> list[torch.Tensor]:
    """One int64 tensor of ids in [low, vocab_size) per length, seeded."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(low, vocab_size, (n,), generator=g) for n in lens]


def collator(name: str, *, max_len: int = CPU_CONFIG.max_len, **options):
    """``get_collator(name, **options)`` for any name: pad_max gets ``max_len``, and a
    ``pad_to_multiple_of`` goes only to the collators that take it (pad_longest's rounding, or a
    packed row's padding tail), so one set of options serves every collator."""
    if name == "pad_max":
        options.setdefault("max_len", max_len)
    if name in ("pad_max", "nested"):
        options.pop("pad_to_multiple_of", None)
    return get_collator(name, **options)


def model_with(attn: str, weights: dict, config: GPTConfig = CPU_CONFIG, device: str = "cpu", fuse: str = "none") -> GPT:
    model = GPT(config, attn=attn, fuse=fuse).to(device)
    model.load_state_dict(weights)
    return model


def each_alone(weights: dict, samples, causal: bool, config: GPTConfig = CPU_CONFIG, device: str = "cpu"):
    """Ground truth: each document in a batch of its own through the naive fp32 adapter.

    Returns per-document logits (L_i, V), the token-mean loss over all documents, and the gradients.
    """
    model = model_with("naive", weights, config, device)
    logits, total, targets = [], 0.0, 0
    for s in samples:
        b = get_collator("concat")([s]).to(device)
        out = model(b, causal=causal)[0]  # (L, V)
        total = total + F.cross_entropy(out, b.labels[0], ignore_index=b.ignore_index, reduction="sum")
        targets += b.num_targets
        logits.append(out.detach())
    loss = total / targets
    loss.backward()
    return logits, loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def errors_against(batch, logits, loss, model, ref_logits, ref_loss, ref_grads) -> dict[str, float]:
    """{"logits[i]": ..., "loss": ..., "grad NAME": ...} for every document and every parameter with a reference."""
    errors = {f"logits[{i}]": rel(g, r) for i, (g, r) in enumerate(zip(batch.per_sequence(logits), ref_logits))}
    errors["loss"] = rel(loss, ref_loss)
    errors.update({f"grad {n}": rel(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads})
    return errors


def assert_within(errors: dict[str, float], tol: float) -> None:
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (worst, errors[worst])


def assert_compiles_once(step, batches) -> None:
    """Run ``step`` on the first batch from a fresh dynamo state, then on the rest with recompiling
    made an error: a compiled step that specialises on anything that changes per batch fails here."""
    import torch._dynamo

    torch._dynamo.reset()
    step(batches[0])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for batch in batches[1:]:
            step(batch)


def hf_each_alone(model, samples):
    """A transformers model's ground truth: each document alone (no cache, no mask). Returns the
    per-document logits (L_i, V), the token-mean loss over all documents' targets, and the gradients."""
    logits, total, count = [], 0.0, 0
    for s in samples:
        out = model(input_ids=s[None], use_cache=False).logits[0]
        if len(s) > 1:
            total = total + torch.nn.functional.cross_entropy(out[:-1], s[1:], reduction="sum")
            count += len(s) - 1
        logits.append(out.detach())
    loss = total / count
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return logits, loss.detach(), grads
