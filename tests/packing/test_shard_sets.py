"""A shard set is one verified unit: nothing swapped, foreign, stale or twice is read, and a resume
cannot drift. Each test is a fault found by injection, with its message pinned."""

import json
import os
import random
import shutil
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from packing import StreamPacker
from packing.data.manifest import checksum
from packing.data.shard_reader import ShardDataset, ShardStream, expand_shards
from packing.data.shards import ShardWriter
from shard_edit import downgrade, reseal

DOCS, SHARD_SIZE = 40, 5  # 8 shards


def write(out, docs=DOCS, offset=1, shard_size=SHARD_SIZE, lengths=None):
    """Documents of 3 to 9 tokens (the same lengths for the same ``docs``), each document's tokens
    ``offset + 10 i + k``; ``offset`` gives the same lengths other tokens (a re-tokenization)."""
    rng = np.random.default_rng(0)
    with ShardWriter(out, vocab_size=60_000, tokenizer="bytes", shard_size=shard_size) as w:
        for i in range(docs):
            n = int(lengths[i]) if lengths is not None else int(rng.integers(3, 10))
            w.write(f"doc{i}", (np.arange(n) + 10 * i + offset).astype(np.uint16))
    return out


def ids(stream):
    return [d["id"] for d in stream]


def swap(out, a, b):
    """Exchange shard ``a``'s four files with shard ``b``'s (same sizes when the shards are alike)."""
    for ext in ("tar", "lengths.npy", "crc32.npy", "idcrc32.npy"):
        pa, pb = out / f"shard-{a:06d}.{ext}", out / f"shard-{b:06d}.{ext}"
        tmp = out / "swap.tmp"
        os.replace(pa, tmp)
        os.replace(pb, pa)
        os.replace(tmp, pb)


# -- membership -------------------------------------------------------------------------------------


def test_a_swapped_shard_is_refused_even_at_the_same_size(tmp_path):
    out = write(tmp_path / "s", lengths=[4] * DOCS)  # every shard the same size
    assert (out / "shard-000001.tar").stat().st_size == (out / "shard-000002.tar").stat().st_size
    swap(out, 1, 2)  # the length indexes are alike too: the keys give the swap away
    with pytest.raises(ValueError, match=r"shard-000001.tar: its document 0 has key 000000010, but its place in the set "
                                         r"gives 000000005; the shard came from another position or set"):
        ShardDataset(out)
    swap(out, 1, 2)
    write(tmp_path / "t")  # lengths of their own: the length indexes' hashes differ
    swap(tmp_path / "t", 1, 2)
    with pytest.raises(ValueError, match=r"shard-000001.tar: its length index shard-000001.lengths.npy does not match "
                                         r".*index.json \(SHA-256 \w{12}, the index records \w{12}\): it was replaced"):
        list(ShardStream(tmp_path / "t", shuffle=False))


