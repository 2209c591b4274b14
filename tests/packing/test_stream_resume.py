"""Streaming resumes exactly: ShardStream and StreamPacker state through torchdata's StatefulDataLoader.

The kill-and-resume test runs the stream in real processes (tests/packing/stream_worker.py): one runs
the epoch uninterrupted; another is SIGKILLed after step k with its state saved every step; a third
loads that state and finishes the epoch. Together they must give the same packs in the same order.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from property import HealthCheck, given, settings, st
import torch

pytest.importorskip("torchdata", reason="the stream extra: pip install -e '.[stream]'")

from torchdata.stateful_dataloader import StatefulDataLoader  # noqa: E402

from packing import StreamPacker, as_sample, restore_loader  # noqa: E402
from packing.sampling.stream import pack_sizes  # noqa: E402
from packing.data.shard_reader import ShardStream  # noqa: E402
from packing.data.shards import ShardWriter  # noqa: E402

WORKER = Path(__file__).with_name("stream_worker.py")
ROOT = Path(__file__).resolve().parents[2]
DOCS, SHARD_SIZE = 180, 15  # 12 shards


def write(out, docs):
    """Shards of 15 documents, lengths 1 to 59; document i's tokens start at 100 i + 1, unique to it."""
    rng = np.random.default_rng(0)
    with ShardWriter(str(out), vocab_size=60_000, tokenizer="bytes", shard_size=SHARD_SIZE) as w:
        for i in range(docs):
            n = int(rng.integers(1, 60))
            w.write(f"doc{i}", (np.arange(n) + 100 * i + 1).astype(np.uint16))
    return str(out)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write(tmp_path_factory.mktemp("stream") / "shards", DOCS)  # 12 shards


@pytest.fixture(scope="module")
def uneven(tmp_path_factory):
    return write(tmp_path_factory.mktemp("uneven") / "shards", 105)  # 7 shards: 4 for one rank, 3 for the other


def run(shards, tmp, workers, buffer, kill_after=-1, resume=0, out="packs.jsonl", ranks=0):
    """The worker script, in one process or under torchrun; ``resume=k`` starts from step k's state."""
    launch = [sys.executable] if not ranks else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc_per_node={ranks}"]
    proc = subprocess.run(
        [*launch, str(WORKER), shards, str(tmp / out), str(tmp / "state.pt"), str(workers), str(buffer),
         str(kill_after), str(resume)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""},
    )
    return proc


def interrupted_and_resumed(loader, steps):
    """The packs of ``loader()`` stopped after ``steps`` packs and resumed from its state in a new
    loader, ``loader(state)``; and that state."""
    interrupted = loader()
    it = iter(interrupted)
    first = [next(it) for _ in range(steps)]
    state = interrupted.state_dict()
    del it
    return first + list(loader(state)), state


