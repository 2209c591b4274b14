import numpy as np
import pytest

from packing.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer


def test_bytes_round_trip_including_invalid_utf8():
    tok = ByteTokenizer()
    raw = b"h\xc3\xa9\xff\x00"  # valid UTF-8, then a byte that is not, then NUL
    ids = tok.encode(raw)
    assert ids.dtype == np.uint16 and ids.tolist() == list(raw)
    assert bytes(ids.astype(np.uint8)) == raw
    # A str that came from invalid bytes (surrogateescape) encodes back to the same bytes.
    assert tok.encode(raw.decode("utf-8", "surrogateescape")).tolist() == list(raw)
    assert max(tok.pad_id, tok.bos_id, tok.eos_id) < tok.vocab_size and min(tok.pad_id, tok.bos_id, tok.eos_id) > 255


def hf_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_hf_tokenizer_encodes_and_counts_replaced_documents(tmp_path):
    tok = load_tokenizer(str(hf_tokenizer_file(tmp_path)))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 3
    assert tok.encode("hello world there").tolist() == [0, 1, 2]
    assert tok.replaced == 0
    tok.encode(b"hello \xff")  # invalid UTF-8 becomes U+FFFD, counted
    assert tok.replaced == 1
    tok.encode("hello \ufffd".encode())  # a real U+FFFD in valid text is not a replacement
    assert tok.replaced == 1


def test_load_tokenizer_bytes_and_bad_files(tmp_path):
    assert isinstance(load_tokenizer("bytes"), ByteTokenizer)
    with pytest.raises(ValueError, match=r"tokenizer file '.*nope.json' does not exist; pass --tokenizer bytes"):
        load_tokenizer(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"tokenizer file '.*bad.json' is not a Hugging Face tokenizer.json"):
        load_tokenizer(str(bad))
