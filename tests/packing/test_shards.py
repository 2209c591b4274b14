"""Shards: text in, the same documents and tokens out, through every reader; bad data is named."""

import io
import re
import json
import subprocess
import sys
import tarfile
import warnings
import zlib

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from packing import PackingSampler, StreamPacker, get_collator
from packing.data.shard_reader import ShardDataset, ShardStream, expand_shards
from packing.data.manifest import KINDS
from packing.data.shards import ShardWriter, iter_documents, write_shards
from shard_edit import downgrade, rehash, reseal

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


CHANGED = r"its length index shard-000000.lengths.npy does not match .*index.json \(SHA-256 \w{12}, the index records \w{12}\)"


@pytest.mark.parametrize(
    "damage, sealed, forged",
    [
        (lambda p: _truncate(p, 1700), r"shard .*shard-000000.tar is truncated: its tar has 1,700 bytes, .*index.json "
         r"records 10,240", r"shard .*shard-000000.tar is (corrupt or )?truncated"),
        (lambda p: p.write_bytes(b"\x01garbage" * 200), r"shard .*shard-000000.tar is truncated: its tar has 1,600 bytes",
         r"shard .*shard-000000.tar is corrupt or truncated"),
        (lambda p: p.with_name("shard-000000.lengths.npy").unlink(), r"has no length index shard-000000.lengths.npy",
         r"has no length index shard-000000.lengths.npy"),
        (lambda p: np.save(p.with_name("shard-000000.lengths.npy"), np.array([11, 3, 4])), CHANGED,
         r"its length index gives 3 docs, .*index.json records 2; the shard or the index changed"),
        # The right count, one length wrong: caught at the scan, so skip_corrupt skips it.
        (lambda p: np.save(p.with_name("shard-000000.lengths.npy"), np.load(p.with_name("shard-000000.lengths.npy")) + [0, 1]),
         CHANGED, r"its length index disagrees with its tar: document 000000001 is listed with \d+ tokens but its "
         r"tokens.npy member has \d+ bytes"),
    ],
    ids=["truncated", "garbage", "no-index", "index-mismatch", "index-disagrees"],
)
@pytest.mark.parametrize("forge", [False, True], ids=["sealed", "forged"])
def test_corrupt_shard_is_named_or_skipped_and_reported(tmp_path, corpus, damage, sealed, forged, forge):
    """Sealed: the index's hashes and sizes catch the damage. Forged (the index rewritten to vouch for
    the damaged files): the checks beneath them still do."""
    out, _ = written(tmp_path, corpus)
    damage(out / "shard-000000.tar")
    if forge:
        rehash(out)
    match = forged if forge else sealed
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


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _rewrite(path, members):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_pickled_npy_is_refused(tmp_path, corpus):
    out, _ = written(tmp_path, corpus, shard_size=10)
    path = out / "shard-000000.tar"
    members = _members(path)
    first = sorted(members)[0]  # 000000000.id.txt, then its tokens
    tokens_name = first.replace("id.txt", "tokens.npy")
    evil = io.BytesIO()
    np.save(evil, np.array([{"x": 1}] * 11, dtype=object), allow_pickle=True)
    # At another size than the index gives: refused when the shard is scanned.
    _rewrite(path, {**members, tokens_name: evil.getvalue()})
    rehash(out)  # the index forged to vouch for the new tar: the checks beneath it catch it
    with pytest.raises(ValueError, match=r"its length index disagrees with its tar: document 000000000 is listed "
                                         r"with 11 tokens but its tokens.npy member has \d+ bytes"):
        ShardDataset(out)
    # Cut to the right size and its checksum forged: the header asks for pickled objects, and
    # np.load(allow_pickle=False) refuses it before reading the data.
    size = len(members[tokens_name])
    payload = evil.getvalue()[:size].ljust(size, b"\0")
    _rewrite(path, {**members, tokens_name: payload})
    crc = np.load(out / "shard-000000.crc32.npy")
    crc[0] = zlib.crc32(payload)
    np.save(out / "shard-000000.crc32.npy", crc)
    rehash(out)
    with pytest.raises(ValueError, match=r"document 000000000 \(position 0\) is not a readable .npy"):
        ShardDataset(out)[0]


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
    rehash(out)
    with pytest.raises(ValueError, match=r"its length index shard-000000.lengths.npy is unreadable"):
        ShardDataset(out)
    np.save(sidecar, np.ones((2, 2), dtype=np.int64))
    rehash(out)
    with pytest.raises(ValueError, match=r"its length index is not a 1-D array of positive ints"):
        ShardDataset(out)
    (out / "shard-000001.tar").write_bytes(b"\x01junk" * 300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=rf"no readable shard in {re.escape(str(out))}: every shard was skipped as "
                                             r"corrupt"):
            ShardDataset(out, skip_corrupt=True)
    with ShardWriter(tmp_path / "empty", vocab_size=259, tokenizer="bytes"):
        pass  # an empty input: a set of no documents
    with pytest.raises(ValueError, match=r"no readable shard in .*empty: the set holds no documents"):
        ShardDataset(tmp_path / "empty")
    assert list(ShardStream(tmp_path / "empty")) == []  # a stream of it ends at once
    with pytest.raises(ValueError, match=r"already holds shards \(index.json\); choose an empty directory"):
        ShardWriter(out, vocab_size=259, tokenizer="bytes")
    bad_tok = tmp_path / "tok.json"
    bad_tok.write_text("{}")
    with pytest.raises(ValueError, match=r"is not a Hugging Face tokenizer.json"):
        write_shards(iter_documents(corpus), tmp_path / "x", tokenizer=str(bad_tok), progress=False)


