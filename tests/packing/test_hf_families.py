"""Every transformers causal-LM family: packed rows exact, or refused by name; never silently wrong.

The family matrix (benchmarks.hf_families) runs here in full: every family's tiny random model,
one packed row against each document alone through eager, for packing_varlen, sdpa and eager. The
verdicts check_model enforces must equal it: the committed table on the release it names, the
family measured at first use on any other, so a family whose packed rows drift from its documents
alone is refused instead of training wrong, and a new transformers release turns nothing red.
"""

import re
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

# These tests also hold the deprecated entry points (register, HFPackedCollator, hf_kwargs,
# causal_lm_loss) to their behaviour for the one release they remain; tests/packing/test_hf_pack.py
# tests pack(model) and pins the deprecation warnings.
pytestmark = pytest.mark.filterwarnings("ignore:.* is deprecated and will be removed in the next release:FutureWarning")

from benchmarks import hf_families  # noqa: E402
from equivalence import hf_each_alone, rel  # noqa: E402
from packing.interop import hf_attention  # noqa: E402
from packing.interop.hf_attention import LayerOptions, register  # noqa: E402
from packing.kernels.choice import Kernel, KernelSet  # noqa: E402
from packing import get_collator  # noqa: E402
from packing.boundaries import block_causal_mask, cumulative_lengths  # noqa: E402
from packing.interop.hf import HFPackedCollator, check_model, hf_kwargs  # noqa: E402
from packing.interop import hf_families as hf_families_module  # noqa: E402
from packing.interop.hf_families import family_table  # noqa: E402
from packing.interop.verify import verify_config  # noqa: E402
from packing.interop.hf_verify import measured  # noqa: E402

TOL = 1e-5


@pytest.fixture(scope="module")
def matrix():
    # hf_verify.measured is the measurement check_model falls back on, cached per process: on a release
    # other than the committed table's, the checks below then reuse it instead of measuring twice.
    transformers.logging.set_verbosity_error()
    return {f: {impl: measured(f, impl) for impl in hf_families.IMPLEMENTATIONS} for f in hf_families.families()}


def exact(verdicts):
    # Exact or not is the verdict; a refusal's wording (an error's text, a rounded error) may vary.
    return {impl: v == "exact" for impl, v in verdicts.items()}


def test_the_committed_matrix_is_what_this_release_measures_or_the_difference_is_reported(matrix):
    # The matrix documents the families; check_model verifies the user's own config instead. On
    # the release the committed table names, it must be what the matrix measures now; on another
    # release (CI takes the newest) the differences are reported, never a failure.
    assert set(matrix) == set(hf_families.families())  # every causal LM the installed transformers knows
    committed = family_table()
    changed = {f: (committed["families"].get(f), matrix[f]) for f in matrix
               if exact(committed["families"].get(f, {})) != exact(matrix[f])}
    if committed["transformers"] == transformers.__version__:
        assert not changed, f"re-run python -m benchmarks.hf_families --write: {changed}"
    elif changed:
        warnings.warn(f"transformers {transformers.__version__} against the matrix of {committed['transformers']}: "
                      f"{len(changed)} families changed ({sorted(changed)}); python -m benchmarks.hf_families --write")


