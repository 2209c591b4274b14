import argparse
import dataclasses

import pytest
import torch

from benchmarks.harness import RunConfig, format_table, time_steps


def test_time_steps_runs_warm_untimed_and_times_the_rest():
    calls = []

    def step(i):
        calls.append(i)
        return torch.tensor(float(i))

    t = time_steps([lambda: step(0), lambda: step(1)], [lambda: step(2), lambda: step(3)], torch.device("cpu"))
    assert calls == [0, 1, 2, 3] and len(t.step_ms) == 2 and t.total_s >= sum(t.step_ms) / 1000 * 0.99
    s = t.summary(real_tokens=[30, 10], slots=[40, 40])
    assert s["loss"] == 2.5 and s["padding_fraction"] == 0.5 and s["recompiles"] is None
    with pytest.raises(ValueError, match="no steps to time"):
        time_steps([], [], torch.device("cpu"))


def test_time_steps_counts_recompiles_after_the_first_step():
    torch._dynamo.reset()
    f = torch.compile(lambda x: (x * 2).sum(), dynamic=False)
    shapes = [3, 3, 4, 5]  # the first compiles; two new shapes after it recompile
    steps = [lambda n=n: f(torch.ones(n)) for n in shapes]
    t = time_steps(steps[:1], steps[1:], torch.device("cpu"), count_compiles=True)
    assert t.recompiles == 2 and t.graphs >= 3 and t.graph_breaks == 0


def test_run_config_is_frozen_and_built_from_arguments():
    @dataclasses.dataclass(frozen=True)
    class Config(RunConfig):
        arch: str = "gpt2"

    p = argparse.ArgumentParser()
    Config.add_arguments(p, mode_help="m", steps_help="s")
    p.add_argument("--arch", default="gpt2")
    p.add_argument("--unrelated", default=1)
    c = Config.from_args(p.parse_args(["--steps", "4", "--arch", "llama"]), seed=7)
    assert (c.steps, c.warmup, c.arch, c.seed, c.mode) == (4, 2, "llama", 7, "train")
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.steps = 5
    with pytest.raises(SystemExit):
        p.parse_args(["--steps", "0"])


def test_format_table_pads_columns_under_a_rule():
    assert format_table(["a", "bb"], [[1, "x"], ["long", None]]).splitlines() == [
        "a     bb", "----  ----", "1     x", "long  None"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_peak_memory_counts_the_recording():
    """A CUDA graph's replays allocate nothing: its activations come from its pool while it is
    recorded in the warm-up. peak_from_start counts them; the timed replays alone do not."""
    torch._dynamo.reset()
    device = torch.device("cuda")
    x = torch.randn(2048, 2048, device=device)  # 16 MiB; x @ x inside the graph is another 16 MiB
    f = torch.compile(lambda a: (a @ a).sin().sum(), mode="reduce-overhead")

    def step():
        torch.compiler.cudagraph_mark_step_begin()
        return f(x).clone()

    recorded = time_steps([step] * 3, [step] * 3, device, peak_from_start=True)
    replayed = time_steps([step] * 3, [step] * 3, device)
    assert recorded.peak_mem_bytes - replayed.peak_mem_bytes >= 15 * 2**20, (recorded.peak_mem_bytes,
                                                                            replayed.peak_mem_bytes)
    torch._dynamo.reset()