def _flip(path, name, at):
    """Flip every bit of byte ``at`` of member ``name``'s payload, in place."""
    with tarfile.open(path) as tar:
        offset = tar.getmember(name).offset_data
    data = bytearray(path.read_bytes())
    data[offset + at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_every_flipped_byte_is_caught_naming_shard_key_and_checksums(tmp_path, corpus):
    """Issue 22: one byte flipped inside a document's tokens.npy, 12 trials (header and payload
    bytes): each is refused by both readers, naming the shard, the key and both checksums."""
    rng = np.random.default_rng(0)
    for trial in range(12):
        out, _ = written(tmp_path / str(trial), corpus, shard_size=10)
        path = out / "shard-000000.tar"
        doc = int(rng.integers(0, 4))
        name = f"{doc:09d}.tokens.npy"
        size = len(_members(path)[name])
        _flip(path, name, int(rng.integers(0, size)))
        message = rf"shard {path}: document {doc:09d} \(position {doc}\) is corrupt: its bytes have CRC-32 [0-9a-f]{{8}}, " \
                  rf"the writer recorded [0-9a-f]{{8}}"
        with pytest.raises(ValueError, match=message):
            ShardDataset(out)[doc]
        with pytest.raises(ValueError, match=message + r"; pass skip_corrupt=True to skip such documents"):
            list(ShardStream(out, shuffle=False))
        stream = ShardStream(out, shuffle=False, skip_corrupt=True)
        with pytest.warns(UserWarning, match=r"skipping shard .* is corrupt"):
            got = list(stream)
        assert len(got) == 3 and stream.position == 4  # the skipped document keeps its place
        assert [(p, k) for p, k, _ in stream.skipped_docs] == [(str(path), f"{doc:09d}")]


def test_old_format_reads_unverified_with_one_warning_and_ids_are_checked_against_the_vocabulary(tmp_path, corpus):
    out, _ = written(tmp_path, corpus, shard_size=2)
    downgrade(out, 1)
    with pytest.warns(UserWarning, match=r"shard set .* is varlen-packing-shards/1: its index.json has no checksum and "
                                         r"no hashes of its files, so a swapped, foreign or stale shard, or an edited "
                                         r"length index, goes undetected. Its documents have no checksums either. "
                                         r"Upgrade it in place with python -m packing.data.shards --upgrade "):
        ds = ShardDataset(out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per directory, not per shard or per reader
        assert [ds[i].tolist() for i in range(len(ds))] == [s.tolist() for s in ShardStream(out, shuffle=False)]
    # Unverified, a flipped high byte is still caught by the vocabulary (259 for bytes).
    path = out / "shard-000000.tar"
    _flip(path, "000000000.tokens.npy", 128 + 1)  # the high byte of token 0 ("c" of "caf..." or "h")
    with pytest.raises(ValueError, match=r"document 000000000 \(position 0\) has token id \d+ at token 0, at or above "
                                         r"the vocabulary size 259 in its index.json"):
        ds[0]
    # A format 2 set that lost a checksum file is refused, not read unverified.
    out2, _ = written(tmp_path / "v2", corpus, shard_size=2)
    downgrade(out2, 2)
    (out2 / "shard-000001.crc32.npy").unlink()
    with pytest.warns(UserWarning, match=r"is varlen-packing-shards/2: its index.json has no checksum"), \
            pytest.raises(ValueError, match=r"has no checksum file shard-000001.crc32.npy beside it, though its "
                                            r"index.json says varlen-packing-shards/2"):
        ShardDataset(out2)


def test_writer_refuses_ids_outside_the_vocabulary_and_non_integer_documents(tmp_path):
    with ShardWriter(tmp_path / "o", vocab_size=10, tokenizer="t") as w:
        with pytest.raises(ValueError, match=r"document 'a' has token id 10 at position 2, outside the vocabulary \[0, 10\)"):
            w.write("a", np.array([1, 2, 10]))
        with pytest.raises(TypeError, match=r"document 'b' is float64 \(3,\); write 1-D integer token ids"):
            w.write("b", np.array([1.0, 2.0, 3.0]))
        w.write("c", np.array([1, 2, 9]))
    assert ShardDataset(tmp_path / "o")[0].tolist() == [1, 2, 9]


READ_UNDER_ULIMIT = """
import resource, sys, warnings
import numpy as np
warnings.simplefilter("error")  # an unclosed file is a ResourceWarning: an error here
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from packing import PackingSampler
from packing.data.shard_reader import ShardDataset, ShardStream
ds = ShardDataset(sys.argv[1])
order = [i for batch in PackingSampler(ds.lengths, max_tokens=64, seed=0) for i in batch]  # shuffled: every shard, revisited
assert sorted(order) == list(range(len(ds)))
total = sum(int(ds[i].sum()) for i in order)
streamed = sum(int(d.sum()) for d in ShardStream(sys.argv[1], seed=1))
print(len(ds), total, streamed)
"""


def test_more_shards_than_the_open_file_limit_read_with_bounded_handles(tmp_path):
    """Issue 22: 1,100 shards failed with 'Too many open files' under ulimit 1024. Here 1,000 shards
    of 2 documents read under ulimit -n 256, in sampler order and streamed, with no unclosed-file
    warning. (100,000 shards under 256: measured once, benchmarks/results/data/shards_checksums.txt.)"""
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1024, rng.integers(1, 9)).astype(np.uint16) for _ in range(2000)]
    total = sum(int(d.sum()) for d in docs)
    assert read_under_ulimit(tmp_path, READ_UNDER_ULIMIT, docs, shard_size=2) == ["2000", str(total), str(total)]