def packs(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# Invariant: a run killed after step k and resumed from its saved state yields exactly the packs of
# an uninterrupted run, in the same order: no document lost, none twice.
@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(workers=st.sampled_from([0, 1, 2]), buffer=st.sampled_from([1, 4, 16]), k=st.integers(1, 20))
def test_killed_stream_resumes_to_the_same_packs(shards, tmp_path_factory, workers, buffer, k):
    tmp = tmp_path_factory.mktemp("run")
    full = run(shards, tmp, workers, buffer, out="full.jsonl")
    assert full.returncode == 0, full.stderr
    expected = packs(tmp / "full.jsonl")
    k = min(k, len(expected) - 1)
    killed = run(shards, tmp, workers, buffer, kill_after=k)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(packs(tmp / "packs.jsonl")) == k
    resumed = run(shards, tmp, workers, buffer, resume=k)
    assert resumed.returncode == 0, resumed.stderr
    got = packs(tmp / "packs.jsonl")
    assert got == expected
    documents = sorted(doc[0] for pack in got for doc in pack)
    assert documents == sorted(100 * i + 1 for i in range(DOCS))  # every document once


@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_killed_and_resumed_under_torchrun(uneven, tmp_path, workers):
    # 2 gloo ranks on 7 shards, an all-reduce every step (a rank with fewer packs would hang it), rank
    # 0 SIGKILLed after step 3 (torchrun then ends rank 1), both resumed from their step-3 states.
    natural = [sum(len(pack_sizes(ShardStream(uneven, seed=3).share_lengths(r, w, 2, max(workers, 1)),
                                  max_tokens=128, buffer_size=4)) for w in range(max(workers, 1))) for r in range(2)]
    assert natural[0] != natural[1]  # unevened, this run would hang at the epoch's end
    shards = uneven
    full = run(shards, tmp_path, workers, 4, out="full.jsonl", ranks=2)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = [packs(tmp_path / f"full.jsonl.{r}") for r in range(2)]
    assert len(expected[0]) == len(expected[1]) == max(natural)  # equal counts: the run ended without a hang
    documents = sorted(doc[0] for rank in expected for pack in rank for doc in pack)
    assert documents == sorted(100 * i + 1 for i in range(105))
    killed = run(shards, tmp_path, workers, 4, kill_after=3, ranks=2)
    assert killed.returncode != 0
    assert len(packs(tmp_path / "packs.jsonl.0")) == 3
    for r in range(2):  # rank 1 may have run a step past the all-reduce of step 3 before torchrun ended it:
        # the job resumes from the checkpoint every rank reached, step 3, as a real job would
        lines = (tmp_path / f"packs.jsonl.{r}").read_text().splitlines()[:3]
        (tmp_path / f"packs.jsonl.{r}").write_text("".join(line + "\n" for line in lines))
    resumed = run(shards, tmp_path, workers, 4, resume=3, ranks=2)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [packs(tmp_path / f"packs.jsonl.{r}") for r in range(2)] == expected


@pytest.mark.parametrize("workers", [0, 2])
def test_state_resumes_in_process(shards, workers):
    def loader(state=None):
        packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8)
        dl = StatefulDataLoader(packer, batch_size=None, num_workers=workers, collate_fn=lambda p: [d.tolist() for d in p])
        if state is not None:
            dl.load_state_dict(state)
        return dl

    full = list(loader())
    resumed, _ = interrupted_and_resumed(loader, 7)
    assert resumed == full


def test_state_holds_positions_not_tokens(shards):
    packer = StreamPacker(ShardStream(shards, seed=3, shuffle=False), max_tokens=128, buffer_size=16)
    it = iter(packer)
    taken = sum(len(next(it)) for _ in range(3))
    state = packer.state_dict()
    read = state["source"]["position"]
    waiting = np.unpackbits(state["buffer"].numpy(), count=read - state["buffer_start"]).sum()
    # Every document read and not yet packed waits; the buffer refilled to 16 before giving the 3rd pack.
    assert waiting == read - taken == 16 - len(_last_pack(packer, shards, 3))
    assert set(state) == {"source", "buffer_start", "buffer", "taken", "pending", "max_tokens", "buffer_size", "max_seqs"}
    assert len(state["buffer"]) <= read // 8 + 1  # one bit a document read, at most


def _last_pack(packer, shards, n):
    """The n-th pack of a fresh run with the same settings (packing is deterministic)."""
    fresh = iter(StreamPacker(ShardStream(shards, seed=3, shuffle=False), max_tokens=packer.max_tokens,
                              buffer_size=packer.buffer_size))
    for _ in range(n - 1):
        next(fresh)
    return next(fresh)


