"""Shards: text in, the same documents and tokens out, through every reader; bad data is named."""

import io
import json
import subprocess
import sys
import tarfile
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from packing import PackingSampler, StreamPacker, get_collator
from packing.data.shard_reader import ShardDataset, ShardStream, expand_shards
from packing.data.shards import ShardWriter, iter_documents, write_shards

TEXTS = {"a.txt": b"hello world", "b/c.txt": b"caf\xe9 \xff\xfe not utf-8", "d.txt": b"x" * 300, "e.txt": b"short"}


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "texts"
    for name, data in {**TEXTS, "empty.txt": b""}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)
    return src


def written(tmp_path, corpus, shard_size=2):
    out = tmp_path / "shards"
    summary = write_shards(iter_documents(corpus), out, shard_size=shard_size, progress=False)
    return out, summary


def test_documents_and_tokens_in_equal_out(tmp_path, corpus):
    out, summary = written(tmp_path, corpus)
    assert (summary["docs"], summary["skipped_empty"], summary["tokens"]) == (4, 1, sum(map(len, TEXTS.values())))
    ds = ShardDataset(out)
    got = {ds.doc_id(i): bytes(ds[i].numpy().astype(np.uint8)) for i in range(len(ds))}
    assert got == TEXTS  # every byte, invalid UTF-8 included
    assert ds.lengths.tolist() == [len(TEXTS[k]) for k in sorted(TEXTS)]
    index = json.loads((out / "index.json").read_text())
    assert [s["docs"] for s in index["shards"]] == [2, 2] and index["vocab_size"] == 259


def test_jsonl_input_keeps_ids_and_invalid_bytes(tmp_path):
    src = tmp_path / "data.jsonl"
    src.write_bytes(b'{"id": "x1", "text": "abc"}\n\n{"text": "caf\xe9"}\n{"text": ""}\n')
    out = tmp_path / "out"
    summary = write_shards(iter_documents(src), out, progress=False)
    ds = ShardDataset(out)
    assert (summary["docs"], summary["skipped_empty"]) == (2, 1)
    assert [ds.doc_id(i) for i in range(2)] == ["x1", "data.jsonl:3"]
    assert bytes(ds[1].numpy().astype(np.uint8)) == b"caf\xe9"


@pytest.mark.parametrize(
    "line, match",
    [(b"{not json\n", r"line 2 of bad.jsonl is not valid JSON"),
     (b'{"body": "x"}\n', r"line 2 of bad.jsonl has no string 'text' field")],
)
def test_bad_jsonl_names_the_line(tmp_path, line, match):
    src = tmp_path / "bad.jsonl"
    src.write_bytes(b'{"text": "ok"}\n' + line)
    with pytest.raises(ValueError, match=match):
        list(iter_documents(src))


def test_bos_eos_and_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "hello world hello"}\n{"text": "world zzz"}\n')
    write_shards(iter_documents(src), tmp_path / "hf", tokenizer=str(path), progress=False)
    ds = ShardDataset(tmp_path / "hf")
    assert [ds[i].tolist() for i in range(2)] == [[1, 2, 1], [2, 0]]
    write_shards(iter_documents(src), tmp_path / "b", add_bos=True, add_eos=True, progress=False)
    assert ShardDataset(tmp_path / "b")[1].tolist() == [257, *b"world zzz", 258]
    with pytest.raises(ValueError, match=r"--add-bos/--add-eos work with --tokenizer bytes"):
        write_shards(iter_documents(src), tmp_path / "c", tokenizer=str(path), add_bos=True, progress=False)


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: _truncate(p, 1700), r"shard .*shard-000000.tar is (corrupt or )?truncated"),
        (lambda p: p.write_bytes(b"\x01garbage" * 200), r"shard .*shard-000000.tar is corrupt or truncated"),
        (lambda p: p.with_name("shard-000000.lengths.npy").unlink(), r"has no length index shard-000000.lengths.npy"),
        (lambda p: np.save(p.with_name("shard-000000.lengths.npy"), np.array([11, 3, 4])),
         r"2 token arrays and 2 ids for 3 documents"),
    ],
    ids=["truncated", "garbage", "no-index", "index-mismatch"],
)
def test_corrupt_shard_is_named_or_skipped_and_reported(tmp_path, corpus, damage, match):
    out, _ = written(tmp_path, corpus)
    damage(out / "shard-000000.tar")
    with pytest.raises(ValueError, match=match + r".*pass skip_corrupt=True"):
        ShardDataset(out)
    with pytest.raises(ValueError, match=match):
        list(ShardStream(out))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ShardDataset(out, skip_corrupt=True)
        streamed = list(ShardStream(out, skip_corrupt=True, shuffle=False))
    assert [p for p, _ in ds.skipped] == [str(out / "shard-000000.tar")] and len(ds) == 2
    assert len(streamed) == 2 and any("skipping shard" in str(w.message) for w in caught)


