"""A shard set is written atomically: a writer killed at any point leaves no index, a re-run starts
clean, and a second writer into the same directory is refused."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from packing.data.shard_reader import ShardDataset
from packing.data.shards import ShardWriter

WORKER = Path(__file__).with_name("shard_writer_worker.py")
ROOT = Path(__file__).resolve().parents[2]
DOCS = 10  # shards of 4: 4 + 4 + 2


def run(out, sig, point, docs=DOCS):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(WORKER), str(out), str(docs), sig, point], env=env,
                          capture_output=True, text=True, timeout=120)


# Before the first document, mid-shard, at a shard boundary, in the last shard; and during the
# commit: the first shard moved, the last sidecar moved, index.json's rename (the 13th replace: 3 shards of 4 files).
POINTS = ["doc:0", "doc:2", "doc:4", "doc:9", "commit:1", "commit:12", "commit:13"]


@pytest.mark.parametrize("point", POINTS)
@pytest.mark.parametrize("sig", ["INT", "KILL"])
def test_a_killed_writer_leaves_no_set_and_a_rerun_starts_clean(tmp_path, sig, point):
    out = tmp_path / "shards"
    proc = run(out, sig, point)
    assert proc.returncode == -getattr(signal, f"SIG{sig}"), proc.stderr  # died of the signal
    if sig == "INT":  # Ctrl-C: the error says nothing was written
        assert "KeyboardInterrupt" in proc.stderr and f"nothing was written to '{out}': no index.json" in proc.stderr
    assert not (out / "index.json").exists()
    with pytest.raises(ValueError, match=r"has no index.json; write shards with python -m packing.data.shards"):
        ShardDataset(out)
    again = run(out, "NONE", "doc:0")  # the same command again: a whole set, nothing of the killed run
    assert again.returncode == 0, again.stderr
    ds = ShardDataset(out)
    assert [ds.doc_id(i) for i in range(len(ds))] == [f"d{i}" for i in range(DOCS)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "index.json"] + [f"shard-00000{k}.{ext}" for k in range(3) for ext in ("tar", "lengths.npy", "crc32.npy", "idcrc32.npy")])


def test_an_exception_in_the_block_leaves_no_set_and_says_so(tmp_path):
    out = tmp_path / "o"
    with pytest.raises(ValueError, match=r"outside the vocabulary") as caught:
        with ShardWriter(out, vocab_size=10, tokenizer="t", shard_size=2) as w:
            for i in range(5):
                w.write(f"d{i}", np.array([1, 2]))
            w.write("bad", np.array([99]))
    assert caught.value.__notes__ == [f"nothing was written to '{out}': no index.json, the partial shards removed"]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_a_second_writer_is_refused_by_name(tmp_path):
    out = tmp_path / "o"
    first = ShardWriter(out, vocab_size=10, tokenizer="t")
    with pytest.raises(ValueError, match=rf"--output '{out}' is being written by another writer \(pid {os.getpid()}\); "
                                         r"wait for it to finish, or choose another directory"):
        ShardWriter(out, vocab_size=10, tokenizer="t")
    proc = subprocess.run([sys.executable, "-m", "packing.data.shards", "--input", str(WORKER), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)  # another process: refused too
    assert proc.returncode == 2 and "is being written by another writer" in proc.stderr
    first.write("a", np.array([1, 2, 3]))
    first.close()
    assert len(ShardDataset(out)) == 1
    with pytest.raises(ValueError, match=r"already holds shards \(index.json\); choose an empty directory"):
        ShardWriter(out, vocab_size=10, tokenizer="t")


def test_cli_too_long_error_leaves_no_index(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.txt").write_text("short")
    (src / "b.txt").write_text("x" * 50)
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, "-m", "packing.data.shards", "--input", str(src), "--output", str(out),
                           "--max-len", "10"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "document 'b.txt' has 50 tokens, over --max-len 10" in proc.stderr
    assert f"nothing was written to '{out}': no index.json" in proc.stderr
    assert not (out / "index.json").exists()


def test_a_torn_index_is_named(tmp_path):
    out = tmp_path / "o"
    with ShardWriter(out, vocab_size=10, tokenizer="t") as w:
        w.write("a", np.array([1, 2]))
    text = (out / "index.json").read_text()
    (out / "index.json").write_text(text[: len(text) // 2])
    with pytest.raises(ValueError, match=rf"{out / 'index.json'} is unreadable \("):
        ShardDataset(out)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_stopped_by_a_signal_says_nothing_was_written(tmp_path, sig):
    # A corpus large enough to be mid-write when the signal comes.
    src = tmp_path / "in.jsonl"
    src.write_text("".join('{"text": "%s"}\n' % ("word " * 200) for _ in range(40_000)))
    out = tmp_path / "o"
    proc = subprocess.Popen([sys.executable, "-m", "packing.data.shards", "--input", str(src), "--output", str(out),
                             "--no-progress", "--shard-size", "100"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    import time
    deadline = time.monotonic() + 60
    while not (out / ".staging").exists() or not any((out / ".staging").iterdir()):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    assert err.count("\n") == 1 and f"interrupted ({signal.Signals(sig).name}); nothing was written to '{out}'" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


def test_an_index_that_is_not_an_object_is_named(tmp_path):
    out = tmp_path / "o"
    with ShardWriter(out, vocab_size=10, tokenizer="t") as w:
        w.write("a", np.array([1, 2]))
    (out / "index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=rf"{out / 'index.json'} is not a shard index \(a JSON object\)"):
        ShardDataset(out)