def test_refusals_say_why(shards, tmp_path):
    stream = ShardStream(shards, seed=3)
    state = stream.state_dict()
    with pytest.raises(ValueError, match=r"ShardStream state is from another shard set \(fingerprint 'x', these 12 "
                                         r"shards give '[0-9a-f]{16}'\); resume with the shards it was saved with"):
        ShardStream(shards, seed=3).load_state_dict({**state, "fingerprint": "x"})
    with pytest.raises(ValueError, match=r"ShardStream state has seed=3, this stream seed=4; construct the stream "
                                         r"with seed=3 to resume it"):
        ShardStream(shards, seed=4).load_state_dict(state)
    for key, value in (("world_size", 2), ("num_workers", 2), ("worker", 1), ("rank", 1)):
        with pytest.raises(ValueError, match=rf"ShardStream state was saved with {key}={value}, this process has "
                                             rf"{key}=\d; positions belong to one share of the shards"):
            ShardStream(shards, seed=3).load_state_dict({**state, key: value})
    with pytest.raises(ValueError, match=r"ShardStream state has unknown keys \['tokens'\]"):
        ShardStream(shards, seed=3).load_state_dict({**state, "tokens": []})
    packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8)
    with pytest.raises(ValueError, match=r"StreamPacker state was saved with buffer_size=8, this packer has "
                                         r"buffer_size=4; other settings make other packs"):
        StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=4).load_state_dict(packer.state_dict())
    with pytest.raises(TypeError, match=r"StreamPacker can save and resume only a packing.sampling.source.ResumableSource "
                                        r"\(position, state_dict, load_state_dict, documents, place, share_lengths\), "
                                        r"such as packing.ShardStream; got list"):
        StreamPacker([[1, 2]], max_tokens=8).state_dict()
    import packing  # the name the message gives exists (issue 23: it named a class packing did not export)
    assert packing.ShardStream is ShardStream
    # Another shard set: one more shard changes the fingerprint, so the positions would mean other documents.
    other = tmp_path / "other"
    with ShardWriter(str(other), vocab_size=300, tokenizer="bytes", shard_size=SHARD_SIZE) as w:
        w.write("x", np.arange(1, 5, dtype=np.uint16))
    with pytest.raises(ValueError, match=r"the shards named come from 2 sets \(.*\); a reader reads one set: name its "
                                         r"directory, or shards of one set"):
        ShardStream([*sorted(Path(shards).glob("*.tar")), *other.glob("*.tar")], seed=3)
    # Fewer shards of the same set: the positions would mean other documents.
    with pytest.raises(ValueError, match=r"another shard set"):
        ShardStream(sorted(Path(shards).glob("*.tar"))[1:], seed=3).load_state_dict(state)


def test_epoch_end_state_resumes_to_nothing(shards):
    packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8)
    all_packs = list(packer)
    state = packer.state_dict()
    assert state["source"]["position"] == DOCS and state["buffer"].numel() == 0
    again = StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8)
    again.load_state_dict(state)
    assert list(again) == [] and len(all_packs) > 0
    assert len(list(again)) == len(all_packs)  # the next iteration is a fresh epoch


def placed(shards, monkeypatch, rank, worker, world_size, num_workers, **options):
    """A packer whose stream believes it is this rank's and worker's (what torchrun and a DataLoader
    worker would tell it), so several ranks can run in one test process."""
    stream = ShardStream(shards, seed=3)
    place = {"rank": rank, "world_size": world_size, "worker": worker, "num_workers": num_workers}
    monkeypatch.setattr(stream, "place", lambda: dict(place))
    return StreamPacker(stream, max_tokens=128, buffer_size=options.get("buffer_size", 4))


@pytest.mark.parametrize("world_size, num_workers", [(2, 1), (3, 1), (2, 2), (5, 1)])
def test_ranks_get_equal_pack_counts_and_every_document_once(shards, monkeypatch, world_size, num_workers):
    # Ranks stream different shards, so without equalising, their pack counts differ and DDP hangs.
    counts, documents = [], []
    for rank in range(world_size):
        total = 0
        for worker in range(num_workers):
            packer = placed(shards, monkeypatch, rank, worker, world_size, num_workers)
            packs = list(packer)
            total += len(packs)
            documents += [doc[0].item() for pack in packs for doc in pack]
            assert all(1 <= len(p) and sum(map(len, p)) <= 128 for p in packs)
        counts.append(total)
    assert len(set(counts)) == 1, counts
    assert sorted(documents) == sorted(100 * i + 1 for i in range(DOCS))  # none dropped, none twice


def test_unequal_shares_are_evened_by_splitting(shards, monkeypatch):
    # 12 shards over 5 ranks: 3, 3, 2, 2, 2 shards. Unevened, the pack counts differ; the short ranks split.
    natural = [len(pack_sizes(placed(shards, monkeypatch, r, 0, 5, 1).source.share_lengths(r, 0, 5, 1),
                              max_tokens=128, buffer_size=4)) for r in range(5)]
    splits = [len(placed(shards, monkeypatch, r, 0, 5, 1)._splits()) for r in range(5)]
    assert len(set(natural)) > 1 and [n + k for n, k in zip(natural, splits)] == [max(natural)] * 5