def test_pickled_npy_is_refused(tmp_path, corpus):
    out, _ = written(tmp_path, corpus, shard_size=10)
    evil = io.BytesIO()
    np.save(evil, np.array([{"x": 1}] * 11, dtype=object), allow_pickle=True)
    path = out / "shard-000000.tar"
    names, members = [], {}
    with tarfile.open(path) as tar:
        for m in tar:
            names.append(m.name)
            members[m.name] = tar.extractfile(m).read()
    members[names[0]] = evil.getvalue()
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = len(members[name])
            tar.addfile(info, io.BytesIO(members[name]))
    ds = ShardDataset(out)
    with pytest.raises(ValueError, match=r"document 0 is not a readable .npy"):
        ds[0]


def test_stream_through_packer_and_workers_loses_nothing(tmp_path, corpus):
    out, _ = written(tmp_path, corpus, shard_size=1)
    for workers in (0, 2):
        packs = StreamPacker(ShardStream(out, seed=1), max_tokens=400, buffer_size=3)
        loader = DataLoader(packs, batch_size=None, collate_fn=get_collator("concat"), num_workers=workers)
        docs = sorted(bytes(s.input_ids.numpy().astype(np.uint8)) for b in loader for s in b.split())
        assert docs == sorted(TEXTS.values()), workers


def test_stream_shuffles_shards_per_epoch(tmp_path, corpus):
    out, _ = written(tmp_path, corpus, shard_size=1)
    stream = ShardStream(out, seed=0, with_ids=True)
    orders = []
    for epoch in range(4):
        stream.set_epoch(epoch)
        orders.append([d["id"] for d in stream])
    assert all(sorted(o) == sorted(TEXTS) for o in orders) and len({tuple(o) for o in orders}) > 1


def test_map_style_loader_same_batches_with_0_and_2_workers(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "s", vocab_size=1024, tokenizer="synthetic", shard_size=50) as w:
        for i in range(300):
            w.write(f"d{i}", rng.integers(1, 1024, rng.integers(1, 200)).astype(np.uint16))
    ds = ShardDataset(str(tmp_path / "s" / "shard-{000000..000005}.tar"))

    def batches(workers):
        sampler = PackingSampler(ds.lengths, max_tokens=1024, seed=3)
        kw = dict(persistent_workers=True, prefetch_factor=4) if workers else {}
        loader = DataLoader(ds, batch_sampler=sampler, collate_fn=get_collator("concat"), num_workers=workers, **kw)
        return [b.input_ids for b in loader]

    serial, parallel = batches(0), batches(2)
    assert len(serial) == len(parallel) and all(torch.equal(a, b) for a, b in zip(serial, parallel))
    assert sum(int(x.numel()) for x in serial) == int(ds.lengths.sum())


def test_expand_shards_errors(tmp_path):
    with pytest.raises(ValueError, match=r"no shard at '.*missing-000000.tar'"):
        expand_shards(str(tmp_path / "missing-{000000..000001}.tar"))
    with pytest.raises(ValueError, match=r"has no index.json; write shards with python -m packing.data.shards"):
        expand_shards(str(tmp_path))


@pytest.mark.parametrize(
    "args, message",
    [(["--input", "/nonexistent/x.jsonl", "--output", "OUT"], "--input '/nonexistent/x.jsonl' does not exist"),
     (["--input", "IN", "--output", "OUT", "--tokenizer", "/nope/tokenizer.json"], "tokenizer file '/nope/tokenizer.json' does not exist"),
     (["--input", "IN", "--output", "OUT", "--shard-size", "0"], "--shard-size is 0; expected a positive int")],
)
def test_cli_errors_are_one_line(tmp_path, corpus, args, message):
    args = [a.replace("IN", str(corpus)).replace("OUT", str(tmp_path / "o")) for a in args]
    proc = subprocess.run([sys.executable, "-m", "packing.data.shards", *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr


def test_cli_writes_shards(tmp_path, corpus):
    proc = subprocess.run([sys.executable, "-m", "packing.data.shards", "--input", str(corpus), "--output",
                           str(tmp_path / "o"), "--shard-size", "3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "wrote 4 documents" in proc.stdout and "skipped 1 empty" in proc.stdout


def test_more_shard_errors(tmp_path, corpus):
    out, _ = written(tmp_path, corpus)
    sidecar = out / "shard-000000.lengths.npy"
    sidecar.write_bytes(b"not npy")
    with pytest.raises(ValueError, match=r"its length index shard-000000.lengths.npy is unreadable"):
        ShardDataset(out)
    np.save(sidecar, np.ones((2, 2), dtype=np.int64))
    with pytest.raises(ValueError, match=r"its length index is not a 1-D array of positive ints"):
        ShardDataset(out)
    (out / "shard-000001.tar").write_bytes(b"\x01junk" * 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"no readable shard in"):
            ShardDataset(out, skip_corrupt=True)
    with pytest.raises(ValueError, match=r"already holds shards \(index.json\); choose an empty directory"):
        ShardWriter(out, vocab_size=259, tokenizer="bytes")
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{}")
    with pytest.raises(ValueError, match=r"is not a Hugging Face tokenizer.json"):
        write_shards(iter_documents(corpus), tmp_path / "x", tokenizer=str(bad_tok), progress=False)