def test_check_model_verifies_the_config_it_is_given_not_the_table(monkeypatch):
    # A table that calls bart exact and lacks llama decides nothing: bart's config is verified
    # and refused, llama's verified and accepted. No warning: nothing is guessed.
    stale = {"transformers": transformers.__version__,
             "families": {"bart": {"packing_varlen": "exact", "sdpa": "exact", "eager": "exact"}}}
    monkeypatch.setattr(hf_families_module, "family_table", lambda: stale)
    with pytest.raises(ValueError, match=r"model_type 'bart' is refused on packed rows with 'sdpa': packed logits "
                                         r"[\d.]+% off each document alone \(verified on a reduced copy of this config, "
                                         r"transformers " + re.escape(transformers.__version__) + r"\); train it unpacked"):
        check_model(hf_families.tiny_config("bart"), "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_model(transformers.LlamaConfig(attn_implementation="sdpa")) == "sdpa"


def test_enough_families_and_the_must_list_are_exact(matrix):
    exact = [f for f, v in matrix.items() if v["packing_varlen"] == "exact"]
    assert len(exact) >= 40
    assert {f: matrix[f]["packing_varlen"] for f in hf_families.MUST if matrix[f]["packing_varlen"] != "exact"} == {}


@pytest.mark.parametrize("implementation", hf_families.IMPLEMENTATIONS)
def test_no_silent_mismatch(implementation):
    # Zero silent mismatches: check_model lets a family's config through exactly when its verified
    # copy is exact, and otherwise refuses it by name with the reason measured.
    for family in hf_families.families():
        try:
            config = transformers.CONFIG_MAPPING[family]()
        except Exception:  # noqa: BLE001 - no config of this family can be made without arguments
            continue
        config._attn_implementation = implementation
        verdict = verify_config(config, implementation)
        try:
            check_model(config, implementation)
        except ValueError as e:  # refused: by a config field it names, or by the verdict measured
            assert str(e).startswith("config ") or (
                not verdict.exact and str(e).startswith(f"model_type '{config.model_type}' is refused on packed rows "
                                                        f"with '{implementation}': {verdict.status[:40]}")), str(e)
        else:
            assert verdict.exact, (family, verdict)


def _mistral(impl, window):
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, sliding_window=window,
                                        attn_implementation=impl)
    return transformers.MistralForCausalLM(config).eval()


@pytest.mark.parametrize("impl", hf_families.IMPLEMENTATIONS)
def test_sliding_window_off_by_one_against_eager(impl):
    # Documents one shorter than, equal to, one longer than and twice the window: the window's edge
    # (key j seen by query i when j > i - window) falls inside each of the longer ones.
    window = 6
    model, eager = _mistral(register() if impl == "packing_varlen" else impl, window), _mistral("eager", window)
    g = torch.Generator().manual_seed(0)
    samples = [torch.randint(1, 97, (n,), generator=g) for n in (window - 1, window, window + 1, 2 * window)]
    with torch.no_grad():
        ref = torch.cat([eager(input_ids=s[None]).logits[0] for s in samples])
        got = model(**hf_kwargs(get_collator("concat", pad_to_multiple_of=32)(samples), model)).logits[0, : len(ref)]
        wider = _mistral("eager", window + 1)
        off = torch.cat([wider(input_ids=s[None]).logits[0] for s in samples])
    assert rel(got, ref) <= TOL
    assert rel(off, ref) > 1e-3  # one key more is visible in the logits: the test can see an off-by-one


def test_window_mask_counts_the_query_itself():
    mask = block_causal_mask(cumulative_lengths([5, 3]), 8, window=2)
    assert mask.sum(1).tolist() == [1, 2, 2, 2, 2, 1, 2, 2]  # min(position + 1, window) keys a row
    with pytest.raises(ValueError, match=r"a sliding window covers at least the token itself: got window=0, need >= 1"):
        block_causal_mask(cumulative_lengths([2]), 2, window=0)