def test_resume_inside_a_split_pack(shards, monkeypatch):
    # The rank that splits packs: a state saved between a split pack's two halves resumes to the same packs.
    world = 5
    rank = next(r for r in range(world) if placed(shards, monkeypatch, r, 0, world, 1)._splits())
    full = [[d.tolist() for d in p] for p in placed(shards, monkeypatch, rank, 0, world, 1)]
    splits = placed(shards, monkeypatch, rank, 0, world, 1)._splits()
    assert splits
    for k in range(1, len(full)):
        packer = placed(shards, monkeypatch, rank, 0, world, 1)
        it = iter(packer)
        head = [[d.tolist() for d in next(it)] for _ in range(k)]
        state = packer.state_dict()
        again = placed(shards, monkeypatch, rank, 0, world, 1)
        again.load_state_dict(state)
        assert head + [[d.tolist() for d in p] for p in again] == full, k


def test_too_few_shards_for_the_ranks_is_refused(tmp_path, monkeypatch):
    out = tmp_path / "few"
    with ShardWriter(str(out), vocab_size=300, tokenizer="bytes", shard_size=3) as w:
        for i in range(4):  # two shards, of 3 documents and of 1, each document a pack of its own
            w.write(f"d{i}", np.arange(1, 100, dtype=np.uint16))
    short = next(r for r in range(2) if len(placed(str(out), monkeypatch, r, 0, 2, 1).source.share_lengths(r, 0, 2, 1)) == 1)
    with pytest.raises(ValueError, match=rf"rank {short} gets 1 packs from its shards and rank {1 - short} gets 3; "
                                         r"splitting all its 0 packs of two or more documents cannot even them out: "
                                         r"write more, smaller shards"):
        list(placed(str(out), monkeypatch, short, 0, 2, 1, buffer_size=1))
    with pytest.raises(ValueError, match=r"skip_corrupt=True with several ranks: a shard skipped while reading would "
                                         r"change one rank's pack count"):
        ShardStream(str(out), skip_corrupt=True).share_lengths(0, 0, 2, 1)


def test_more_refusals_say_why(shards, tmp_path):
    packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8)
    state = packer.state_dict()
    with pytest.raises(ValueError, match=r"StreamPacker state has keys \['buffer', 'source'\], expected \["):
        StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8).load_state_dict(
            {"source": state["source"], "buffer": state["buffer"]})
    with pytest.raises(ValueError, match=rf"position {DOCS} is past this share's {DOCS} documents"):
        ShardStream(shards, seed=3).documents([0, DOCS])
    broken = tmp_path / "broken"
    with ShardWriter(str(broken), vocab_size=300, tokenizer="bytes", shard_size=SHARD_SIZE) as w:
        w.write("x", np.arange(1, 5, dtype=np.uint16))
    next(broken.glob("*.lengths.npy")).write_bytes(b"not an npy file")
    with pytest.raises(ValueError, match=r"shard .*shard-000000.tar: its length index is unreadable"):
        ShardStream(str(broken)).share_lengths(0, 0, 2, 1)


@pytest.mark.parametrize("saved, now", [(0, 2), (2, 0), (2, 1), (1, 2)])
def test_resume_with_another_worker_count_names_both(shards, saved, now, tmp_path):
    """Issue 22 item 5: torchdata gives a bare AssertionError (or a worker's traceback); restore_loader
    names the saved and the new worker counts."""
    def loader(workers):
        packer = StreamPacker(ShardStream(shards, seed=3), max_tokens=128, buffer_size=8)
        return StatefulDataLoader(packer, batch_size=None, num_workers=workers, collate_fn=len)

    dl = loader(saved)
    it = iter(dl)
    next(it)
    torch.save(dl.state_dict(), tmp_path / "loader.pt")
    del it
    with pytest.raises(ValueError, match=rf"the loader state was saved with num_workers={saved}, this loader has "
                                         rf"num_workers={now}; .* resume with num_workers={saved}, or start the epoch afresh"):
        restore_loader(loader(now), tmp_path / "loader.pt")
    assert restore_loader(loader(saved), tmp_path / "loader.pt") is True
    assert restore_loader(loader(saved), tmp_path / "absent.pt") is False  # a first run
    with pytest.raises(ValueError, match=r"it is not a StatefulDataLoader.state_dict\(\)"):
        restore_loader(loader(0), {"epoch": 1})