def test_a_foreign_shard_is_refused(tmp_path):
    out, other = write(tmp_path / "s"), write(tmp_path / "o", offset=5)  # the same lengths, other tokens
    for ext in ("tar", "lengths.npy", "crc32.npy", "idcrc32.npy"):  # all of shard 3's files
        shutil.copy(other / f"shard-000003.{ext}", out / f"shard-000003.{ext}")
    with pytest.raises(ValueError, match=r"shard-000003.tar: its checksum file shard-000003.crc32.npy does not match"):
        ShardDataset(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = ShardDataset(out, skip_corrupt=True)  # skipped and reported, never read
        streamed = ids(ShardStream(out, shuffle=False, with_ids=True, skip_corrupt=True))
    assert len(ds) == DOCS - SHARD_SIZE and [p for p, _ in ds.skipped] == [str(out / "shard-000003.tar")]
    assert streamed == [f"doc{i}" for i in range(DOCS) if not 15 <= i < 20]


def test_a_shard_moved_from_another_position_is_refused_by_its_keys(tmp_path):
    """A forger who also rewrites the index's hashes still cannot move a shard: its keys are its set
    positions."""
    out = write(tmp_path / "s", lengths=[4] * DOCS)
    swap(out, 1, 2)

    def follow(index):  # the entries vouch for the swapped files
        index["shards"][1]["sha256"], index["shards"][2]["sha256"] = index["shards"][2]["sha256"], index["shards"][1]["sha256"]

    reseal(out, follow)
    with pytest.raises(ValueError, match=r"shard-000001.tar: its document 0 has key 000000010, but its place in the set "
                                         r"gives 000000005; the shard came from another position or set"):
        ShardDataset(out)


def test_every_bit_flip_in_the_index_is_refused(tmp_path):
    out = write(tmp_path / "s")
    clean = (out / "index.json").read_bytes()
    rng = random.Random(0)
    for _ in range(150):
        at, bit = rng.randrange(len(clean)), 1 << rng.randrange(8)
        (out / "index.json").write_bytes(clean[:at] + bytes([clean[at] ^ bit]) + clean[at + 1:])
        with pytest.raises(ValueError, match=r"index.json (is unreadable|fails its checksum|is not a shard index|has format)"):
            ShardDataset(out)
    # The flip the injection found: shard-000001.tar named shard-000003.tar (read twice, 1 never).
    (out / "index.json").write_bytes(clean.replace(b'"tar": "shard-000001.tar"', b'"tar": "shard-000003.tar"'))
    with pytest.raises(ValueError, match=r"index.json fails its checksum \(it records '\w{16}', its contents give "
                                         r"'\w{16}'\): the index was edited or corrupted; restore it, or rewrite the set"):
        ShardStream(out)


def test_a_dropped_entry_or_a_wrong_total_is_refused(tmp_path):
    out = write(tmp_path / "s")
    reseal(out, lambda index: index["shards"].pop())  # the last shard's entry gone, the totals kept
    with pytest.raises(ValueError, match=rf"index.json records {DOCS} docs in all, but its shards' entries add up to "
                                         rf"{DOCS - SHARD_SIZE:,}; the index is corrupt"):
        ShardDataset(out)


def _checksummed(out, edit):
    """Apply ``edit`` and recompute only the index's checksum (the set id is left as edited)."""
    meta = json.loads((out / "index.json").read_text())
    edit(meta)
    meta["checksum"] = checksum(meta)
    (out / "index.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.pop("set_id"), r"mis-states its set_id None \(its shards' hashes give '\w{32}'\)"),
    (lambda m: m.update(set_id="0" * 32), r"mis-states its set_id '0{32}' \(its shards' hashes give '\w{32}'\)"),
    (lambda m: m.pop("tokens"), r"mis-states its total tokens \(None\)"),
    (lambda m: m.update(docs=-1), r"mis-states its total docs \(-1\)"),
    (lambda m: m.update(shards={"a": 1}), r"index.json is not a shard index \(a JSON object\)"),
    (lambda m: m["shards"][0].update(docs=True), r"the entry of shard 'shard-000000.tar' lacks, or mis-states, its "
                                                 r"files' names, hashes, docs, tokens or bytes; the index is corrupt"),
], ids=["no-set-id", "wrong-set-id", "no-total", "negative-total", "shards-not-a-list", "bool-docs"])
def test_a_manifest_field_missing_or_mis_stated_is_refused(tmp_path, edit, match):
    out = write(tmp_path / "s")
    _checksummed(out, edit)
    with pytest.raises(ValueError, match=match):
        ShardStream(out)


def test_a_glob_reads_only_the_sets_own_shards(tmp_path):
    out = write(tmp_path / "s")
    for ext in ("tar", "lengths.npy", "crc32.npy", "idcrc32.npy"):  # a stale shard, as a killed run left one
        shutil.copy(out / f"shard-000000.{ext}", out / f"shard-000009.{ext}")
    with pytest.raises(ValueError, match=r"shard .*shard-000009.tar is not listed in .*index.json: it is stale \(left "
                                         r"by another write\) or foreign \(another set's\); read the set by its "
                                         r"directory, or list only its shards"):
        ShardStream(str(out / "*.tar"))
    assert len(expand_shards(str(out / "shard-00000[0-7].tar"))) == 8  # a glob of the listed shards reads
    with pytest.raises(ValueError, match=r"shard .*shard-000002.tar is named twice; each shard is read once"):
        ShardDataset([str(out / "shard-000002.tar"), str(out / "shard-000002.tar")])
    loose = tmp_path / "loose"
    loose.mkdir()
    shutil.copy(out / "shard-000000.tar", loose / "shard-000000.tar")
    with pytest.raises(ValueError, match=r"loose' has no index.json; write shards with python -m packing.data.shards "
                                         r"\(a shard is read as part of its set: copy a set's directory whole\)"):
        ShardDataset(str(loose / "shard-000000.tar"))


def test_an_id_flip_is_caught(tmp_path):
    out = write(tmp_path / "s")
    import tarfile

    path = out / "shard-000000.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmember("000000002.id.txt").offset_data
    data = bytearray(path.read_bytes())
    data[offset + 3] ^= 0x01  # "doc2" -> "doc3": another document's id
    path.write_bytes(bytes(data))
    ds = ShardDataset(out)
    with pytest.raises(ValueError, match=r"shard-000000.tar: the id of document 000000002 \(position 2\) is corrupt: "
                                         r"its bytes have CRC-32 \w{8}, the writer recorded \w{8}"):
        ds.doc_id(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stream = ShardStream(out, shuffle=False, with_ids=True, skip_corrupt=True)
        assert ids(stream)[:3] == ["doc0", "doc1", "doc3"] and len(stream.skipped_docs) == 1


# -- resume ---------------------------------------------------------------------------------------


def _partial(stream, n):
    it = iter(stream)
    taken = [next(it)["id"] for _ in range(n)]
    return taken, stream.state_dict()


def test_a_swap_between_save_and_resume_is_refused(tmp_path):
    """Names and sizes unchanged (the old fingerprint took it): a consumed shard's length index fails
    its check when the resume is placed; alike length indexes pass it, and the swapped shard is
    refused by its keys when it is read."""
    for lengths in (None, [4] * DOCS):
        out = write(tmp_path / f"s{lengths is None}", lengths=lengths)
        stream = ShardStream(out, seed=1, with_ids=True)
        _, state = _partial(stream, 17)
        consumed, waiting = stream.share()[0], stream.share()[-1]
        swap(out, int(consumed[-10:-4]), int(waiting[-10:-4]))
        resumed = ShardStream(out, seed=1, with_ids=True)
        if lengths is None:
            with pytest.raises(ValueError, match=r"cannot place a resume exactly: shard .*'s length index fails its "
                                                 r"check \(.*does not match .*\); restore the shard, or start the epoch "
                                                 r"afresh"):
                resumed.load_state_dict(state)
            continue
        resumed.load_state_dict(state)
        with pytest.raises(ValueError, match=r"its document 0 has key \d+, but its place in the set gives \d+"):
            list(resumed)


def test_a_retokenization_between_save_and_resume_is_refused(tmp_path):
    out = write(tmp_path / "s")
    _, state = _partial(ShardStream(out, seed=1, with_ids=True), 17)
    shutil.rmtree(out)
    write(out, offset=7)  # the same lengths, other ids, in place
    with pytest.raises(ValueError, match=r"ShardStream state is from another shard set \(fingerprint '\w+', these 8 "
                                         r"shards give '\w+'\); resume with the shards it was saved with"):
        ShardStream(out, seed=1, with_ids=True).load_state_dict(state)


def test_a_length_changed_in_a_consumed_shard_is_refused(tmp_path):
    out = write(tmp_path / "s")
    stream = ShardStream(out, seed=1, with_ids=True)
    _, state = _partial(stream, 17)
    consumed = stream.share()[0]
    lengths = np.load(consumed.replace(".tar", ".lengths.npy"))
    lengths[0] += 1
    np.save(consumed.replace(".tar", ".lengths.npy"), lengths)
    with pytest.raises(ValueError, match=r"cannot place a resume exactly"):
        ShardStream(out, seed=1, with_ids=True).load_state_dict(state)


DROP = object()  # a key the forged state lacks


@pytest.mark.parametrize("edit, match", [
    ({"position": -5}, r"ShardStream state has position -5; expected an int >= 0 \(documents taken\)"),
    ({"position": 10**9}, rf"ShardStream state has position 1,000,000,000, but this share of epoch 0 holds {DOCS} "
                          r"documents; the state is corrupt or from other data"),
    ({"position": True}, r"ShardStream state has position True; expected an int >= 0"),
    ({"position": "5"}, r"ShardStream state has position '5'; expected an int >= 0"),
    ({"epoch": 1.5}, r"ShardStream state has epoch 1.5; expected an int >= 0"),
    ({"epoch": -1}, r"ShardStream state has epoch -1; expected an int >= 0"),
    ({"position": DROP, "worker": DROP}, r"ShardStream state lacks \['position', 'worker'\]; it is not a ShardStream "
                                          r"state, or it is truncated: resume from a whole saved state"),
], ids=["negative", "past-the-end", "bool", "string", "float-epoch", "negative-epoch", "truncated"])
def test_a_forged_position_is_refused(tmp_path, edit, match):
    out = write(tmp_path / "s")
    state = {**ShardStream(out).state_dict(), **edit}
    state = {k: v for k, v in state.items() if v is not DROP}
    with pytest.raises(ValueError, match=match):
        ShardStream(out).load_state_dict(state)


def test_set_epoch_across_a_saved_state(tmp_path):
    out = write(tmp_path / "s")
    epoch = {e: ids(_at(ShardStream(out, seed=2, with_ids=True), e)) for e in (0, 1)}
    assert sorted(epoch[0]) == sorted(epoch[1]) and epoch[0] != epoch[1]
    # Saved after epoch 0's last document, restored, then set_epoch(1): all of epoch 1 (it yielded 0).
    done = ShardStream(out, seed=2, with_ids=True)
    ids(done)
    for first in (True, False):  # load then set_epoch, and set_epoch then load
        again = ShardStream(out, seed=2, with_ids=True)
        if first:
            again.load_state_dict(done.state_dict())
            again.set_epoch(1)
        else:
            again.set_epoch(1)
            again.load_state_dict(done.state_dict())
        assert ids(again) == epoch[1]
    # Saved mid-epoch: its own epoch resumes exactly; another is refused, either way round.
    taken, state = _partial(ShardStream(out, seed=2, with_ids=True), 7)
    same = ShardStream(out, seed=2, with_ids=True)
    same.load_state_dict(state)
    same.set_epoch(0)
    assert taken + ids(same) == epoch[0]
    message = (r"set_epoch\(1\) with a ShardStream state saved mid-way through epoch 0 \(at 7 of this share's 40 "
               r"documents\): the state resumes epoch 0; call set_epoch\(0\) to finish it, or do not load the state "
               r"to start epoch 1 from its beginning")
    other = ShardStream(out, seed=2, with_ids=True)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=message):
        other.set_epoch(1)
    other = ShardStream(out, seed=2, with_ids=True)
    other.set_epoch(1)
    with pytest.raises(ValueError, match=message):
        other.load_state_dict(state)


def _at(stream, epoch):
    stream.set_epoch(epoch)
    return stream


def test_a_packer_with_documents_waiting_refuses_another_epoch(tmp_path):
    out = write(tmp_path / "s")
    packer = StreamPacker(ShardStream(out, seed=2), max_tokens=24, buffer_size=64)
    packs = list(packer)
    running = StreamPacker(ShardStream(out, seed=2), max_tokens=24, buffer_size=64)
    it = iter(running)
    for _ in range(len(packs) - 2):  # the source is read to its end (the buffer holds it all); two packs wait
        next(it)
    state = running.state_dict()
    assert state["source"]["position"] == DOCS
    again = StreamPacker(ShardStream(out, seed=2), max_tokens=24, buffer_size=64)
    again.load_state_dict(state)
    again.source.set_epoch(1)  # the source's part is done, but two packs' documents wait
    with pytest.raises(ValueError, match=r"the StreamPacker state was saved in epoch 0 with \d+ documents still waiting "
                                         r"in its buffer, but its source is now at epoch 1: the state resumes epoch 0; "
                                         r"call set_epoch\(0\) to finish it"):
        list(again)


def test_persistent_workers_get_each_epochs_shuffle(tmp_path):
    out = write(tmp_path / "s", docs=80, shard_size=2)
    stream = ShardStream(out, seed=4, with_ids=True)
    loader = DataLoader(stream, batch_size=None, num_workers=2, persistent_workers=True)
    fresh = {}
    for epoch in range(3):
        stream.set_epoch(epoch)
        fresh[epoch] = list(DataLoader(ShardStream(out, seed=4, with_ids=True), batch_size=None, num_workers=2,
                                       worker_init_fn=lambda _, e=epoch: torch.utils.data.get_worker_info()
                                       .dataset.set_epoch(e)))
        got = list(loader)
        assert [d["id"] for d in got] == [d["id"] for d in fresh[epoch]], epoch
        assert sorted(d["id"] for d in got) == sorted(f"doc{i}" for i in range(80))
    assert len({tuple(d["id"] for d in fresh[e]) for e in fresh}) == 3  # three orders, not one


# -- older formats --------------------------------------------------------------------------------


def cli(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "packing.data.shards", *map(str, args)], capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_set_reads_with_one_warning_and_upgrades_in_place(tmp_path, version):
    out = write(tmp_path / "s")
    want = [ShardDataset(out)[i].tolist() for i in range(DOCS)]
    downgrade(out, version)
    with pytest.warns(UserWarning, match=rf"is varlen-packing-shards/{version}: its index.json has no checksum and no "
                                         r"hashes of its files"):
        old = ShardDataset(out)
    assert [old[i].tolist() for i in range(DOCS)] == want
    proc = cli("--upgrade", out)
    how = "every document matched its checksum" if version == 2 else "format 1 had no checksums: they now record"
    assert proc.returncode == 0 and proc.stdout.startswith(
        f"upgraded {out} from varlen-packing-shards/{version} to varlen-packing-shards/3: 8 shards, 40 documents; {how}"), proc
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # format 3: no warning
        new = ShardDataset(out)
        assert [new[i].tolist() for i in range(DOCS)] == want and new.doc_id(7) == "doc7"
    assert json.loads((out / "index.json").read_text())["format"] == "varlen-packing-shards/3"
    proc = cli("--verify", out)
    assert proc.returncode == 0 and "verified" in proc.stdout and "40 documents" in proc.stdout, proc
    again = cli("--upgrade", out)
    assert again.returncode == 2 and "is already varlen-packing-shards/3; nothing to upgrade" in again.stderr


def test_an_upgrade_stops_at_a_corrupt_document_and_keeps_the_old_index(tmp_path):
    out = write(tmp_path / "s")
    downgrade(out, 2)
    import tarfile

    path = out / "shard-000002.tar"
    with tarfile.open(path) as tar:
        offset = tar.getmember("000000011.tokens.npy").offset_data
    data = bytearray(path.read_bytes())
    data[offset + 128] ^= 0x04
    path.write_bytes(bytes(data))
    proc = cli("--upgrade", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot upgrade" in proc.stderr and "document 000000011 (position 1) is corrupt" in proc.stderr
    assert "the old index.json is kept: rewrite the set from its source" in proc.stderr
    assert json.loads((out / "index.json").read_text())["format"] == "varlen-packing-shards/2"


def test_verify_reads_every_byte(tmp_path):
    out = write(tmp_path / "s")
    path = out / "shard-000004.tar"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the tar's zero padding: no member covers it, so only the tar's hash does
    path.write_bytes(bytes(data))
    assert len(ShardDataset(out)) == DOCS  # readers check members, not padding
    proc = cli("--verify", out)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "shard-000004.tar: shard-000004.tar has SHA-256" in proc.stderr and "restore it, or rewrite the set" in proc.stderr


def test_a_loader_state_meets_the_epoch_set_before_it(tmp_path):
    """Through torchdata's StatefulDataLoader, the workers load their states after the main process
    set the epoch: the state's epoch no longer wins silently."""
    pytest.importorskip("torchdata", reason="the stream extra: pip install -e '.[stream]'")
    from torchdata.stateful_dataloader import StatefulDataLoader

    out = write(tmp_path / "s", docs=80, shard_size=2)

    def loader(epoch):
        stream = ShardStream(out, seed=4, with_ids=True)
        stream.set_epoch(epoch)
        return StatefulDataLoader(stream, batch_size=None, num_workers=2, collate_fn=lambda d: d["id"])

    first = loader(0)
    it = iter(first)
    taken = [next(it) for _ in range(9)]
    state = first.state_dict()
    rest = list(it)
    same = loader(0)
    same.load_state_dict(state)
    assert taken + list(same) == taken + rest  # the same epoch resumes exactly
    other = loader(1)
    other.load_state_dict(state)
    with pytest.raises(ValueError, match=r"set_epoch\(1\) with a ShardStream state saved mid-way through epoch 0"):
        list(other)
