"""common/data/lm.py and the masking helpers: the binarized format (round trip, dtypes, damage and foreign
tokenizers), token counts, the LM dataset's splitting and filtering against hand-worked cases, the
length-grouped batch order, and the MLM masking proportions."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, BertTokenizerFast

from common.builtin.distill import builtin_words
from common.data import lm
from common.distillation import fixed_mlm_mask, masking_probabilities, mlm_mask
from common.distributed import DistContext
from common.errors import UserError
from common.batches import epoch_batches, rank_permutation

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def word_tokenizer(tiny_mlm_teacher_dir):
    return AutoTokenizer.from_pretrained(tiny_mlm_teacher_dir)


def write_lines(path: Path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def words(n: int, offset: int = 0) -> list[str]:
    vocab = [w for w in builtin_words() if w.isalpha()]
    return [vocab[(offset + i) % len(vocab)] for i in range(n)]


# ----------------------------------------------------------------------------------------------------------
# the binarized file


def test_token_dtype_follows_the_vocabulary_size():
    assert lm.token_dtype(100) == np.uint16
    assert lm.token_dtype(65535) == np.uint16  # ids 0..65534
    assert lm.token_dtype(65536) == np.int32  # "more than 65,535 entries": 32 bits
    assert lm.token_dtype(250_000) == np.int32


def test_binarize_round_trip_and_streaming_batches(word_tokenizer, tmp_path):
    lines = [" ".join(words(n, n)) for n in (3, 12, 7, 1)]
    text = write_lines(tmp_path / "t.txt", lines[:2] + ["", "   "] + lines[2:])
    footer = lm.binarize_file(text, word_tokenizer, str(tmp_path / "a.bin"), show_progress=False)
    assert footer["dtype"] == "uint16" and footer["num_sequences"] == 4
    assert footer["source"]["blank_lines_skipped"] == 2 and footer["source"]["lines"] == 6
    f = lm.TokenFile(str(tmp_path / "a.bin"), verify=True)
    cls, sep = word_tokenizer.cls_token_id, word_tokenizer.sep_token_id
    for i, line in enumerate(lines):
        expected = [cls] + word_tokenizer(line, add_special_tokens=False)["input_ids"] + [sep]
        assert f.sequence(i).tolist() == expected
    assert f.num_tokens == sum(len(line.split()) + 2 for line in lines)
    # Batches of one line give the same arrays as one batch of everything.
    lm.binarize_file(text, word_tokenizer, str(tmp_path / "b.bin"), batch_lines=1, show_progress=False)
    g = lm.TokenFile(str(tmp_path / "b.bin"), verify=True)
    assert np.array_equal(f.tokens, g.tokens) and np.array_equal(f.offsets, g.offsets)
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name], "temporary files left behind"


def test_binarize_large_vocabulary_uses_32_bit_ids(tmp_path):
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] +
                                        [f"w{i}" for i in range(70_000)])}
    tokenizer = BertTokenizerFast(vocab=vocab)
    text = write_lines(tmp_path / "t.txt", ["w69999 w3 w65535", "w70 w65534"])
    footer = lm.binarize_file(text, tokenizer, str(tmp_path / "big.bin"), show_progress=False)
    assert footer["dtype"] == "int32"
    f = lm.TokenFile(str(tmp_path / "big.bin"), verify=True)
    assert f.sequence(0).tolist() == [2, 70004, 8, 65540, 3]
    assert f.sequence(1).tolist() == [2, 75, 65539, 3]


def test_gpt2_style_tokenizers_wrap_in_bos_eos(tiny_gpt2_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    text = write_lines(tmp_path / "t.txt", ["the dog runs in the park ."])
    footer = lm.binarize_file(text, tokenizer, str(tmp_path / "g.bin"), show_progress=False)
    eos = tokenizer.eos_token_id
    assert footer["wrap"] == {"style": "bos_eos", "first_id": eos, "last_id": eos}
    seq = lm.TokenFile(str(tmp_path / "g.bin")).sequence(0).tolist()
    assert seq[0] == seq[-1] == eos and tokenizer.decode(seq[1:-1]) == "the dog runs in the park ."


@pytest.fixture()
def good_file(word_tokenizer, lm_corpus_dir, tmp_path) -> Path:
    path = tmp_path / "good.bin"
    lm.binarize_file(str(lm_corpus_dir / "train.txt"), word_tokenizer, str(path), show_progress=False)
    return path


@pytest.mark.parametrize("damage, pattern", [
    ("truncate", "end marker is missing"),
    ("flip_token", "do not match the checksums"),
    ("pickle", "is a pickle"),
    ("text", "not a binarized token file"),
    ("drop_middle", "bytes where its footer implies"),
])
def test_damaged_files_are_one_clear_error(damage, pattern, good_file):
    data = bytearray(good_file.read_bytes())
    if damage == "truncate":
        data = data[:-5]
    elif damage == "flip_token":
        data[20] ^= 0x01
    elif damage == "pickle":
        data = bytearray(pickle.dumps([np.uint16([101, 7, 102])]))
    elif damage == "text":
        data = bytearray(b"the dog runs\n")
    elif damage == "drop_middle":
        data = data[:16] + data[32:]
    good_file.write_bytes(bytes(data))
    with pytest.raises(UserError, match=pattern) as err:
        lm.TokenFile(str(good_file), verify=True)
    assert str(good_file) in str(err.value) and "\n" not in str(err.value)


def test_a_file_from_another_tokenizer_is_refused(good_file, tiny_gpt2_dir):
    f = lm.TokenFile(str(good_file), verify=True)
    with pytest.raises(UserError, match="binarized with another tokenizer"):
        f.check_tokenizer(AutoTokenizer.from_pretrained(tiny_gpt2_dir))


def test_empty_text_gives_an_empty_file_that_is_refused(word_tokenizer, tmp_path):
    text = write_lines(tmp_path / "empty.txt", ["", " "])
    lm.binarize_file(text, word_tokenizer, str(tmp_path / "e.bin"), show_progress=False)
    with pytest.raises(UserError, match="holds no sequences"):
        lm.TokenFile(str(tmp_path / "e.bin"))


def test_token_counts_by_hand(word_tokenizer, tmp_path):
    text = write_lines(tmp_path / "t.txt", ["dog dog cat", "cat dog ."])
    lm.binarize_file(text, word_tokenizer, str(tmp_path / "c.bin"), show_progress=False)
    f = lm.TokenFile(str(tmp_path / "c.bin"))
    counts = lm.count_tokens(f, show_progress=False)
    vocab = word_tokenizer.get_vocab()
    assert counts[vocab["dog"]] == 3 and counts[vocab["cat"]] == 2 and counts[vocab["."]] == 1
    assert counts[word_tokenizer.cls_token_id] == counts[word_tokenizer.sep_token_id] == 2
    assert counts.sum() == 10 and len(counts) == len(word_tokenizer)
    lm.save_token_counts(str(tmp_path / "counts.safetensors"), counts, f)
    assert np.array_equal(lm.load_token_counts(str(tmp_path / "counts.safetensors"), f.vocab), counts)
    with pytest.raises(UserError, match="counted in another vocabulary"):
        lm.load_token_counts(str(tmp_path / "counts.safetensors"), {"vocab_sha256": "0" * 64})


# ----------------------------------------------------------------------------------------------------------
# the LM dataset


def test_dataset_splits_long_and_drops_short_and_unknown_heavy(word_tokenizer, tmp_path):
    long_words = words(30)  # 32 tokens with [CLS]/[SEP]
    lines = [
        " ".join(long_words),
        "the dog runs .",  # 6 tokens: too short
        " ".join(["zzz"] * 8 + words(6, 3)),  # 16 tokens, 8 unknown: half, dropped
        " ".join(["zzz"] * 7 + words(7, 5)),  # 16 tokens, 7 unknown: kept
        " ".join(words(10, 9)),  # 12 tokens: the shortest kept
        " ".join(words(9, 2)),  # 11 tokens: too short
    ]
    lm.binarize_file(write_lines(tmp_path / "t.txt", lines), word_tokenizer, str(tmp_path / "d.bin"),
                     show_progress=False)
    data = lm.LmDataset(lm.TokenFile(str(tmp_path / "d.bin")), max_len=16, unk_id=word_tokenizer.unk_token_id)
    # 32 tokens in pieces of 16 - 2 = 14: [CLS w1..w13]+[SEP] (15), [w14..w27] + both (16), [w28..w30 SEP] +
    # [CLS] (5, too short).
    assert data.lengths.tolist() == [15, 16, 16, 12]
    assert data.stats == {"sequences_in_file": 6, "tokens_in_file": 32 + 6 + 16 + 16 + 12 + 11,
                          "split_too_long": 1, "pieces_from_split": 3, "removed_too_short": 3,
                          "removed_unknown_heavy": 1, "sequences": 4, "tokens": 59}
    ids = word_tokenizer.convert_tokens_to_ids
    cls, sep, pad = word_tokenizer.cls_token_id, word_tokenizer.sep_token_id, word_tokenizer.pad_token_id
    batch, lengths = data.collate([3, 0, 1], pad)
    assert batch.shape == (3, 16) and lengths.tolist() == [12, 15, 16]
    assert batch[0].tolist() == [cls] + ids(words(10, 9)) + [sep] + [pad] * 4
    assert batch[1].tolist() == [cls] + ids(long_words[:13]) + [sep, pad]
    assert batch[2].tolist() == [cls] + ids(long_words[13:27]) + [sep]
    assert "split 1 longer than 16 tokens into 3 pieces" in data.describe()
    # Items written to a file of their own come back as the same items, pieces and all, none split or dropped.
    footer = lm.write_items(data, [2, 0, 3], str(tmp_path / "items.bin"))
    assert footer["num_sequences"] == 3 and footer["source"]["items"] == [2, 0, 3]
    items = lm.LmDataset(lm.TokenFile(str(tmp_path / "items.bin"), verify=True), max_len=16,
                         unk_id=word_tokenizer.unk_token_id)
    assert items.lengths.tolist() == [16, 15, 12] and items.stats["split_too_long"] == 0
    assert torch.equal(items.collate([0, 1, 2], pad)[0], data.collate([2, 0, 3], pad)[0])


# ----------------------------------------------------------------------------------------------------------
# length-grouped batches


def test_grouped_batches_by_hand():
    groups = np.array([0, 1, 0, 1, 0, 1, 2, 2])
    assert [b.tolist() for b in lm.grouped_batches(range(8), groups, 2)] == [[0, 2], [1, 3], [6, 7], [4, 5]]
    # The order given is followed: indices are taken as the (shuffled) order lists them.
    assert [b.tolist() for b in lm.grouped_batches([7, 5, 6, 3, 1, 0], groups, 2)] == [[7, 6], [5, 3], [0, 1]]
    # bins 3 7 11 15: a length's group is how many bins it reaches
    assert lm.length_groups(np.array([1, 3, 4, 7, 8, 11, 60]), 16).tolist() == [0, 1, 1, 2, 2, 3, 4]


def reference_grouped_batches(order, groups, batch_size):
    """The original sampler's rule, one example at a time: a group's buffer becomes a batch when full; at the
    end the leftovers, taken group by group, are cut into batches."""
    buffers, batches = {}, []
    for idx in order:
        buffers.setdefault(groups[idx], []).append(idx)
        if len(buffers[groups[idx]]) == batch_size:
            batches.append(buffers.pop(groups[idx]))
    rest = [i for g in sorted(buffers) for i in buffers[g]]
    return batches + [rest[i:i + batch_size] for i in range(0, len(rest), batch_size)]


@pytest.mark.parametrize("seed", range(5))
def test_grouped_batches_match_the_one_at_a_time_rule(seed):
    rng = np.random.default_rng(seed)
    n, batch_size = int(rng.integers(1, 300)), int(rng.integers(1, 12))
    groups = rng.integers(0, int(rng.integers(1, 20)), size=n)
    order = rng.permutation(n)[: int(rng.integers(1, n + 1))]
    got = [b.tolist() for b in lm.grouped_batches(order, groups, batch_size)]
    assert got == reference_grouped_batches(order.tolist(), groups.tolist(), batch_size)


def test_grouped_order_yields_every_example_once_per_epoch():
    rng = np.random.default_rng(0)
    lengths = rng.integers(12, 64, size=203)
    order = lm.LmBatches(FakeCorpus(lengths), 8, 11, pad_id=0, label=None, group_by_size=True, max_len=64).epoch
    one = DistContext(device=CPU)
    groups = lm.length_groups(lengths, 64)
    for epoch in (0, 1):
        batches = order(epoch, one)
        assert len(batches) == math.ceil(203 / 8) == len(epoch_batches(203, 8, 11, epoch, one))
        assert sorted(i for b in batches for i in b) == list(range(203))
        mixed = [b for b in batches if len(set(groups[b])) > 1]
        assert len(mixed) <= len(set(groups.tolist()))  # only the leftover batches mix groups
        spread = np.mean([np.ptp(lengths[b]) for b in batches])
        random_spread = np.mean([np.ptp(lengths[b]) for b in epoch_batches(203, 8, 11, epoch, one)])
        assert spread < random_spread / 3
    as_lists = lambda batches: [b.tolist() for b in batches]  # noqa: E731
    assert as_lists(order(0, one)) == as_lists(order(0, one))  # a pure function of (seed, epoch): exact resume
    assert as_lists(order(0, one)) != as_lists(order(1, one))
    # Two ranks: the same number of batches each, every example covered (the wrap-around pads one).
    ranks = [order(0, DistContext(device=CPU, rank=r, world_size=2)) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == math.ceil(102 / 8)
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == 204 and set(seen) == set(range(203))


def test_ungrouped_rank_order_is_the_shared_loops_shuffle():
    ctx = DistContext(device=CPU, rank=1, world_size=2)
    flat = [i for b in epoch_batches(50, 4, 3, 2, ctx) for i in b]
    assert rank_permutation(50, 3, 2, ctx) == flat  # what the grouped batches are cut from
    one = DistContext(device=CPU)
    assert rank_permutation(49, 3, 0, one) == epoch_batches(49, 49, 3, 0, one)[0]
    ungrouped = lm.LmBatches(FakeCorpus(np.arange(50)), 4, 3, pad_id=0, label=None, group_by_size=False)
    assert ungrouped.epoch(2, ctx) == epoch_batches(50, 4, 3, 2, ctx)


class FakeCorpus:
    """What LmBatches reads of an LmDataset to plan batches: its sequence lengths."""

    def __init__(self, lengths) -> None:
        self.lengths = np.asarray(lengths)

    def __len__(self) -> int:
        return len(self.lengths)


# ----------------------------------------------------------------------------------------------------------
# masking


def test_masking_probabilities_by_hand():
    probs = masking_probabilities(np.array([5, 0, 1, 8, 1000]), 0.7, special_ids=[0])
    expected = [0.0, 1.0, 1.0, 8 ** -0.7, 1000 ** -0.7]
    assert probs.tolist() == pytest.approx(expected, rel=1e-6)
    assert masking_probabilities(np.array([3, 9]), 0.0, []).tolist() == [1.0, 1.0]


def test_mlm_masking_proportions():
    gen = torch.Generator().manual_seed(0)
    batch, width, vocab, mask_id = 400, 60, 100, 4
    lengths = torch.randint(20, width + 1, (batch,), generator=gen)
    attention = (torch.arange(width)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (batch, width), generator=gen) * attention
    ids[:, 0] = 2  # [CLS]
    ids[torch.arange(batch), lengths - 1] = 3  # [SEP]
    probs = masking_probabilities(np.ones(vocab), 0.7, special_ids=[0, 1, 2, 3, 4])
    inputs, labels = mlm_mask(ids, attention, probs, 0.15, torch.tensor([0.8, 0.1, 0.1]), mask_id, vocab,
                              generator=gen)
    chosen = labels != -100
    assert int(chosen.sum()) == math.ceil(0.15 * int(attention.sum()))
    assert not chosen[attention == 0].any() and not chosen[:, 0].any()  # never padding or [CLS]
    assert not chosen[torch.arange(batch), lengths - 1].any()  # never [SEP]
    assert torch.equal(labels[chosen], ids[chosen]) and torch.equal(inputs[~chosen], ids[~chosen])
    n = int(chosen.sum())
    masked = float((inputs[chosen] == mask_id).sum()) / n
    kept = float((inputs[chosen] == ids[chosen]).sum()) / n
    assert masked == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.025)
    assert 1 - masked - kept == pytest.approx(0.1, abs=0.025)


def test_mlm_masking_prefers_rare_tokens():
    # Half the tokens are id 5 (seen once), half id 6 (seen 1000 times): with smoothing 0.7 the rare one is
    # 1000 ** 0.7 = 126 times as likely per position, so nearly every draw picks it.
    ids = torch.tensor([[5, 6] * 50])
    attention = torch.ones_like(ids)
    probs = masking_probabilities(np.array([0, 0, 0, 0, 0, 1, 1000]), 0.7, special_ids=[0])
    _, labels = mlm_mask(ids, attention, probs, 0.2, torch.tensor([1.0, 0.0, 0.0]), 4, 7,
                         generator=torch.Generator().manual_seed(1))
    picked = labels[labels != -100]
    assert len(picked) == 20 and int((picked == 5).sum()) >= 18


def test_fixed_eval_mask_depends_only_on_the_example():
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(5, 50, (6, 20), generator=gen)
    attention = torch.ones_like(ids)
    whole, labels = fixed_mlm_mask(ids, attention, list(range(6)), [0, 1, 2, 3], 0.15, 4, seed=9)
    # Example 4 alone, padded wider, as another rank or batch would see it.
    alone = torch.cat([ids[4:5], torch.zeros(1, 5, dtype=ids.dtype)], dim=1)
    mask = torch.cat([attention[4:5], torch.zeros(1, 5, dtype=attention.dtype)], dim=1)
    single, single_labels = fixed_mlm_mask(alone, mask, [4], [0, 1, 2, 3], 0.15, 4, seed=9)
    assert torch.equal(single[0, :20], whole[4]) and torch.equal(single_labels[0, :20], labels[4])
    assert int((labels[4] != -100).sum()) == math.ceil(0.15 * 20)


class ListCorpus(FakeCorpus):
    """Sequences as lists of ids, collated to the longest as LmDataset.collate does."""

    def __init__(self, sequences) -> None:
        super().__init__([len(s) for s in sequences])
        self.sequences = sequences

    def collate(self, indices, pad_id):
        width = max(len(self.sequences[i]) for i in indices)
        ids = torch.full((len(indices), width), pad_id)
        for row, i in enumerate(indices):
            ids[row, : len(self.sequences[i])] = torch.tensor(self.sequences[i])
        return ids, torch.tensor([len(self.sequences[i]) for i in indices])


def test_lm_batches_collate_label_and_count_tokens_on_the_host():
    corpus = ListCorpus([[5, 6, 7], [8], [9, 10, 11, 12], [13, 14]])
    seen = []

    def label(ids, mask):
        seen.append((ids.clone(), mask.clone()))
        return ids + 100, ids.masked_fill(~mask.bool(), -100)

    source = lm.LmBatches(corpus, 2, seed=0, pad_id=0, label=label, group_by_size=False)
    batch = source.collate(np.array([2, 1]), CPU)
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 0, 0, 0]]
    assert batch["input_ids"].tolist() == [[109, 110, 111, 112], [108, 100, 100, 100]]
    assert batch["labels"].tolist() == [[9, 10, 11, 12], [8, -100, -100, -100]]
    assert seen[0][0].tolist() == [[9, 10, 11, 12], [8, 0, 0, 0]]
    source.collate([0, 3], CPU)
    assert source.take_counts() == (5 + 5, 8 + 6)  # real tokens, padded batch cells
    assert source.take_counts() == (0, 0)
    assert (source.total_tokens, source.total_padded) == (10, 14)
    assert source.batches_per_epoch(DistContext(device=CPU, world_size=2)) == 1