@pytest.mark.parametrize("workers", [0, 2])
def test_split_long_documents_resume_exactly_and_keep_every_token_and_target(tmp_path, workers):
    """Issue 22 item 3: documents up to 59 tokens streamed with max_len=16, too_long='split' into
    32-token packs. Every token comes once with its document's own target, across chunk ends, and a
    loader resumed mid-epoch gives the same packs."""
    shards = write(tmp_path / "s", 60)
    lengths = np.concatenate([np.load(p) for p in sorted((tmp_path / "s").glob("*.lengths.npy"))])

    def loader(state=None):
        stream = ShardStream(shards, seed=3, max_len=16, too_long="split")
        dl = StatefulDataLoader(StreamPacker(stream, max_tokens=32, buffer_size=8), batch_size=None,
                                num_workers=workers, collate_fn=lambda p: [[as_sample(d).input_ids.tolist(),
                                                                           as_sample(d).labels.tolist()] for d in p])
        if state is not None:
            restore_loader(dl, state)
        return dl

    full = list(loader())
    summary = ShardStream(shards, max_len=16, too_long="split").too_long_summary()
    assert summary["split"] == int((lengths > 16).sum()) > 0 and summary["dropped_tokens"] == 0
    assert summary["chunks"] == int(np.ceil(lengths / 16).sum()) == sum(len(p) for p in full)
    tokens = {i: t for pack in full for ids, labels in pack for t, i in zip(labels, ids)}
    ids = sorted(t for pack in full for ids, _ in pack for t in ids)
    expected = sorted(int(t) for i, n in enumerate(lengths) for t in np.arange(n) + 100 * i + 1)
    assert ids == expected  # every token once
    assert all(label == (i + 1 if (i - 1) % 100 + 1 < lengths[(i - 1) // 100] else -100) for i, label in tokens.items())
    resumed, state = interrupted_and_resumed(loader, 5)
    assert resumed == full
    source = (state["_snapshot"]["_worker_snapshots"]["worker_0"]["dataset_state"]["source"] if workers
              else state["dataset_state"]["source"])
    with pytest.raises(ValueError, match=r"ShardStream state has max_len=16, this stream max_len=None"):
        ShardStream(shards, seed=3).load_state_dict(source)
    # A state saved before these settings existed holds neither: it was a stream without max_len.
    older = {k: v for k, v in source.items() if k not in ("max_len", "too_long")}
    with pytest.raises(ValueError, match=r"ShardStream state has max_len=None, this stream max_len=16; construct "
                                         r"the stream with max_len=None to resume it"):
        ShardStream(shards, seed=3, max_len=16, too_long="split").load_state_dict(older)


def test_stream_too_long_error_and_truncate(tmp_path):
    shards = write(tmp_path / "s", 30)
    lengths = np.concatenate([np.load(p) for p in sorted((tmp_path / "s").glob("*.lengths.npy"))])
    with pytest.raises(ValueError, match=r"document \d+ of shard .*shard-000000.tar has \d+ tokens, over max_len=16 "
                                         r"\(\d+ such documents\); pass too_long='split'"):
        list(ShardStream(shards, shuffle=False, max_len=16))
    stream = ShardStream(shards, shuffle=False, max_len=16, too_long="truncate")
    got = list(stream)
    assert [len(as_sample(d).input_ids) for d in got] == np.minimum(lengths, 16).tolist()
    assert stream.too_long_summary()["dropped_tokens"] == int(np.maximum(lengths - 16, 0).sum())
    with pytest.raises(ValueError, match=r"too_long is 'chop'; expected one of 'error', 'split', 'truncate'"):
        ShardStream(shards, max_len=16, too_long="chop")


def test_torchdatas_set_vital_warning_is_filtered_where_packing_is_imported():
    # A user's run, not pytest's filters: warnings on by default, packing imported, a loader made.
    code = ("import packing\nfrom torchdata.stateful_dataloader import StatefulDataLoader\n"
            "list(StatefulDataLoader([1, 2]))\nimport warnings; warnings.warn('still on')\n")
    proc = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "set_vital" not in proc.stderr and "still on" in proc.stderr  # only torchdata's message is filtered