def read_under_ulimit(tmp_path, script, docs, *, shard_size):
    """Write ``docs`` as shards of ``shard_size`` documents, run ``script`` over them in a process of
    its own (which sets ulimit -n 256), and return the words it printed."""
    with ShardWriter(tmp_path / "many", vocab_size=1024, tokenizer="t", shard_size=shard_size) as w:
        for i, d in enumerate(docs):
            w.write(f"d{i}", d)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "many")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


def test_cli_too_long_policy(tmp_path, corpus):
    """Issue 22 item 3: the shards CLI takes --max-len / --too-long, and says what it did."""
    def cli(out, *extra):
        return subprocess.run([sys.executable, "-m", "packing.data.shards", "--input", str(corpus), "--output",
                               str(tmp_path / out), *extra], capture_output=True, text=True, timeout=120)

    proc = cli("e", "--max-len", "100")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "document 'd.txt' has 300 tokens, over --max-len 100 (1 such documents); pass --too-long split" in proc.stderr
    proc = cli("s", "--max-len", "100", "--too-long", "split")
    assert proc.returncode == 0 and "split 1 documents over --max-len 100 into 3 chunks (no token dropped; " \
                                     "2 next-token targets lost at the cuts)" in proc.stdout
    ds = ShardDataset(tmp_path / "s")
    assert [ds.doc_id(i) for i in range(len(ds))][2:5] == ["d.txt[0:100]", "d.txt[100:200]", "d.txt[200:300]"]
    assert int(ds.lengths.sum()) == sum(map(len, TEXTS.values()))
    proc = cli("t", "--max-len", "100", "--too-long", "truncate")
    assert proc.returncode == 0 and "truncated 1 documents over --max-len 100, 200 tokens dropped" in proc.stdout
    assert int(ShardDataset(tmp_path / "t").lengths.max()) == 100
    proc = cli("z", "--max-len", "0")
    assert proc.returncode == 2 and "--max-len is 0" in proc.stderr


