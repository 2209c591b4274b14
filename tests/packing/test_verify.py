"""The user's own config verified live: a reduced copy, every feature kept, packed against each
document alone; what is exact trains, what is not is refused by name, and the verdict is cached.

Each case below is checked twice: check_model's verdict on the config, and, independently, the
config's own (unreduced) model packed against each document alone with its gradients, so an
accepted config is one that trains exactly, not one the verifier merely liked."""

import json
import re
import subprocess
import sys
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install -e '.[hf]'")

# These tests also hold the deprecated entry points (register, HFPackedCollator, hf_kwargs,
# causal_lm_loss) to their behaviour for the one release they remain; tests/packing/test_hf_pack.py
# tests pack(model) and pins the deprecation warnings.
pytestmark = pytest.mark.filterwarnings("ignore:.* is deprecated and will be removed in the next release:FutureWarning")

from equivalence import hf_each_alone, rel  # noqa: E402
from packing import get_collator  # noqa: E402
from packing.interop import verify  # noqa: E402
from packing.interop.hf import check_model, hf_kwargs  # noqa: E402
from packing.interop.hf_attention import register  # noqa: E402
from packing.interop.hf_families import unverified  # noqa: E402
from packing.interop.verify import reduce_config, verify_config  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)
LENS = (30, 17, 25)