def _eager_reference(q, k, v, cu, layer):
    """transformers' eager attention per document, written out: (T, H, D) in, (T, H, D_v) out."""
    outs = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qd, kd, vd = (t[a:b].transpose(0, 1) for t in (q, k, v))
        kd, vd = (t.repeat_interleave(qd.shape[0] // t.shape[0], 0) for t in (kd, vd))
        scores = qd @ kd.transpose(1, 2) * (layer.scale or qd.shape[-1] ** -0.5)
        if layer.softcap:
            scores = torch.tanh(scores / layer.softcap) * layer.softcap
        i = torch.arange(b - a)
        allowed = (i[:, None] >= i[None, :]) & (i[:, None] - i[None, :] < (layer.window or 10**9))
        scores = scores.masked_fill(~allowed, float("-inf"))
        if layer.sinks is not None:
            sink = layer.sinks.reshape(-1, 1, 1).expand(-1, b - a, 1)
            probs = torch.cat([scores, sink], -1).softmax(-1)[..., :-1]
        else:
            probs = scores.softmax(-1)
        outs.append((probs @ vd).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("layer", [
    LayerOptions(causal=True, scale=0.3),
    LayerOptions(causal=True, window=3),
    LayerOptions(causal=True, softcap=2.0, scale=0.9),
    LayerOptions(causal=True, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), window=4),
], ids=["scale", "window", "softcap", "sinks"])
@pytest.mark.parametrize("v_dim", [8, 12], ids=["same-v-dim", "mla-v-dim"])
def test_cpu_path_computes_each_option_exactly(layer, v_dim):
    g = torch.Generator().manual_seed(0)
    cu = cumulative_lengths([5, 9, 2])
    q = torch.randn(16, 4, 8, generator=g)
    k = torch.randn(16, 2, 8, generator=g)
    v = torch.randn(16, 2, v_dim, generator=g)
    got = hf_attention._masked(q, k, v, cu, 9, layer)
    assert got.shape == (16, 4, v_dim)
    assert rel(got, _eager_reference(q, k, v, cu, layer)) <= TOL


class _Module(torch.nn.Module):
    is_causal = True


def _call(**kwargs):
    q = torch.randn(1, 4, 6, 8)
    cu = cumulative_lengths([6])
    return hf_attention.varlen_attention(_Module(), q, q[:, :2], q[:, :2], None, cu_seq_lens_q=cu, max_length_q=6,
                                         **kwargs)


def test_every_keyword_is_implemented_or_refused_by_name():
    _call(position_ids=None, use_cache=False, output_router_logits=False, sliding_window=3, softcap=None, head_mask=None)
    with pytest.raises(ValueError, match=r"'packing_varlen' does not implement the attention keyword "
                                         r"position_bias=Tensor\(1, 4, 6, 6\) that _Module passes, and will not drop it; "
                                         r"load the model with attn_implementation='eager'"):
        _call(position_bias=torch.zeros(1, 4, 6, 6))
    with pytest.raises(ValueError, match=r"attention keyword head_mask=Tensor\(4,\)"):
        _call(head_mask=torch.ones(4))
    with pytest.raises(ValueError, match=r"attention keyword some_new_option=3 that"):
        _call(some_new_option=3)
    with pytest.raises(ValueError, match=r"'packing_varlen' takes sliding_window as a positive int \(keys counting the "
                                         r"query\), got 0"):
        _call(sliding_window=0)
    with pytest.raises(ValueError, match=r"got both s_aux and sinks"):
        _call(s_aux=torch.zeros(4), sinks=torch.zeros(1, 4, 6, 1))


def test_cuda_kernel_choice_follows_the_options(monkeypatch):
    # Which kernel runs a layer: the first that has every option it asks for, or a refusal naming
    # the options and the kernels here (the choice is device-free, so it is tested on the CPU).
    ran = []

    def kernel(name):
        def run(q, k, v, cu, max_len, causal, **options):
            ran.append((name, options))
            return q
        return run

    fa3_head_dims = [lambda d: True]  # each kernel's head-dimension check, as KernelSet.load resolves it
    both = KernelSet([Kernel("fa3", kernel("fa3"), frozenset({"scale", "window", "softcap"}), lambda d: fa3_head_dims[0](d)),
                      Kernel("torch", kernel("torch"), frozenset({"scale", "window"}), lambda d: True)])
    q = torch.randn(6, 4, 8, dtype=torch.bfloat16)
    cu = cumulative_lengths([6])
    assert hf_attention._on_cuda(q, q[:, :2], q[:, :2], cu, 6, LayerOptions(causal=True, softcap=3.0, window=2),
                                 both)[1] == "fa3"
    assert ran == [("fa3", {"window": 2, "softcap": 3.0})]
    assert both.choose({"scale": 0.1}, 64).name == "fa3"
    # A kernel wrong at a head dimension, or a build without it, is passed over there (FA4's
    # gradients at 16: kernels.py; an FA3 built for head dimension 128 only).
    fa3_head_dims[0] = lambda d: d >= 32
    assert both.choose({"scale": 0.1}, 16).name == "torch"
    hf_attention._on_cuda(q[..., :4], q[:, :2, :4], q[:, :2, :4], cu, 6, LayerOptions(causal=True, window=2), both)
    assert ran[-1] == ("torch", {"window": 2})
    fa3_head_dims[0] = lambda d: True
    torch_only = KernelSet(both.kernels[1:])
    hf_attention._on_cuda(q, q[:, :2], q[:, :2], cu, 6, LayerOptions(causal=True, window=2, scale=0.1), torch_only)
    assert ran[-1] == ("torch", {"scale": 0.1, "window": 2})
    with pytest.raises(ValueError, match=r"'packing_varlen' on CUDA: no varlen kernel here computes \['softcap'\] \(this "
                                         r"layer asks softcap=3.0\); kernels here and their options: torch: "
                                         r"\['scale', 'window'\]; install flash-attn"):
        hf_attention._on_cuda(q, q[:, :2], q[:, :2], cu, 6, LayerOptions(causal=True, softcap=3.0), torch_only)
    with pytest.raises(ValueError, match=r"no varlen kernel here computes \['sinks'\] \(this layer asks "
                                         r"sinks=Tensor\(4,\)\).*FA4 for sinks"):
        hf_attention._on_cuda(q, q[:, :2], q[:, :2], cu, 6, LayerOptions(causal=True, sinks=torch.zeros(4)), torch_only)
    with pytest.raises(ValueError, match=r"takes attention sinks per head, \(H,\), got per-token sinks of shape "
                                         r"\(1, 4, 6, 1\)"):
        hf_attention._on_cuda(q, q[:, :2], q[:, :2], cu, 6, LayerOptions(causal=True, sinks=torch.zeros(1, 4, 6, 1)), torch_only)
    with pytest.raises(ValueError, match=r"needs the value head dimension equal to the query's, got 4 and 8"):
        hf_attention._on_cuda(q, q[:, :2], q[:, :2, :4], cu, 6, LayerOptions(causal=True), torch_only)


def test_config_refusals_name_the_field_and_the_fix():
    with pytest.raises(ValueError, match=r"model_type 'bart' is refused on packed rows with 'sdpa': packed logits [\d.]+% "
                                         r"off each document alone \(.*transformers .*\); train it unpacked"):
        check_model(hf_families.tiny_config("bart"), "sdpa")
    unknown = transformers.LlamaConfig(attn_implementation="sdpa")
    unknown.model_type = "my_llama"
    with pytest.raises(ValueError, match=r"model_type 'my_llama' is refused on packed rows with 'sdpa': not verifiable: "
                                         r"model_type 'my_llama' has no causal LM in transformers .*; register its "
                                         r"causal LM with transformers' auto classes so it can be verified"):
        check_model(unknown)
    dynamic = transformers.LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
                                       attn_implementation="sdpa")
    with pytest.raises(ValueError, match=r"config rope type 'dynamic' chooses its frequencies from the row's longest "
                                         r"position"):
        HFPackedCollator(dynamic)
    chunked = transformers.Llama4TextConfig(attn_implementation="eager")
    with pytest.raises(ValueError, match=r"config layer_types has 'chunked_attention' \(attention_chunk_size=8192\)"):
        HFPackedCollator(chunked)
    with pytest.raises(ValueError, match=r"attn_implementation 'sdpa' given by name alone: pass the model \(or its "
                                         r"config\) instead"):
        HFPackedCollator("sdpa")
    with pytest.raises(ValueError, match=r"attn_implementation 'flex_attention' is refused"):
        HFPackedCollator(transformers.LlamaConfig(attn_implementation="flex_attention"))


def test_a_bare_name_is_checked_at_the_first_call():
    model, docs = hf_families.build("bart")
    model.set_attn_implementation(register())
    hf_attention._checked.clear()
    with pytest.raises(ValueError, match=r"model_type 'bart' is refused on packed rows with 'packing_varlen'"):
        model(**hf_kwargs(get_collator("concat")(docs), register()))


STATIC = dict(total_tokens=96, max_seqs=6, max_seqlen=32)
STATIC_LENS = [[30, 17, 25], [32, 32, 32], [3], [9, 9, 9, 9, 9, 9]]


@pytest.mark.parametrize("family", hf_families.MUST)
def test_must_list_compiles_once_and_trains_exactly(family):
    # Static kwargs into a compiled model (fullgraph=True: a graph break is an error): one
    # compilation across packs of other document counts, and each pack's logits, loss and gradients
    # equal its documents run alone through eager (fp32, 1e-5).
    model, _ = hf_families.build(family)
    reference, _ = hf_families.build(family)  # the same weights, eager
    model.set_attn_implementation(register())
    model.loss_type = "ForCausalLM"  # GPT-2 names none, and the warning it logs breaks the graph
    torch._dynamo.reset()
    step = torch.compile(model, fullgraph=True, backend="aot_eager")
    collate = HFPackedCollator(model, **STATIC)
    for i, lens in enumerate(STATIC_LENS):
        g = torch.Generator().manual_seed(i)
        samples = [torch.randint(1, hf_families.VOCAB, (n,), generator=g) for n in lens]
        ref_logits, ref_loss, ref_grads = hf_each_alone(reference, samples)
        ref_logits = torch.cat(ref_logits)
        batch = collate.collator(samples)
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            out = step(**hf_kwargs(batch, model))
            out.loss.backward()
        assert rel(out.logits[0, : batch.num_tokens], ref_logits) <= TOL
        assert rel(out.loss, ref_loss) <= TOL
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        assert grads.keys() == ref_grads.keys()
        assert max(rel(grads[n], ref_grads[n]) for n in grads) <= TOL
        model.zero_grad()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("layer", [
    LayerOptions(causal=True),
    LayerOptions(causal=True, scale=0.3),
    LayerOptions(causal=True, window=7),
    LayerOptions(causal=True, window=7, scale=0.2, softcap=5.0),
    LayerOptions(causal=True, window=7, sinks=torch.linspace(-2.0, 3.0, 8)),
], ids=["plain", "scale", "window", "softcap", "sinks"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_cuda_kernels_compute_each_option(layer, head_dim):
    # Every varlen kernel that loads here, in bf16, against the fp32 CPU path (2e-2) for each option
    # it takes; an option it lacks is refused by name, never dropped. Which kernel ran which option
    # is printed for the record (pytest -s).
    from packing.kernels import varlen_kernels, varlen_options

    g = torch.Generator().manual_seed(0)
    cu = cumulative_lengths([40, 3, 77, 8])
    q, k, v = (torch.randn(128, h, head_dim, generator=g).requires_grad_() for h in (8, 2, 2))
    weight = torch.randn(128, 8, head_dim, generator=g)  # a loss that weighs every output differently
    sinks = None if layer.sinks is None else layer.sinks.clone().requires_grad_()  # its gradient is checked too
    layer = LayerOptions(layer.causal, layer.scale, layer.window, layer.softcap, sinks)
    ref = hf_attention._masked(q, k, v, cu, 77, layer)
    leaves = (q, k, v) if sinks is None else (q, k, v, sinks)
    ref_grads = torch.autograd.grad((ref * weight).sum(), leaves)
    asked = layer.cuda_options()
    kernels = varlen_kernels()
    assert kernels, "no varlen kernel loads on this GPU"
    for name, run in kernels.items():
        if set(asked) <= varlen_options(name):
            inputs = [t.detach().cuda().bfloat16().requires_grad_() for t in (q, k, v)]
            on_gpu = {key: (val.detach().cuda().requires_grad_() if torch.is_tensor(val) else val)
                      for key, val in asked.items()}
            out = run(*inputs, cu.cuda(), 77, True, **on_gpu)
            grads = torch.autograd.grad((out.float() * weight.cuda()).sum(),
                                        inputs + ([on_gpu["sinks"]] if sinks is not None else []))
            errs = [rel(out.float().cpu(), ref)] + [rel(a.float().cpu(), b) for a, b in zip(grads, ref_grads)]
            print(f"kernel {name}: {sorted(asked)} head_dim {head_dim} rel err out {errs[0]:.2e}, "
                  f"grads {max(errs[1:]):.2e}")
            assert max(errs) <= 2e-2, name
        else:
            print(f"kernel {name}: {sorted(asked)} refused (it takes {sorted(varlen_options(name))})")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["mistral", "granite", "gemma2", "gpt_oss", "gemma3_text", "qwen3"])
def test_cuda_families_match_the_fp32_reference(family):
    # packing_varlen on CUDA in bf16 autocast against each document alone in fp32 (eager): sliding
    # windows (Mistral, Gemma 3), scaling (Granite, Gemma), softcaps (Gemma 2) and sinks (gpt-oss)
    # run exactly where a kernel here computes them, and are refused by name where none does; the
    # loss's gradients too, where the family runs.
    hf_attention.register()
    wide = dict(hidden_size=256, head_dim=64, intermediate_size=512)  # 4 heads of 64: every flash kernel takes it
    model, docs = hf_families.build(family, **wide)
    reference, _ = hf_families.build(family, **wide)
    model.cuda().set_attn_implementation(register())
    batch = get_collator("concat", pad_to_multiple_of=32)(docs).to("cuda")
    ref_logits, ref_loss, ref_grads = hf_each_alone(reference, docs)
    ref = torch.cat(ref_logits)
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**hf_kwargs(batch, model))
    except ValueError as e:
        print(f"{family}: refused on CUDA: {e}")
        assert "'packing_varlen' on CUDA" in str(e)
        return
    out.loss.backward()
    grads = {n: p.grad.float().cpu() for n, p in model.named_parameters() if p.grad is not None}
    errs = (rel(out.logits[0, : batch.num_tokens].float().cpu(), ref), rel(out.loss.float().cpu(), ref_loss),
            max(rel(grads[n], ref_grads[n]) for n in ref_grads))
    # bf16's own error on this family: each document alone, unpacked, eager, in bf16 autocast.
    model.zero_grad()
    model.set_attn_implementation("eager")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        own_logits, own_loss, own_grads = hf_each_alone(model, [d.cuda() for d in docs])
    own = (rel(torch.cat(own_logits).float().cpu(), ref), rel(own_loss.float().cpu(), ref_loss),
           max(rel(own_grads[n].float().cpu(), ref_grads[n]) for n in ref_grads))
    print(f"{family}: rel err logits {errs[0]:.2e}, loss {errs[1]:.2e}, grads {errs[2]:.2e} "
          f"(kernel {hf_attention.last_kernel}); bf16 unpacked eager: {own[0]:.2e}, {own[1]:.2e}, {own[2]:.2e}")
    # 2e-2, or bf16's own error where that is larger: tiny Gemma 3's gradients are 2.7e-2 off fp32
    # unpacked too (H200, benchmarks/results/families/2026-12-01-h200-families), so packing adds no error there.
    assert max(errs) <= max(2e-2, 1.1 * max(own))


def test_a_static_tail_reaches_the_router_loss_and_only_it():
    # Documented behaviour (README, mixture-of-experts): the padding tail counts in the router's
    # load-balancing loss, growing with the tail, and never in the language-model loss.
    rows = hf_families.router_tail("mixtral")
    assert [r["slots"] for r in rows] == list(hf_families.TAILS)
    assert 0 < rows[0]["aux"] / rows[0]["aux_no_tail"] - 1 < rows[-1]["aux"] / rows[-1]["aux_no_tail"] - 1
    assert all(abs(r["lm"] - r["lm_no_tail"]) <= 1e-5 * r["lm_no_tail"] for r in rows)


_BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
VARIANTS = {  # configs the matrix's one tiny config per family does not exercise
    "qwen2-window-on-upper-layers": ("Qwen2ForCausalLM", "Qwen2Config",
                                     dict(num_hidden_layers=4, use_sliding_window=True, sliding_window=6,
                                          max_window_layers=2)),
    "qwen3-window": ("Qwen3ForCausalLM", "Qwen3Config",
                     dict(num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma3-five-sliding-one-full": ("Gemma3ForCausalLM", "Gemma3TextConfig", dict(num_hidden_layers=6, sliding_window=7)),
    "cohere2-alternating": ("Cohere2ForCausalLM", "Cohere2Config", dict(num_hidden_layers=4, sliding_window=7)),
    "gpt-oss-four-layers": ("GptOssForCausalLM", "GptOssConfig",
                            dict(num_hidden_layers=4, sliding_window=6, num_local_experts=4, num_experts_per_tok=2)),
    "llama3-rope-scaling": ("LlamaForCausalLM", "LlamaConfig",
                            dict(num_hidden_layers=2, rope_parameters={"rope_type": "llama3", "factor": 8.0,
                                                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                                       "original_max_position_embeddings": 16,
                                                                       "rope_theta": 10000.0})),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_variants_are_exact_or_refused(variant):
    # Per-layer windows in other arrangements than the matrix's, on every implementation the family
    # takes: exact against eager each document alone, or refused by transformers or by name.
    cls_name, config_name, fields = VARIANTS[variant]
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in (30, 17, 25, 9)]
    for impl in hf_families.IMPLEMENTATIONS:
        config = getattr(transformers, config_name)(**_BASE, **fields, attn_implementation="eager")
        torch.manual_seed(0)
        model = getattr(transformers, cls_name)(config).eval()
        with torch.no_grad():
            ref = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
            try:
                model.set_attn_implementation(register() if impl == "packing_varlen" else impl)
            except ValueError as e:  # transformers' own refusal (gpt-oss has no sdpa)
                assert "does not support an attention implementation" in str(e)
                continue
            out = model(**hf_kwargs(get_collator("concat", pad_to_multiple_of=16)(docs), model)).logits[0]
        assert rel(out[: len(ref)], ref) <= TOL, impl


def test_kernels_refuse_what_they_do_not_compute_by_name():
    # Device-free: both refusals happen before any kernel launches.
    from packing.kernels.flash4 import fa4_varlen
    from packing.kernels import _torch_varlen

    q = torch.zeros(4, 2, 16)
    cu = cumulative_lengths([4])
    with pytest.raises(ValueError, match=r"FlashAttention-4's backward is wrong at head dimension 16 .* it needs >= 32"):
        fa4_varlen(q, q, q, cu, 4, True)
    run_torch = _torch_varlen()
    if run_torch is not None:
        with pytest.raises(ValueError, match=r"the varlen kernel 'torch.varlen_attn' does not compute \{'softcap': 5.0\}; "
                                             r"it takes \['scale', 'window'\]"):
            run_torch(q, q, q, cu, 4, True, softcap=5.0)


def test_torch_kernel_takes_only_the_head_dimensions_it_computes():
    # Outside them it raised inside the kernel ("head_size must be a multiple of 8", H200, head
    # dimension 4); now the layer goes to the next kernel, or gets packing_varlen's ValueError.
    from packing import kernels

    check = kernels.head_dim_check("torch.varlen_attn")
    assert [check(d) for d in (4, 12, 16, 64, 128, 256, 264)] == [False, False, True, True, True, True, False]


def test_an_fa3_build_without_a_head_dimension_or_option_counts_as_not_computing_it(monkeypatch):
    # FA3 builds from source with switches off; its own flash_attn_config says which. A head
    # dimension or an option the build left out must send the layer to the next kernel, not to a
    # run-time failure inside FA3.
    import types

    from packing import kernels

    config = types.ModuleType("flash_attn_config")
    config.CONFIG = {"build_flags": {"FLASHATTENTION_DISABLE_HDIM64": True, "FLASHATTENTION_DISABLE_LOCAL": True,
                                     "FLASHATTENTION_DISABLE_SOFTCAP": False, "FLASHATTENTION_DISABLE_HDIM128": False}}
    monkeypatch.setitem(sys.modules, "flash_attn_config", config)
    check = kernels.head_dim_check("flash-attn-3")
    assert [check(d) for d in (64, 80, 128, 256, 512)] == [False, True, True, True, False]
    assert kernels.varlen_options("flash-attn-3") == {"scale", "softcap"}
    monkeypatch.setitem(sys.modules, "flash_attn_config", None)  # a build without the module: all built
    assert kernels.head_dim_check("flash-attn-3")(64)
    assert kernels.varlen_options("flash-attn-3") == {"scale", "window", "softcap"}


def test_fa3_private_api_check_reads_through_a_custom_op(monkeypatch):
    # flash-attention's hopper/ (0251105a) defines _flash_attn_backward as a torch custom op, whose
    # own signature is (*args, **kwargs): the check must read the function it wraps. Before, a
    # correct build counted as not loading (found on an H200, issue 24).
    import types

    from torch import Tensor

    from packing.kernels import flash3

    @torch.library.custom_op("packing_test_fa3::_flash_attn_backward", mutates_args=("dq", "dk", "dv"))
    def backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, cu_seqlens_q: Tensor,
                 cu_seqlens_k: Tensor, sequed_q: Tensor, sequed_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                 dq: Tensor, dk: Tensor, dv: Tensor, softmax_scale: float, causal: bool) -> None:
        pass

    def wrong(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
        pass

    for fn, loads in ((backward, True), (wrong, False)):
        module = types.ModuleType("flash_attn_interface")
        module._flash_attn_backward = fn
        monkeypatch.setitem(sys.modules, "flash_attn_interface", module)
        flash3._interface.cache_clear()
        if loads:
            assert flash3._interface() is module
        else:
            with pytest.raises(ImportError, match=r"_flash_attn_backward takes \('dout', 'q', 'k', 'v', 'out', 'dq', "
                                                  r"'dk', 'dv'\), not the parameters this wrapper passes by position"):
                flash3._interface()
    flash3._interface.cache_clear()


@pytest.mark.parametrize("layer", [
    LayerOptions(causal=True),
    LayerOptions(causal=False, window=3),
    LayerOptions(causal=True, softcap=2.0, window=2),
    LayerOptions(causal=True, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0])),
], ids=["causal", "bidirectional-window", "softcap-window", "sinks"])
@pytest.mark.parametrize("bounds", [[0, 5, 14, 16, 16, 16], [0, 5, 14, 16]], ids=["static-empty-blocks", "tail"])
def test_cpu_gathered_documents_equal_the_row_mask_forward_and_backward(layer, bounds):
    # The eager CPU path (documents gathered into one block) against the compiled one (the (T, T)
    # mask), on static boundaries with empty blocks and on slots past the last boundary (a tail).
    from packing.interop.hf_attention import _attend, _gathered

    g = torch.Generator().manual_seed(0)
    cu, T = torch.tensor(bounds, dtype=torch.int32), 18
    q = torch.randn(T, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(T, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(T, 2, 8, generator=g, requires_grad=True)
    got = _gathered(q, k, v, cu, layer)
    ref = _attend(q, k, v, block_causal_mask(cu, T, causal=layer.causal, window=layer.window), layer)
    assert rel(got, ref) <= TOL
    w = torch.randn(got.shape, generator=g)
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all(rel(a, b) <= TOL for a, b in zip(grads, ref_grads))


@pytest.mark.parametrize("layer", [LayerOptions(causal=True), LayerOptions(causal=False, window=3),
                                   LayerOptions(causal=True, softcap=2.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))],
                         ids=["causal", "bidirectional-window", "softcap-sinks"])
@pytest.mark.parametrize("bounds, max_len", [([0, 5, 14, 16, 16, 16], 9), ([0, 5, 14, 16], 9), ([0, 3, 5], 4)],
                         ids=["static-empty-blocks", "tail", "tail-past-max-len"])
def test_cpu_documents_gathered_on_the_device_equal_the_row_mask(layer, bounds, max_len):
    # The compiled CPU path places each slot on the device (no host read) in rows of max_len slots:
    # the same outputs and gradients as the (T, T) mask on every slot of a block within max_len;
    # a tail longer than max_len (padding, never a document) gets zeros, and no gradient.
    from packing.interop.hf_attention import _attend, _gathered_on_device

    g = torch.Generator().manual_seed(0)
    cu, T = torch.tensor(bounds, dtype=torch.int32), 18
    q = torch.randn(T, 4, 8, generator=g, requires_grad=True)
    k = torch.randn(T, 2, 8, generator=g, requires_grad=True)
    v = torch.randn(T, 2, 8, generator=g, requires_grad=True)
    got = _gathered_on_device(q, k, v, cu, max_len, layer)
    ref = _attend(q, k, v, block_causal_mask(cu, T, causal=layer.causal, window=layer.window), layer)
    edges = [*bounds, T]
    block_len = {i: b - a for a, b in zip(edges, edges[1:]) for i in range(a, b)}
    start = {i: a for a, b in zip(edges, edges[1:]) for i in range(a, b)}
    whole = torch.tensor([block_len[i] <= max_len for i in range(T)])  # slots of blocks within max_len
    past = torch.tensor([i - start[i] >= max_len for i in range(T)])  # slots past max_len in their block
    assert rel(got[whole], ref[whole]) <= TOL and not got[past].any()
    # Blocks are independent: weighting only the whole blocks, every gradient equals the mask's.
    w = torch.randn(got.shape, generator=g) * whole[:, None, None]
    grads = torch.autograd.grad((got * w).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * w).sum(), (q, k, v))
    assert all(rel(a, b) <= TOL for a, b in zip(grads, ref_grads))
