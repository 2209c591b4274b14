"""The chunked causal-LM loss (issue 24, lever 2): the loss and every gradient of transformers' own,
in fp32 on CPU, without the (T, V) logits; one compiled graph."""

import pytest
import torch
import torch.nn.functional as F

from packing.interop.hf_loss import causal_lm_loss, chunked_lm_loss

transformers = pytest.importorskip("transformers", reason="the hf extra")

# These tests also hold the deprecated entry points (register, HFPackedCollator, hf_kwargs,
# causal_lm_loss) to their behaviour for the one release they remain; tests/packing/test_hf_pack.py
# tests pack(model) and pins the deprecation warnings.
pytestmark = pytest.mark.filterwarnings("ignore:.* is deprecated and will be removed in the next release:FutureWarning")


@pytest.mark.parametrize("chunk", [1, 5, 16, 1000])
def test_loss_and_gradients_equal_the_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(1, 37, 12, requires_grad=True)
    weight = torch.randn(101, 12, requires_grad=True)
    labels = torch.randint(0, 101, (1, 37))
    labels[0, [0, 9, 36]] = -100
    ref = F.cross_entropy((hidden @ weight.T).flatten(0, 1), labels.flatten())
    ref_grads = torch.autograd.grad(ref, (hidden, weight))
    got = chunked_lm_loss(hidden, weight, labels, chunk=chunk)
    grads = torch.autograd.grad(got, (hidden, weight))
    assert torch.allclose(got, ref, rtol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert (g - r).norm() / r.norm() < 1e-5


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"hidden has tokens \(1, 5\) but shift_labels has \(1, 6\)"):
        chunked_lm_loss(torch.randn(1, 5, 4), torch.randn(9, 4), torch.zeros(1, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"chunk is 0; expected >= 1 tokens"):
        chunked_lm_loss(torch.randn(5, 4), torch.randn(9, 4), torch.zeros(5, dtype=torch.long), chunk=0)


def _qwen3(**extra):
    config = transformers.Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                      tie_word_embeddings=True, attn_implementation="packing_varlen", **extra)
    torch.manual_seed(0)
    return transformers.Qwen3ForCausalLM(config)


def test_a_transformers_model_trains_the_same_without_its_logits():
    from packing import get_collator
    from packing.interop.hf import hf_kwargs, register

    register()
    model = _qwen3()
    batch = get_collator("concat")([torch.randint(0, 300, (n,)) for n in (9, 1, 23, 14)])
    kwargs = hf_kwargs(batch, model)
    ref = model(**kwargs).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    got = causal_lm_loss(model, kwargs, chunk=8)
    grads = torch.autograd.grad(got, list(model.parameters()))
    assert torch.allclose(got, ref, rtol=1e-5)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        assert (g - r).norm() / r.norm().clamp(min=1e-12) < 1e-5, name


def test_compiles_into_one_graph_and_refuses_logit_transforms():
    hidden = torch.randn(40, 8, requires_grad=True)
    weight = torch.randn(33, 8, requires_grad=True)
    labels = torch.randint(0, 33, (40,))
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, w, y: chunked_lm_loss(h, w, y, chunk=16), fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            loss = compiled(hidden, weight, labels)
            loss.backward()
    assert torch.allclose(loss, chunked_lm_loss(hidden, weight, labels, chunk=16))
    from packing.interop.hf import hf_kwargs, register
    from packing import get_collator

    register()
    model = _qwen3()
    model.config.final_logit_softcapping = 30.0
    kwargs = hf_kwargs(get_collator("concat")([torch.arange(1, 6)]), model)
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM has final_logit_softcapping=30.0, which the chunked loss "
                                         r"does not apply after the LM head"):
        causal_lm_loss(model, kwargs)


def _same_loss_and_grads(model, kwargs):
    ref = model(**kwargs).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    got = causal_lm_loss(model, kwargs, chunk=8)
    grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    assert torch.allclose(got, ref, rtol=1e-5), (got.item(), ref.item())
    scale = max(r.norm() for r in ref_grads if r is not None)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        if r is not None:
            assert (g - r).norm() / torch.maximum(r.norm(), 1e-3 * scale) < 1e-5, name


def test_a_head_with_a_bias_and_a_router_loss_are_the_models_own():
    # A head's bias (Phi) and the mixture-of-experts router's load-balancing loss (Mixtral with
    # output_router_logits: 5.18 against the model's 4.17 when the loss dropped it) are computed.
    from packing import get_collator
    from packing.interop.hf import hf_kwargs, register

    register()
    docs = [torch.randint(1, 97, (n,)) for n in (9, 23, 14)]
    phi = transformers.PhiConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                 num_attention_heads=4, attn_implementation="packing_varlen")
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(phi)
    assert model.lm_head.bias is not None
    _same_loss_and_grads(model, hf_kwargs(get_collator("concat")(docs), model))
    mixtral = transformers.MixtralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                         num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5,
                                         attn_implementation="packing_varlen")
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(mixtral)
    kwargs = hf_kwargs(get_collator("concat")(docs), model)
    assert model(**kwargs).aux_loss > 0
    _same_loss_and_grads(model, kwargs)


def test_a_head_that_is_not_linear_is_refused_by_name():
    from packing import get_collator
    from packing.interop.hf import hf_kwargs, register

    class ScaledHead(torch.nn.Linear):  # a subclass may compute anything: not the plain head
        def forward(self, x):
            return 2 * super().forward(x)

    register()
    model = _qwen3()
    model.lm_head = ScaledHead(64, 300, bias=False)
    kwargs = hf_kwargs(get_collator("concat")([torch.arange(1, 6)]), model)
    with pytest.raises(ValueError, match=r"Qwen3ForCausalLM's LM head is a ScaledHead, not a torch.nn.Linear"):
        causal_lm_loss(model, kwargs)