def _packed_equals_alone(config, implementation):
    """The config's own model (not reduced): one packed row against each document alone, logits,
    loss and gradients, fp32; returns the largest relative error."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type])
    torch.manual_seed(0)
    model = cls._from_config(config, attn_implementation="eager").float()
    model.eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, config.get_text_config().vocab_size, (n,), generator=g) for n in LENS]
    ref_logits, ref_loss, ref_grads = hf_each_alone(model, docs)
    model.set_attn_implementation(register() if implementation == "packing_varlen" else implementation)
    with unverified():  # measured here independently of the verdict
        out = model(**hf_kwargs(get_collator("concat")(docs), model))
    out.loss.backward()
    errors = [rel(out.logits[0], torch.cat(ref_logits)), rel(out.loss, ref_loss)]
    # A gradient that is zero in exact arithmetic (a key bias: softmax ignores a constant per query)
    # is float noise both ways; each is measured against the largest gradient's scale instead.
    scale = max(g.norm().item() for g in ref_grads.values())
    errors += [((p.grad - ref_grads[n]).norm() / max(ref_grads[n].norm().item(), 1e-3 * scale)).item()
               for n, p in model.named_parameters() if n in ref_grads]
    return max(errors)


# Configs with features the matrix's tiny configs leave off, as a user's would have them on.
FEATURES = {
    "phimoe-window": lambda: transformers.PhimoeConfig(**SMALL, num_hidden_layers=2, sliding_window=6,
                                                       num_local_experts=4),
    "qwen2-moe-window": lambda: transformers.Qwen2MoeConfig(**SMALL, num_hidden_layers=2, use_sliding_window=True,
                                                            sliding_window=6, max_window_layers=2, num_experts=4,
                                                            moe_intermediate_size=32,
                                                            shared_expert_intermediate_size=32),
    "llama-yarn-and-biases": lambda: transformers.LlamaConfig(
        **SMALL, num_hidden_layers=2, attention_bias=True, mlp_bias=True,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0}),
    "gemma2-softcaps-alternating": lambda: transformers.Gemma2Config(**SMALL, num_hidden_layers=3, sliding_window=6,
                                                                     head_dim=16),
    "gemma3-five-sliding-one-full": lambda: transformers.Gemma3TextConfig(**SMALL, num_hidden_layers=6,
                                                                          sliding_window=5, head_dim=16),
    "gpt-oss-sinks": lambda: transformers.GptOssConfig(**SMALL, num_hidden_layers=2, sliding_window=6,
                                                       num_local_experts=4, num_experts_per_tok=2, head_dim=16),
    "qwen3-window-on-lower-layers": lambda: transformers.Qwen3Config(**SMALL, num_hidden_layers=3,
                                                                     use_sliding_window=True, sliding_window=5,
                                                                     max_window_layers=1, head_dim=16),
    "gptj": lambda: transformers.GPTJConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "codegen": lambda: transformers.CodeGenConfig(vocab_size=97, n_embd=64, n_layer=2, n_head=4, rotary_dim=8),
    "deepseek-v3-mla": lambda: transformers.DeepseekV3Config(
        vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, n_group=2, topk_group=1,
        num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16),
    "xglm": lambda: transformers.XGLMConfig(vocab_size=97, d_model=64, num_layers=2, attention_heads=4, ffn_dim=96),
    "gpt-neox-japanese": lambda: transformers.GPTNeoXJapaneseConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                                    num_attention_heads=4, intermediate_multiple_size=2),
    "falcon-alibi": lambda: transformers.FalconConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2,
                                                      num_attention_heads=4, alibi=True),
}


@pytest.mark.parametrize("implementation", ["packing_varlen", "sdpa", "eager"])
@pytest.mark.parametrize("case", FEATURES)
def test_a_users_config_is_exact_or_refused_by_name(case, implementation):
    config = FEATURES[case]()
    config._attn_implementation = implementation
    try:
        check_model(config, implementation)
    except ValueError as e:
        assert re.match(rf"(model_type '{config.model_type}' is refused on packed rows with '{implementation}': |config )",
                        str(e)), str(e)
        return
    assert _packed_equals_alone(config, implementation) <= 1e-5  # accepted: it trains exactly


def test_a_window_the_attention_function_never_gets_is_refused_and_named():
    # PhiMoE and Qwen2-MoE apply their window only through the mask, which packing_varlen does not
    # take: the verifier finds the row off and names the field that makes it exact when switched off.
    for case in ("phimoe-window", "qwen2-moe-window"):
        config = FEATURES[case]()
        assert _packed_equals_alone(config, "packing_varlen") > 1e-2  # what would have trained silently
        with pytest.raises(ValueError, match=r"is refused on packed rows with 'packing_varlen': packed logits [\d.]+% "
                                             r"off each document alone; switching off its sliding_window made the row "
                                             r"exact \(verified on a reduced copy of this config, transformers .*\); "
                                             r"load it with attn_implementation in \['sdpa', 'eager'\]"):
            check_model(config, "packing_varlen")
        assert check_model(config, "sdpa") == "sdpa"


@pytest.mark.parametrize("case", ["xglm", "gpt-neox-japanese"])
def test_a_model_that_routes_around_the_attention_interface_is_refused(case):
    with pytest.raises(ValueError, match=r"routes attention around transformers' attention interface: 0 of its 2 "
                                         r"attention layers called 'packing_varlen'"):
        check_model(FEATURES[case](), "packing_varlen")


def test_families_whose_tiny_config_did_not_build_are_verified_from_the_users():
    # The matrix refused these because its own tiny config failed to build; the user's config builds
    # and is measured: accepted and exact (transformers 5.25), or refused for what was measured
    # (on 5.17 GPT-J's attention does not call packing_varlen), never "not verifiable".
    for case in ("gptj", "codegen", "deepseek-v3-mla"):
        verdict = verify_config(FEATURES[case](), "packing_varlen")
        assert not verdict.status.startswith("not verifiable"), (case, verdict)
        if verdict.exact:
            assert check_model(FEATURES[case](), "packing_varlen") == "packing_varlen"
            assert _packed_equals_alone(FEATURES[case](), "packing_varlen") <= 1e-5


def test_a_crash_inside_transformers_is_a_refusal_at_check_time():
    with pytest.raises(ValueError, match=r"model_type 'falcon' is refused on packed rows with 'sdpa': fails packed "
                                         r"\(\w+Error: "):
        check_model(FEATURES["falcon-alibi"](), "sdpa")


def test_the_reduced_copy_keeps_every_feature_and_cuts_the_size():
    gemma = reduce_config(transformers.Gemma3TextConfig(num_hidden_layers=26, sliding_window=4096))
    assert gemma.layer_types == ["sliding_attention", "full_attention"] and gemma.num_hidden_layers == 2
    assert gemma.sliding_window == verify.WINDOW and gemma.head_dim == 256 and gemma.vocab_size == verify.VOCAB
    llama = transformers.LlamaConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
                                     num_hidden_layers=16, attention_bias=True,
                                     rope_parameters={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                                      "rope_theta": 500000.0})
    small = reduce_config(llama)
    assert (small.num_attention_heads, small.num_key_value_heads, small.head_dim) == (8, 2, 64)  # ratio 4, dim 64
    assert small.hidden_size == 512 and small.attention_bias and small.rope_parameters == llama.rope_parameters
    assert llama.num_hidden_layers == 16  # the user's config is not touched
    deepseek = reduce_config(transformers.DeepseekV3Config(num_hidden_layers=61, first_k_dense_replace=3))
    assert deepseek.num_hidden_layers == 2 and deepseek.first_k_dense_replace == 1  # one dense layer, one MoE
    assert deepseek.n_routed_experts % deepseek.n_group == 0
    assert deepseek.n_routed_experts // deepseek.n_group * deepseek.topk_group >= deepseek.num_experts_per_tok


def test_a_verdict_is_cached_by_version_config_and_implementation(monkeypatch, tmp_path):
    monkeypatch.setenv("PACKING_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(verify, "_memo", {})
    config = transformers.LlamaConfig(**SMALL, num_hidden_layers=2)
    first = verify_config(config, "sdpa")
    assert first.exact and not first.cached and first.seconds > 0
    [path] = tmp_path.glob("verdicts/*.json")
    monkeypatch.setattr(verify, "_memo", {})
    monkeypatch.setattr(verify, "_measure", lambda *a: pytest.fail("a cached verdict was measured again"))
    again = verify_config(config, "sdpa")
    assert again.cached and again.exact and again.seconds == 0
    for edit in (lambda: path.write_text("{not json"), lambda: path.write_text(json.dumps({"status": 3}))):
        edit()  # a damaged cache entry is measured again, never trusted
        monkeypatch.setattr(verify, "_memo", {})
        monkeypatch.setattr(verify, "_measure", lambda *a: ("exact", 0.0, None))
        assert not verify_config(config, "sdpa").cached
    keys = {verify.fingerprint(reduce_config(config), "sdpa"), verify.fingerprint(reduce_config(config), "eager"),
            verify.fingerprint(reduce_config(transformers.LlamaConfig(**SMALL, num_hidden_layers=2,
                                                                      attention_bias=True)), "sdpa")}
    monkeypatch.setattr("transformers.__version__", "0.0.1")  # sys.modules' transformers, as verify reads it
    keys.add(verify.fingerprint(reduce_config(config), "sdpa"))
    assert len(keys) == 4


def test_the_command_line_verifies_a_config_file_and_errors_are_one_line(tmp_path):
    transformers.LlamaConfig(**SMALL, num_hidden_layers=2).save_pretrained(tmp_path / "llama")
    transformers.XGLMConfig(vocab_size=97, d_model=64, num_layers=2, attention_heads=4,
                            ffn_dim=96).save_pretrained(tmp_path / "xglm")

    def run(*args):
        env = {"PACKING_CACHE_DIR": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
        return subprocess.run([sys.executable, "-m", "packing.interop.verify", *args], capture_output=True,
                              text=True, env=env)

    ok = run("--config", str(tmp_path / "llama"), "--implementation", "sdpa")
    assert ok.returncode == 0 and re.match(r"llama with sdpa: exact, error [\d.e+-]+ \(measured in [\d.]+ s", ok.stdout)
    assert "(cached" in run("--config", str(tmp_path / "llama"), "--implementation", "sdpa").stdout
    bad = run("--config", str(tmp_path / "xglm" / "config.json"))
    assert bad.returncode == 1 and "routes attention around transformers' attention interface" in bad.stdout
    for args, message in [(["--config", str(tmp_path / "none")], "no config.json there"),
                          (["--family", "no_such_family"], "is not a model_type transformers"),
                          (["--family", "llama", "--implementation", "flex_attention"],
                           "attn_implementation 'flex_attention' is refused")]:
        proc = run(*args)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr


def test_no_warning_and_no_cost_the_second_time():
    config = transformers.MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=6)
    check_model(config, "sdpa")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = verify_config(config, "sdpa")
    assert again.cached and again.seconds == 0


def test_a_compiled_model_given_the_bare_name_is_checked_as_an_eager_one_is():
    # Under torch.compile the first call's check runs while dynamo traces: a family that is not
    # exact is refused there too (it trained before), and one that is compiles and runs.
    from packing.interop import hf_attention
    from packing.interop.hf_verify import build

    for family, refused in (("bart", True), ("llama", False)):
        model, docs = build(family)
        model.set_attn_implementation(register())
        hf_attention._checked.clear()
        torch._dynamo.reset()
        step = torch.compile(model, backend="aot_eager")
        kwargs = hf_kwargs(get_collator("concat")(docs), "packing_varlen")
        if refused:  # dynamo wraps the refusal raised at trace time; its message is ours
            with pytest.raises(Exception, match=r"model_type 'bart' is refused on packed rows with 'packing_varlen': "
                                                r"packed logits"):
                step(**kwargs)
        else:
            assert torch.isfinite(step(**kwargs).loss)


IMPLS = ("packing_varlen", "sdpa", "eager")


@pytest.mark.parametrize("built_for", IMPLS)
@pytest.mark.parametrize("runs", IMPLS)
@pytest.mark.parametrize("tail", [0, 24], ids=["no-tail", "padding-tail"])
def test_kwargs_built_for_one_implementation_are_exact_or_refused_on_another(built_for, runs, tail):
    # An sdpa model's kwargs fed to an eager copy of the same weights were 83% off, silently.
    config = transformers.MistralConfig(**SMALL, num_hidden_layers=2, sliding_window=6)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM._from_config(config, attn_implementation="eager").eval()
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, 97, (n,), generator=g) for n in LENS]
    with torch.no_grad():
        ref = torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in docs])
        batch = get_collator("concat", **({"total_tokens": sum(LENS) + tail} if tail else {}))(docs)
        model.set_attn_implementation(register() if built_for == "packing_varlen" else built_for)
        kwargs = hf_kwargs(batch, model)
        model.set_attn_implementation(register() if runs == "packing_varlen" else runs)
        try:
            out = model(**kwargs).logits[0, : sum(LENS)]
        except ValueError as e:
            assert "packing_varlen" in str(e), str(e)  # refused by name
            return
    assert rel(out, ref) <= 1e-5, (built_for, runs)


def test_a_config_is_checked_once_not_at_every_batch(monkeypatch):
    from packing.interop import hf_families

    config = transformers.LlamaConfig(**SMALL, num_hidden_layers=2, attn_implementation="sdpa")
    batch = get_collator("concat")([torch.arange(1, 9), torch.arange(1, 5)])
    hf_kwargs(batch, config)
    monkeypatch.setattr(hf_families, "check_config", lambda *a: pytest.fail("a passed config was checked again"))
    monkeypatch.setattr(hf_families, "_check_verified", lambda *a: pytest.fail("a passed config was verified again"))
    for _ in range(3):
        hf_kwargs(batch, config)
    other = transformers.LlamaConfig(**SMALL, num_hidden_layers=2, attn_implementation="sdpa")
    with pytest.raises(pytest.fail.Exception, match="checked again"):
        hf_kwargs(batch, other)  # another config object is checked