# -- the shards CLI as a new user meets it ---------------------------------------------------------

def cli(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "packing.data.shards", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_skips_hidden_and_binary_files_and_counts_each(tmp_path, corpus):
    (corpus / ".git" / "objects").mkdir(parents=True)
    (corpus / ".git" / "objects" / "ab").write_bytes(b"git object")
    (corpus / ".hidden.txt").write_bytes(b"secret")
    (corpus / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    proc = cli("--input", corpus, "--output", tmp_path / "o")
    assert proc.returncode == 0, proc.stderr
    assert "wrote 4 documents" in proc.stdout and "skipped 1 empty, 2 hidden, 1 binary" in proc.stdout
    index = json.loads((tmp_path / "o" / "index.json").read_text())
    assert index["skipped_files"] == {"hidden": 2, "binary": 1, "not_included": 0}
    assert sorted(ShardDataset(tmp_path / "o").doc_id(i) for i in range(4)) == sorted(TEXTS)


def test_cli_include_selects_files(tmp_path, corpus):
    (corpus / "notes.md").write_bytes(b"# not this one")
    proc = cli("--input", corpus, "--output", tmp_path / "o", "--include", "*.txt", "--include", "b/*")
    assert proc.returncode == 0 and "wrote 4 documents" in proc.stdout and "1 not included" in proc.stdout
    proc = cli("--input", corpus, "--output", tmp_path / "md", "--include", "*.md")
    assert proc.returncode == 0 and "wrote 1 documents" in proc.stdout


@pytest.mark.parametrize("setup, args, message", [
    ("empty-dir", [], "the input holds no document to write (skipped: nothing); point --input at text files"),
    ("only-hidden", [], "the input holds no document to write (skipped: 1 hidden)"),
    ("corpus", ["--include", "*.rst"], "the input holds no document to write (skipped: 5 not included)"),
    ("output-file", [], "--output 'OUT' is a file; give a new or empty directory for the shards"),
    ("jsonl", ["--include", "*.txt"], "--include selects files of a directory; --input 'IN' is one JSONL file"),
], ids=["empty-dir", "only-hidden", "nothing-included", "output-is-a-file", "include-with-jsonl"])
def test_cli_user_errors_are_one_line_and_leave_no_index(tmp_path, corpus, setup, args, message):
    src, out = corpus, tmp_path / "o"
    if setup in ("empty-dir", "only-hidden"):
        src = tmp_path / "in"
        src.mkdir()
        if setup == "only-hidden":
            (src / ".x").write_bytes(b"hidden")
    if setup == "output-file":
        out.write_text("not a directory")
    if setup == "jsonl":
        src = tmp_path / "d.jsonl"
        src.write_text('{"text": "a"}\n')
    proc = cli("--input", src, "--output", out, *args)
    expected = message.replace("OUT", str(out)).replace("IN", str(src))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (out / "index.json").exists()


def test_tokenizer_is_recorded_by_content_hash(tmp_path, corpus):
    import hashlib

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    digest = "sha256:" + hashlib.sha256((tmp_path / "tok" / "tokenizer.json").read_bytes()).hexdigest()
    proc = subprocess.run([sys.executable, "-m", "packing.data.shards", "--input", str(corpus), "--output", "o",
                           "--tokenizer", "tok/tokenizer.json"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "o" / "index.json").read_text())["tokenizer"] == digest


def test_a_write_that_fails_midway_leaves_no_index(tmp_path):
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        with ShardWriter(tmp_path / "o", vocab_size=10, tokenizer="t", shard_size=2) as w:
            for i in range(3):
                w.write(f"d{i}", np.array([1, 2, 3]))
            w.write("bad", np.array([99]))
    assert not (tmp_path / "o" / "index.json").exists()


def test_progress_lines_without_a_terminal(capsys):
    from packing.data.shards import Progress

    bar = Progress(4, every=0.0)  # stderr is captured here, not a terminal: plain lines
    for _ in range(2):
        bar.step()
    bar.close()
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("writing shards: 2 of 4 (50%) documents read, ")


def test_cli_too_long_without_max_len_is_an_error(tmp_path, corpus):
    proc = cli("--input", corpus, "--output", tmp_path / "o", "--too-long", "split")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "--too-long split needs --max-len N, the longest document to write" in proc.stderr
    assert not (tmp_path / "o").exists()


FOUR_READERS_UNDER_ULIMIT = """
import resource, sys, warnings
warnings.simplefilter("error")
resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
from packing.data.shard_reader import ShardDataset, ShardStream
readers = [ShardDataset(sys.argv[1]) for _ in range(4)]
totals = [sum(int(r[i].sum()) for i in range(len(r))) for r in readers]  # each reader touches every shard
streamed = [sum(int(d.sum()) for d in ShardStream(sys.argv[1], seed=k)) for k in range(2)]
print(len(set(totals + streamed)), totals[0])
"""


def test_the_descriptor_cap_holds_per_process_across_readers(tmp_path):
    # Four map-style readers and two streams over 2,000 shards under ulimit -n 256: before, each
    # reader kept its own 64 descriptors and the fourth hit EMFILE.
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 1024, 3).astype(np.uint16) for _ in range(2000)]
    assert read_under_ulimit(tmp_path, FOUR_READERS_UNDER_ULIMIT, docs, shard_size=1) == \
        ["1", str(sum(int(d.sum()) for d in docs))]


