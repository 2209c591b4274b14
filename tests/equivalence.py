"""The project's core check, shared by the test modules: a batch's per-document logits, loss and
gradients against running each document alone, as relative errors ‖got - ref‖ / ‖ref‖."""

import torch


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach().float(), ref.detach().float()
    return ((got - ref).norm() / ref.norm()).item()


def errors_against(batch, logits, loss, model, ref_logits, ref_loss, ref_grads) -> dict[str, float]:
    """{"logits[i]": ..., "loss": ..., "grad NAME": ...} for every document and every parameter with a reference."""
    errors = {f"logits[{i}]": rel(g, r) for i, (g, r) in enumerate(zip(batch.per_sequence(logits), ref_logits))}
    errors["loss"] = rel(loss, ref_loss)
    errors.update({f"grad {n}": rel(p.grad, ref_grads[n]) for n, p in model.named_parameters() if n in ref_grads})
    return errors


def assert_within(errors: dict[str, float], tol: float) -> None:
    worst = max(errors, key=errors.get)
    assert errors[worst] <= tol, (worst, errors[worst])
