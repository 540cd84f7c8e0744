"""Tests for common/caching.py: build once then load, what invalidates a cache entry, damaged files, read-only
folders, the file format, and the identities of source files and tokenizers."""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import BertTokenizerFast

from common.caching import cache_path, file_identity, load_and_cache_examples, tokenizer_identity
from common.distributed import DistContext

CTX = DistContext(device=torch.device("cpu"))
VOCAB_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "Hello", "World", "!"]


def tiny_tokenizer(lower: bool, tokens=VOCAB_TOKENS) -> BertTokenizerFast:
    # transformers 5 ignores vocab_file= here; the vocabulary must be passed as a dict.
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(tokens)}, do_lower_case=lower)


class Builder:
    """A build() that counts its calls and returns different features each time."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        return {
            "input_ids": torch.arange(12, dtype=torch.long).view(3, 4) + 100 * self.calls,
            "attention_mask": torch.ones(3, 4, dtype=torch.long),
            "labels": torch.tensor([0.5, 1.5, 2.5 * self.calls], dtype=torch.float32),
        }


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def cache_files(folder: Path) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))


def leftovers(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if name.startswith(".tmp") or ".tmp" in name]


KEY = {"task": "sst-2", "split": "train", "max_seq_length": 128, "featurizer": 1}


# --------------------------------------------------------------------------------------------- build once


def test_builds_once_then_loads(tmp_path):
    build = Builder()
    first = load_and_cache_examples(CTX, str(tmp_path), "train_bert_128_sst-2", KEY, build)
    second = load_and_cache_examples(CTX, str(tmp_path), "train_bert_128_sst-2", KEY, build)
    assert build.calls == 1
    assert_same(first, second)
    assert first["labels"].dtype == torch.float32 and first["input_ids"].dtype == torch.long
    assert cache_files(tmp_path) == [os.path.basename(cache_path(str(tmp_path), "train_bert_128_sst-2", KEY))]
    assert leftovers(tmp_path) == []


def test_cache_file_is_plain_safetensors_with_the_key(tmp_path):
    build = Builder()
    features = load_and_cache_examples(CTX, str(tmp_path), "dev/odd name", KEY, build)
    [name] = cache_files(tmp_path)
    assert name.startswith("cached_dev-odd-name_")  # the prefix is made safe for a file name
    path = tmp_path / name
    # safetensors framing: an 8-byte little-endian header length, then a JSON header (no pickle, no zip).
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_len])
    assert json.loads(header["__metadata__"]["cache_key"]) == KEY
    with safe_open(str(path), framework="pt") as f:
        assert json.loads(f.metadata()["cache_key"]) == KEY
    assert_same(load_file(str(path)), features)


# --------------------------------------------------------------------------------------------- what invalidates


def test_each_key_part_gets_its_own_cache_file(tmp_path):
    cache = tmp_path / "cache"
    source = tmp_path / "train.tsv"
    source.write_text("sentence\tlabel\nhello world\t1\n")
    lower, cased = tiny_tokenizer(True), tiny_tokenizer(False)

    def key(max_len=128, tok=lower):
        return {**KEY, "max_seq_length": max_len, "tokenizer": tokenizer_identity(tok),
                "source": file_identity(str(source))}

    base = key()
    variants = [key(max_len=64), key(tok=cased)]
    source.write_text("sentence\tlabel\nhello world\t0\n")  # same size, other content
    variants.append(key())
    build = Builder()
    load_and_cache_examples(CTX, str(cache), "train", base, build)
    assert build.calls == 1
    for i, variant in enumerate(variants, start=2):
        assert cache_path(str(cache), "train", variant) != cache_path(str(cache), "train", base)
        load_and_cache_examples(CTX, str(cache), "train", variant, build)
        assert build.calls == i, f"variant {i - 1} was served from another key's cache"
    assert len(cache_files(cache)) == 4
    # Every entry is still valid for its own key: no more builds.
    for k in [base, *variants]:
        load_and_cache_examples(CTX, str(cache), "train", k, build)
    assert build.calls == 4
    # The key's order does not matter (it is hashed in canonical form); the prefix does.
    assert cache_path(str(cache), "train", dict(reversed(list(base.items())))) == cache_path(str(cache), "train", base)
    assert cache_path(str(cache), "dev", base) != cache_path(str(cache), "train", base)


def test_file_identity_follows_content(tmp_path):
    path = tmp_path / "train.tsv"
    path.write_bytes(b"a\t1\n")
    first = file_identity(str(path))
    assert first == file_identity(str(path))
    assert first["size"] == 4 and first["path"] == str(path.resolve())
    path.write_bytes(b"b\t1\n")  # same size and name
    second = file_identity(str(path))
    assert second["sha256"] != first["sha256"] and second != first
    path.write_bytes(b"b\t1\nc\t0\n")
    assert file_identity(str(path))["size"] == 8


def test_tokenizer_identity_sees_lower_casing_and_vocab():
    lower, cased = tiny_tokenizer(True), tiny_tokenizer(False)
    # They really tokenize differently ("Hello" is its own token only for the cased one) ...
    assert lower("Hello")["input_ids"] != cased("Hello")["input_ids"]
    # ... and the identity tells them apart, while equal tokenizers get equal identities.
    assert tokenizer_identity(lower) != tokenizer_identity(cased)
    assert tokenizer_identity(lower) == tokenizer_identity(tiny_tokenizer(True))
    other_vocab = tiny_tokenizer(True, [*VOCAB_TOKENS[:-1], "?"])
    assert tokenizer_identity(other_vocab) != tokenizer_identity(lower)
    json.dumps(tokenizer_identity(lower))  # it goes into the JSON key


# --------------------------------------------------------------------------------------------- damaged files


@pytest.mark.parametrize("damage", ["truncated", "header-only", "garbage", "empty"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    build = Builder()
    load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build)
    path = Path(cache_path(str(tmp_path), "train", KEY))
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) - 10], "header-only": raw[:20],
                      "garbage": b"\x00\xff not a tensor file " * 5, "empty": b""}[damage])
    with caplog.at_level(logging.WARNING, logger="common.caching"):
        features = load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build)
    assert build.calls == 2
    assert "damaged" in caplog.text and str(path) in caplog.text
    assert_same(features, load_file(str(path)))  # the rebuilt file is whole again
    assert features["input_ids"][0, 0].item() == 200  # the second build's features
    assert load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build) is not None and build.calls == 2
    assert leftovers(tmp_path) == []


def test_file_made_for_another_key_is_rebuilt(tmp_path, caplog):
    build = Builder()
    other = {**KEY, "max_seq_length": 64}
    load_and_cache_examples(CTX, str(tmp_path), "train", other, build)
    # A file in the right place but holding another key's features (e.g. copied over by hand).
    shutil.copy(cache_path(str(tmp_path), "train", other), cache_path(str(tmp_path), "train", KEY))
    with caplog.at_level(logging.WARNING, logger="common.caching"):
        features = load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build)
    assert build.calls == 2 and "other settings" in caplog.text
    assert features["input_ids"][0, 0].item() == 200
    with safe_open(cache_path(str(tmp_path), "train", KEY), framework="pt") as f:
        assert json.loads(f.metadata()["cache_key"]) == KEY


def test_overwrite_cache_rebuilds(tmp_path):
    build = Builder()
    load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build)
    rebuilt = load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build, overwrite_cache=True)
    assert build.calls == 2 and rebuilt["input_ids"][0, 0].item() == 200
    # The rebuilt features replaced the old ones on disk.
    assert_same(load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build), rebuilt)
    assert build.calls == 2 and len(cache_files(tmp_path)) == 1


def test_other_ranks_read_what_rank_0_wrote(tmp_path):
    # Without a process group the barriers are no-ops, so a rank-1 context can be used on its own.
    rank1 = DistContext(device=torch.device("cpu"), rank=1, world_size=2)
    build = Builder()
    features = load_and_cache_examples(CTX, str(tmp_path), "train", KEY, build)
    # --overwrite_cache is rank 0's job: rank 1 must read the file, not rebuild (and race on) it.
    assert_same(load_and_cache_examples(rank1, str(tmp_path), "train", KEY, build, overwrite_cache=True), features)
    assert build.calls == 1
    # A rank other than 0 that finds no cache builds for itself but never writes.
    empty = tmp_path / "empty"
    load_and_cache_examples(rank1, str(empty), "train", KEY, build)
    assert build.calls == 2 and (not empty.exists() or cache_files(empty) == [])


# --------------------------------------------------------------------------------------------- unwritable folders


def test_unwritable_cache_dir_still_returns_features(tmp_path, caplog):
    folder = tmp_path / "readonly"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_text("x")
            probe.unlink()
            pytest.skip("this user can write into a 0o500 folder (root): nothing to test")
        except PermissionError:
            pass
        build = Builder()
        with caplog.at_level(logging.WARNING, logger="common.caching"):
            features = load_and_cache_examples(CTX, str(folder), "train", KEY, build)
        assert build.calls == 1 and features["input_ids"].shape == (3, 4)
        assert "Could not write feature cache" in caplog.text
        assert os.listdir(folder) == []
    finally:
        folder.chmod(0o700)


def test_cache_dir_that_cannot_be_created_still_returns_features(tmp_path, caplog):
    # Works as root too: a regular file where a folder should be makes every write fail with an OSError.
    blocker = tmp_path / "data.tsv"
    blocker.write_text("not a folder")
    build = Builder()
    with caplog.at_level(logging.WARNING, logger="common.caching"):
        features = load_and_cache_examples(CTX, str(blocker / "cache"), "train", KEY, build)
        again = load_and_cache_examples(CTX, str(blocker / "cache"), "train", KEY, build)
    assert build.calls == 2 and features["input_ids"].shape == (3, 4) and again["input_ids"][0, 0].item() == 200
    assert "Could not write feature cache" in caplog.text
    assert blocker.read_text() == "not a folder"