def _one_set(tmp_path, n=4, name="s"):
    with ShardWriter(tmp_path / name, vocab_size=259, tokenizer="bytes", shard_size=2) as w:
        for i in range(n):
            w.write(f"d{i}", np.array([1, 2, 3][: 1 + i % 3], dtype=np.uint16))
    return tmp_path / name


@pytest.mark.parametrize("name, match", [
    ("../elsewhere/shard-000000.tar", r"lists the shard '\.\./elsewhere/shard-000000\.tar'; a set's shards are bare "
                                      r"file names inside its directory"),
    ("/etc/passwd", r"lists the shard '/etc/passwd'; a set's shards are bare file names"),
    ("shard-000000.tar", r"lists the shard 'shard-000000\.tar' more than once; the index is corrupt"),
], ids=["dotdot", "absolute", "twice"])
def test_index_names_only_its_own_files_once(tmp_path, name, match):
    """Even sealed again (a valid checksum over the edit), a hostile entry is refused by name."""
    out = _one_set(tmp_path)
    reseal(out, lambda index: index["shards"][1].update(tar=name))
    with pytest.raises(ValueError, match=match):
        ShardDataset(out)


def test_a_fifo_a_symlink_out_and_a_missing_tar_are_named_and_skippable(tmp_path):
    import os

    out = _one_set(tmp_path)
    foreign = _one_set(tmp_path, name="foreign")
    (tmp_path / "copy").write_bytes((out / "shard-000001.tar").read_bytes())
    (out / "shard-000001.tar").unlink()
    os.mkfifo(out / "shard-000001.tar")  # reading it would block forever
    with pytest.raises(ValueError, match=r"shard .*shard-000001\.tar: its tar is not a regular file \(mode p"):
        ShardDataset(out)
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar").symlink_to(foreign / "shard-000001.tar")
    with pytest.raises(ValueError, match=r"shard-000001\.tar: its tar is a symlink out of its directory, to "):
        ShardDataset(out)
    (out / "shard-000001.tar").unlink()
    (out / "shard-000001.tar").symlink_to(out / "shard-000001.tar")  # a loop
    with pytest.raises(ValueError, match=r"shard-000001\.tar: its tar cannot be opened \(Too many levels of symbolic"):
        ShardDataset(out)
    (out / "shard-000001.tar").unlink()
    (out / "kept").mkdir()  # a symlink inside the directory, to the set's own bytes, is followed
    (out / "kept" / "one.tar").write_bytes((foreign.parent / "copy").read_bytes())
    (out / "shard-000001.tar").symlink_to(out / "kept" / "one.tar")
    assert len(ShardDataset(out)) == 4
    (out / "shard-000001.tar").unlink()  # deleted, its sidecars kept
    with pytest.raises(ValueError, match=r"shard-000001\.tar: its tar cannot be opened \(No such file"):
        ShardDataset(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ShardDataset(out, skip_corrupt=True)  # an OS error is ours now, so it can be skipped
    assert len(ds) == 2 and len(ds.skipped) == 1


def test_a_fifo_swapped_in_after_the_open_is_named_not_waited_on(tmp_path):
    import os

    from packing.data.shard_reader import _ShardFiles

    out = _one_set(tmp_path)
    ds = ShardDataset(out)
    first = ds[0]
    (out / "shard-000000.tar").unlink()
    os.mkfifo(out / "shard-000000.tar")  # no writer: a blocking open would wait forever
    _ShardFiles.close()  # as if evicted from the descriptor table: the next read reopens the path
    with pytest.raises(ValueError, match=r"shard .*shard-000000\.tar cannot be read at byte \d+ \(Illegal seek\)"):
        ds[0]
    assert first.tolist() == [1]


@pytest.mark.parametrize("vocab", [None, 10**12, "259", 0, True], ids=["null", "huge", "string", "zero", "bool"])
def test_vocab_size_is_validated_at_open(tmp_path, vocab):
    out = _one_set(tmp_path)
    reseal(out, lambda index: index.update(vocab_size=vocab))
    with pytest.raises(ValueError, match=rf"index.json has vocab_size {re.escape(repr(vocab))}; expected an int in "
                                         r"\[1, 65,536\] \(its dtype uint16\)"):
        ShardDataset(out)


def test_the_writer_refuses_a_vocabulary_its_ids_cannot_hold(tmp_path):
    with pytest.raises(ValueError, match=r"vocab_size is 8589934592; shards store ids as uint16 or uint32, so it must "
                                         r"be an int in \[1, 4,294,967,296\]"):
        ShardWriter(tmp_path / "o", vocab_size=2**33, tokenizer="t")


def test_keys_past_a_billion_documents_read_in_order(tmp_path):
    w = ShardWriter(tmp_path / "o", vocab_size=259, tokenizer="bytes", shard_size=10)
    w.summary["docs"] = 999_999_998  # the shard that crosses into 10-digit keys
    for i in range(4):
        w.write(f"d{i}", np.arange(1, i + 2, dtype=np.uint16))
    w.close()

    def before(index):  # the 999,999,998 documents before it, as an entry of the set (never read)
        entry = {"tar": "earlier.tar", **{k: f"earlier.{k}.npy" for k in ("lengths", "crc32", "idcrc32")},
                 "docs": 999_999_998, "tokens": 999_999_998, "bytes": 0, "sha256": dict.fromkeys(KINDS, "0" * 64)}
        index["shards"].insert(0, entry)
        index["tokens"] += entry["tokens"]

    reseal(tmp_path / "o", before)
    ds = ShardDataset(str(tmp_path / "o" / "shard-000000.tar"))
    assert [ds.doc_id(i) for i in range(4)] == ["d0", "d1", "d2", "d3"] and ds.lengths.tolist() == [1, 2, 3, 4]
