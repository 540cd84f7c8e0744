"""Language-modelling corpora for distillation: the binarized token file, token counts, the LM dataset with the
original's splitting and filtering, and the length-grouped batch order.

The binarized file (written by scripts/binarize_data.py) holds every sequence's token ids back to back in one
flat array of the smallest safe integer type (uint16 for vocabularies of up to 65,535 entries, int32 above),
followed by int64 offsets (sequence i is tokens[offsets[i]:offsets[i + 1]]) and a JSON footer:

    b"CBLMTOK1" | token ids | zero padding to 8 bytes | offsets | footer JSON | footer length (uint64) | b"CBLMEND1"

The footer records the dtype, the counts, SHA-256 digests of the two arrays, the tokenizer's vocabulary
fingerprint (so a file made with another tokenizer is refused) and the source text file. The footer sits at the
end so that the writer can stream: tokens go straight to disk, the offsets to a side file appended at the end,
and the whole file is renamed into place only when complete. Readers memory-map the arrays, so host memory does
not grow with the corpus; nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from dataclasses import dataclass
from itertools import chain
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from common.batches import epoch_batches, per_rank_batches, rank_permutation
from common.distributed import DistContext
from common.errors import UserError, file_error
from common.io import remove_path, temp_name
from common.models.families import TOKENIZER_TYPES
from common.progress import progress_bar

logger = logging.getLogger(__name__)

MAGIC_HEAD = b"CBLMTOK1"
MAGIC_TAIL = b"CBLMEND1"
FORMAT = "compress-bert-binarized-lm"
FORMAT_VERSION = 1
COUNTS_FORMAT = "compress-bert-token-counts"
UINT16_MAX_VOCAB = 65535  # the original's rule: uint16 below 1 << 16 entries, a 32-bit type above
MIN_SEQUENCE_LENGTH = 12  # the original drops sequences of 11 tokens or fewer (special tokens included)
MAX_UNKNOWN_FRACTION = 0.5  # ... and those that are half unknown tokens or more
_CHUNK_BYTES = 1 << 24


# ----------------------------------------------------------------------------------------------------------
# tokenizer identity and wrapping


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest integer type that holds every id of a vocabulary of `vocab_size` entries."""
    if vocab_size < 1:
        raise ValueError(f"vocabulary size must be positive, got {vocab_size}")
    if vocab_size <= UINT16_MAX_VOCAB:
        return np.dtype(np.uint16)
    if vocab_size <= np.iinfo(np.int32).max:
        return np.dtype(np.int32)
    raise ValueError(f"a vocabulary of {vocab_size} entries does not fit 32-bit token ids")


def vocab_fingerprint(tokenizer: Any) -> dict[str, Any]:
    """Size and SHA-256 of a tokenizer's token -> id mapping (added tokens included): two tokenizers with the
    same fingerprint give every token the same id, whatever folder they were loaded from."""
    vocab = tokenizer.get_vocab()
    canonical = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return {"vocab_size": len(vocab), "vocab_sha256": hashlib.sha256(canonical.encode("utf-8")).hexdigest()}


@dataclass(frozen=True)
class Wrap:
    """The tokens put around every sequence: [CLS] ... [SEP] (BERT, RoBERTa: masked LMs) or
    <|endoftext|> ... <|endoftext|> (GPT-2: causal LMs), as the original binarized_data.py did."""

    style: str  # "cls_sep" or "bos_eos"
    first_id: int
    last_id: int


def tokenizer_wrap(tokenizer: Any, tokenizer_type: str | None = None) -> Wrap:
    """The wrapping tokens for this tokenizer: the original picked them from --tokenizer_type; without it,
    [CLS]/[SEP] when the tokenizer has them, else BOS/EOS."""
    has_cls = tokenizer.cls_token_id is not None and tokenizer.sep_token_id is not None
    has_bos = tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None
    if tokenizer_type is not None:
        if tokenizer_type not in TOKENIZER_TYPES:
            raise UserError(f"--tokenizer_type {tokenizer_type}: choose one of {', '.join(TOKENIZER_TYPES)}")
        style = TOKENIZER_TYPES[tokenizer_type]
    else:
        style = "cls_sep" if has_cls else "bos_eos"
    if style == "cls_sep" and not has_cls:
        raise UserError(f"the tokenizer {tokenizer.name_or_path} has no cls/sep tokens for a {tokenizer_type} "
                        "model; pass the matching --tokenizer_type")
    if style == "bos_eos" and not has_bos:
        raise UserError(f"the tokenizer {tokenizer.name_or_path} has neither cls/sep nor bos/eos tokens to mark "
                        "where a sequence starts and ends")
    if style == "cls_sep":
        return Wrap(style, int(tokenizer.cls_token_id), int(tokenizer.sep_token_id))
    return Wrap(style, int(tokenizer.bos_token_id), int(tokenizer.eos_token_id))


def special_token_ids(tokenizer: Any) -> dict[str, int]:
    """{"cls_token": 101, "pad_token": 0, ...} for every special token the tokenizer defines."""
    out = {}
    for name in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"):
        token_id = getattr(tokenizer, f"{name}_id", None)
        if token_id is not None:
            out[name] = int(token_id)
    return out


def _plain_backend(tokenizer: Any) -> Any:
    """A copy of the tokenizer's Rust backend without truncation or padding (a saved tokenizer.json may carry
    both, which would cut and pad every line)."""
    from tokenizers import Tokenizer

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(f"the tokenizer {tokenizer.name_or_path} has no fast (Rust) version; binarizing needs one")
    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    return plain


# ----------------------------------------------------------------------------------------------------------
# the binarized file: writing


class _TokenWriter:
    """Streams sequences into a temporary file next to `path` (tokens) and a side file (offsets); `close()`
    appends the offsets and the footer and renames the result to `path`; `abort()` removes both."""

    def __init__(self, path: str, dtype: np.dtype) -> None:
        self.path = path
        self.dtype = np.dtype(dtype)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self.tmp = temp_name(path)
        self.offsets_tmp = temp_name(path, suffix=".offsets")
        self.tokens_file = open(self.tmp, "wb")
        self.offsets_file = open(self.offsets_tmp, "wb")
        self.tokens_file.write(MAGIC_HEAD)
        self.tokens_hash = hashlib.sha256()
        self.offsets_hash = hashlib.sha256()
        self.num_tokens = 0
        self.num_sequences = 0
        self._write_offsets(np.zeros(1, dtype=np.int64))

    def _write_offsets(self, offsets: np.ndarray) -> None:
        data = offsets.astype("<i8", copy=False).tobytes()
        self.offsets_file.write(data)
        self.offsets_hash.update(data)

    def add(self, sequences: Sequence[Sequence[int]]) -> None:
        if not sequences:
            return
        lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
        total = int(lengths.sum())
        flat = np.fromiter(chain.from_iterable(sequences), dtype=self.dtype.newbyteorder("<"), count=total)
        data = flat.tobytes()
        self.tokens_file.write(data)
        self.tokens_hash.update(data)
        self._write_offsets(self.num_tokens + np.cumsum(lengths))
        self.num_tokens += total
        self.num_sequences += len(sequences)

    def close(self, footer: dict[str, Any]) -> dict[str, Any]:
        tokens_end = len(MAGIC_HEAD) + self.num_tokens * self.dtype.itemsize
        pad = (-tokens_end) % 8
        self.tokens_file.write(b"\0" * pad)
        self.offsets_file.close()
        with open(self.offsets_tmp, "rb") as f:
            for block in iter(lambda: f.read(_CHUNK_BYTES), b""):
                self.tokens_file.write(block)
        footer = {
            **footer, "format": FORMAT, "version": FORMAT_VERSION, "dtype": self.dtype.name,
            "num_sequences": self.num_sequences, "num_tokens": self.num_tokens,
            "tokens_offset": len(MAGIC_HEAD), "offsets_offset": tokens_end + pad,
            "tokens_sha256": self.tokens_hash.hexdigest(), "offsets_sha256": self.offsets_hash.hexdigest(),
        }
        raw = json.dumps(footer, sort_keys=True).encode("utf-8")
        self.tokens_file.write(raw)
        self.tokens_file.write(struct.pack("<Q", len(raw)))
        self.tokens_file.write(MAGIC_TAIL)
        self.tokens_file.flush()
        os.fsync(self.tokens_file.fileno())
        self.tokens_file.close()
        os.replace(self.tmp, self.path)
        remove_path(self.offsets_tmp)
        return footer

    def abort(self) -> None:
        for handle in (self.tokens_file, self.offsets_file):
            handle.close()
        for tmp in (self.tmp, self.offsets_tmp):
            remove_path(tmp)


def _read_line_batches(path: str, batch_lines: int, bar: Any) -> Iterable[tuple[list[str], int]]:
    """(non-blank lines, blank lines skipped) in batches, read as bytes so the bar counts bytes; a line that is
    not UTF-8 is an error naming its line number."""
    batch: list[str] = []
    blank = 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            bar.update(len(raw))
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as err:
                raise file_error(path, number, f"is not UTF-8 text ({err.reason} at byte {err.start})",
                                 "re-encode the file as UTF-8") from None
            if not text:
                blank += 1
                continue
            batch.append(text)
            if len(batch) >= batch_lines:
                yield batch, blank
                batch, blank = [], 0
    if batch or blank:
        yield batch, blank


def binarize_file(path: str, tokenizer: Any, out_path: str, tokenizer_type: str | None = None,
                  batch_lines: int = 2000, show_progress: bool = True) -> dict[str, Any]:
    """Tokenize a text file (one sequence per line; blank lines are skipped) with a fast tokenizer, wrap each
    line in the model's start and end tokens, and stream the ids into a binarized file at `out_path`. Returns
    the footer (counts, dtype, digests, tokenizer and source identity)."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such text file")
    if batch_lines < 1:
        raise UserError(f"the batch size must be at least 1 line (got {batch_lines})")
    wrap = tokenizer_wrap(tokenizer, tokenizer_type)
    backend = _plain_backend(tokenizer)
    fingerprint = vocab_fingerprint(tokenizer)
    dtype = token_dtype(fingerprint["vocab_size"])
    # Hash the source while reading it, so its identity costs no second pass.
    source_hash = hashlib.sha256()
    size = os.path.getsize(path)
    writer = _TokenWriter(out_path, dtype)
    lines = blank_lines = 0
    start = time.perf_counter()
    try:
        with progress_bar(total=size, unit="B", unit_scale=True, desc=f"binarize {os.path.basename(path)}",
                          disable=not show_progress) as bar:
            for batch, blank in _read_line_batches(path, batch_lines, bar):
                blank_lines += blank
                lines += len(batch) + blank
                if not batch:
                    continue
                for text in batch:
                    source_hash.update(text.encode("utf-8"))
                encodings = backend.encode_batch_fast(batch, add_special_tokens=False)
                writer.add([[wrap.first_id, *e.ids, wrap.last_id] for e in encodings])
        seconds = time.perf_counter() - start
        footer = writer.close({
            "vocab": fingerprint,
            "tokenizer": {"class": type(tokenizer).__name__, "name_or_path": str(tokenizer.name_or_path)},
            "wrap": {"style": wrap.style, "first_id": wrap.first_id, "last_id": wrap.last_id},
            "special_token_ids": special_token_ids(tokenizer),
            "source": {"path": os.path.abspath(path), "size": size, "lines": lines,
                       "blank_lines_skipped": blank_lines, "stripped_text_sha256": source_hash.hexdigest()},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "seconds": round(seconds, 3),
        })
    except BaseException:
        writer.abort()
        raise
    return footer


# ----------------------------------------------------------------------------------------------------------
# the binarized file: reading and checking


def read_footer(path: str) -> dict[str, Any]:
    """The footer of a binarized file, after checking the file's framing and size; a damaged, truncated or
    foreign file is one UserError naming it."""
    fix = "binarize the text again with scripts/binarize_data.py"
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such binarized file ({fix})")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(len(MAGIC_HEAD))
        if head != MAGIC_HEAD:
            if head.startswith(b"\x80"):
                raise file_error(path, None, "is a pickle (the original binarized_data.py format), which is never "
                                 "unpickled here", fix)
            raise file_error(path, None, "is not a binarized token file (wrong magic bytes)", fix)
        if size < len(MAGIC_HEAD) * 2 + 8:
            raise file_error(path, None, "is damaged: truncated", fix)
        f.seek(size - 16)
        footer_len_raw, tail = f.read(8), f.read(8)
        if tail != MAGIC_TAIL:
            raise file_error(path, None, "is damaged: its end marker is missing (truncated or still being written)",
                             fix)
        (footer_len,) = struct.unpack("<Q", footer_len_raw)
        if footer_len > size - 24:
            raise file_error(path, None, "is damaged: bad footer length", fix)
        f.seek(size - 16 - footer_len)
        try:
            footer = json.loads(f.read(footer_len).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise file_error(path, None, "is damaged: unreadable footer", fix) from None
    if footer.get("format") != FORMAT:
        raise file_error(path, None, "is not a binarized token file", fix)
    if footer.get("version") != FORMAT_VERSION:
        raise file_error(path, None, f"has format version {footer.get('version')}, this code reads "
                         f"{FORMAT_VERSION}", fix)
    try:
        dtype = np.dtype(footer["dtype"])
        n_seq, n_tok = int(footer["num_sequences"]), int(footer["num_tokens"])
        off_start = int(footer["offsets_offset"])
    except (KeyError, TypeError, ValueError):
        raise file_error(path, None, "is damaged: incomplete footer", fix) from None
    expected = off_start + 8 * (n_seq + 1) + footer_len + 16
    if off_start < len(MAGIC_HEAD) + n_tok * dtype.itemsize or expected != size:
        raise file_error(path, None, f"is damaged: {size} bytes where its footer implies {expected}", fix)
    return footer


def binarized_path(path: str) -> str:
    """A binarized corpus named as the original pipeline named it (`<name>.pickle`): the `.bin` that
    scripts/binarize_data.py writes beside it, with an info line, or one error naming that `.bin` (a pickle is
    never loaded). Any other name is returned as it is."""
    if not path.endswith(".pickle"):
        return path
    candidate = path[: -len(".pickle")] + ".bin"
    if os.path.isfile(candidate):
        logger.info("%s: using %s, the binarized file scripts/binarize_data.py writes in place of the original's "
                    ".pickle", path, candidate)
        return candidate
    raise UserError(f"{path}: this project reads no pickles; use {candidate}, the file scripts/binarize_data.py "
                    f"writes (run it first if {candidate} does not exist yet)")


class TokenFile:
    """A binarized file opened for reading: `tokens` (flat) and `offsets` are read-only memory maps."""

    def __init__(self, path: str, verify: bool = False, show_progress: bool = True) -> None:
        self.path = path
        self.footer = read_footer(path)
        self.dtype = np.dtype(self.footer["dtype"]).newbyteorder("<")
        self.num_sequences = int(self.footer["num_sequences"])
        self.num_tokens = int(self.footer["num_tokens"])
        if self.num_sequences == 0 or self.num_tokens == 0:
            raise file_error(path, None, "holds no sequences (was the text file empty?)")
        self.tokens = np.memmap(path, dtype=self.dtype, mode="r", offset=int(self.footer["tokens_offset"]),
                                shape=(self.num_tokens,))
        self.offsets = np.memmap(path, dtype="<i8", mode="r", offset=int(self.footer["offsets_offset"]),
                                 shape=(self.num_sequences + 1,))
        if verify:
            self.verify(show_progress)

    @property
    def vocab(self) -> dict[str, Any]:
        return self.footer["vocab"]

    @property
    def wrap(self) -> Wrap:
        w = self.footer["wrap"]
        return Wrap(w["style"], int(w["first_id"]), int(w["last_id"]))

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets).astype(np.int64)

    def sequence(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i]:self.offsets[i + 1]])

    def verify(self, show_progress: bool = True) -> None:
        """Check both arrays against their stored digests, the offsets' order and every id against the
        vocabulary size, in one streaming pass; a mismatch is a UserError naming the file."""
        fix = "binarize the text again with scripts/binarize_data.py"
        vocab_size = int(self.vocab["vocab_size"])
        token_bytes = self.num_tokens * self.dtype.itemsize
        tokens_hash, offsets_hash = hashlib.sha256(), hashlib.sha256()
        max_id = 0
        step = max(1, _CHUNK_BYTES // self.dtype.itemsize)
        with progress_bar(total=token_bytes, unit="B", unit_scale=True, desc="verify tokens",
                          disable=not show_progress, leave=False) as bar:
            for lo in range(0, self.num_tokens, step):
                chunk = np.asarray(self.tokens[lo:lo + step])
                tokens_hash.update(chunk.tobytes())
                max_id = max(max_id, int(chunk.max()))
                if chunk.dtype.kind == "i" and int(chunk.min()) < 0:
                    raise file_error(self.path, None, "is damaged: negative token ids", fix)
                bar.update(chunk.nbytes)
        prev_last = 0
        for lo in range(0, self.num_sequences + 1, step):
            chunk = np.asarray(self.offsets[lo:lo + step])
            offsets_hash.update(chunk.tobytes())
            if chunk[0] < prev_last or np.any(np.diff(chunk) < 0):
                raise file_error(self.path, None, "is damaged: its offsets go backwards", fix)
            prev_last = int(chunk[-1])
        if tokens_hash.hexdigest() != self.footer["tokens_sha256"] or \
                offsets_hash.hexdigest() != self.footer["offsets_sha256"]:
            raise file_error(self.path, None, "is damaged: its contents do not match the checksums stored in it", fix)
        if int(self.offsets[0]) != 0 or int(self.offsets[-1]) != self.num_tokens:
            raise file_error(self.path, None, "is damaged: its offsets do not cover the token array", fix)
        if max_id >= vocab_size:
            raise file_error(self.path, None, f"holds token id {max_id}, outside its vocabulary of {vocab_size}", fix)

    def check_tokenizer(self, tokenizer: Any, what: str = "the teacher's tokenizer") -> None:
        """Refuse a file made with another vocabulary (its ids would mean other tokens)."""
        mine = self.vocab
        theirs = vocab_fingerprint(tokenizer)
        if mine["vocab_sha256"] != theirs["vocab_sha256"]:
            made_with = self.footer.get("tokenizer", {}).get("name_or_path", "?")
            raise UserError(
                f"{self.path} was binarized with another tokenizer ({made_with}, {mine['vocab_size']} tokens) than "
                f"{what} ({tokenizer.name_or_path}, {theirs['vocab_size']} tokens); binarize the text again with "
                f"scripts/binarize_data.py --tokenizer_name {tokenizer.name_or_path}")


# ----------------------------------------------------------------------------------------------------------
# token counts (for the masking probabilities)


def count_tokens(token_file: TokenFile, vocab_size: int | None = None, show_progress: bool = True) -> np.ndarray:
    """Occurrences of every id in the file (int64, length `vocab_size`, the file's vocabulary by default),
    counted chunk by chunk."""
    size = int(vocab_size or token_file.vocab["vocab_size"])
    counts = np.zeros(size, dtype=np.int64)
    step = max(1, _CHUNK_BYTES // token_file.dtype.itemsize)
    for lo in progress_bar(range(0, token_file.num_tokens, step), desc="count tokens", disable=not show_progress,
                           leave=False):
        chunk = np.asarray(token_file.tokens[lo:lo + step]).astype(np.int64)
        if chunk.size and int(chunk.max()) >= size:
            raise UserError(f"{token_file.path} holds token id {int(chunk.max())}, not below --vocab_size {size}")
        counts += np.bincount(chunk, minlength=size)
    return counts


def save_token_counts(path: str, counts: np.ndarray, token_file: TokenFile) -> None:
    """Counts as a safetensors file whose metadata names the vocabulary they were counted in."""
    from common.io import save_tensors_atomic

    meta = {"format": COUNTS_FORMAT, "vocab_sha256": token_file.vocab["vocab_sha256"],
            "vocab_size": str(token_file.vocab["vocab_size"]), "data_file": os.path.abspath(token_file.path),
            "num_tokens": str(token_file.num_tokens)}
    save_tensors_atomic(path, {"counts": torch.from_numpy(np.ascontiguousarray(counts, dtype=np.int64))}, meta)


def load_token_counts(path: str, vocab: dict[str, Any]) -> np.ndarray:
    """Counts written by save_token_counts, checked against the vocabulary of the data they will mask."""
    from safetensors import SafetensorError, safe_open

    fix = "count again with scripts/token_counts.py"
    if not os.path.isfile(path):
        raise UserError(f"--token_counts {path}: no such file ({fix})")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            counts = f.get_tensor("counts")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise file_error(path, None, f"is not a token-counts file ({first})", fix) from None
    if meta.get("format") != COUNTS_FORMAT:
        raise file_error(path, None, "is not a token-counts file written by scripts/token_counts.py", fix)
    if meta.get("vocab_sha256") != vocab["vocab_sha256"]:
        raise file_error(path, None, "was counted in another vocabulary than the training data's", fix)
    return counts.numpy().astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# the LM dataset: long sequences split, short and unknown-heavy ones dropped


class LmDataset:
    """The training sequences of a binarized file, processed as the original LmSeqsDataset did, without copying
    the tokens: each item is a slice of the memory-mapped token array (`starts`, `spans`), plus whether a start
    or end token must be added around it (pieces of a split sequence get their own).

    1. sequences longer than `max_len` are cut into pieces of `max_len - 2` tokens, each given the start and
       end tokens it lacks;
    2. sequences of fewer than `min_len` tokens are dropped;
    3. sequences whose tokens are `max_unknown` or more unknown are dropped (not for byte-level vocabularies
       such as GPT-2's, whose unknown token is the wrapping token itself).
    """

    def __init__(self, token_file: TokenFile, max_len: int, unk_id: int | None,
                 min_len: int = MIN_SEQUENCE_LENGTH, max_unknown: float = MAX_UNKNOWN_FRACTION) -> None:
        if max_len < 3:
            raise UserError(f"the longest model input must be at least 3 tokens (got {max_len})")
        self.file = token_file
        self.tokens = token_file.tokens
        self.wrap = token_file.wrap
        self.max_len = max_len
        self.stats: dict[str, int] = {"sequences_in_file": token_file.num_sequences,
                                      "tokens_in_file": token_file.num_tokens}
        starts, spans, add_first, add_last = self._split(np.asarray(token_file.offsets))
        final = spans + add_first + add_last
        keep = final >= min_len
        self.stats["removed_too_short"] = int((~keep).sum())
        if unk_id is not None and unk_id not in (self.wrap.first_id, self.wrap.last_id):
            unknown = self._count(starts, spans, unk_id)
            heavy = keep & (unknown >= max_unknown * final)
            self.stats["removed_unknown_heavy"] = int(heavy.sum())
            keep &= ~heavy
        else:
            self.stats["removed_unknown_heavy"] = 0
        self.starts = starts[keep]
        self.spans = spans[keep].astype(np.int32)
        self.add_first = add_first[keep].astype(np.uint8)
        self.add_last = add_last[keep].astype(np.uint8)
        self.lengths = (self.spans + self.add_first + self.add_last).astype(np.int64)
        self.stats["sequences"] = len(self.starts)
        self.stats["tokens"] = int(self.lengths.sum())
        if len(self.starts) == 0:
            raise UserError(f"{token_file.path}: no sequence is left after dropping those shorter than {min_len} "
                            f"tokens or mostly unknown; the data is too short for training")

    def __len__(self) -> int:
        return len(self.starts)

    def _split(self, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        lengths = np.diff(offsets)
        piece = self.max_len - 2
        # Every sequence yields ceil(len / piece) pieces when too long, else itself (one piece).
        pieces = np.where(lengths > self.max_len, -(-lengths // piece), 1)
        owner = np.repeat(np.arange(len(lengths)), pieces)
        first_piece = np.cumsum(pieces) - pieces
        k = np.arange(len(owner)) - np.repeat(first_piece, pieces)  # piece number within its sequence
        is_split = np.repeat(lengths > self.max_len, pieces)
        starts = offsets[:-1][owner] + k * piece
        spans = np.where(is_split, np.minimum(piece, lengths[owner] - k * piece), lengths[owner])
        first_tok = np.asarray(self.tokens[starts]).astype(np.int64)
        last_tok = np.asarray(self.tokens[starts + spans - 1]).astype(np.int64)
        add_first = (is_split & (first_tok != self.wrap.first_id)).astype(np.int64)
        add_last = (is_split & (last_tok != self.wrap.last_id)).astype(np.int64)
        n_long = int((lengths > self.max_len).sum())
        self.stats["split_too_long"] = n_long
        self.stats["pieces_from_split"] = int(pieces[lengths > self.max_len].sum())
        return starts.astype(np.int64), spans.astype(np.int64), add_first, add_last

    def _count(self, starts: np.ndarray, spans: np.ndarray, token_id: int) -> np.ndarray:
        """Occurrences of `token_id` in every item, reading the token array in blocks of about 4M tokens."""
        out = np.zeros(len(starts), dtype=np.int64)
        i = 0
        budget = 1 << 22
        while i < len(starts):
            lo = int(starts[i])
            j = int(np.searchsorted(starts, lo + budget, side="right"))
            j = max(j, i + 1)
            hi = int((starts[i:j] + spans[i:j]).max())
            hits = np.concatenate([[0], np.cumsum(np.asarray(self.tokens[lo:hi]) == token_id)])
            out[i:j] = hits[starts[i:j] + spans[i:j] - lo] - hits[starts[i:j] - lo]
            i = j
        return out

    def collate(self, indices: Sequence[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(token ids [B, longest], lengths [B]) of the items, right-padded with `pad_id`: the original's
        batch_sequences, gathered from the memory map."""
        idx = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[idx]
        width = int(lengths.max())
        col = np.arange(width)[None, :]
        first = self.add_first[idx][:, None].astype(np.int64)
        body = (col >= first) & (col < first + self.spans[idx][:, None])
        pos = np.where(body, self.starts[idx][:, None] + col - first, 0)
        out = np.where(body, np.asarray(self.tokens[pos.ravel()]).reshape(pos.shape).astype(np.int64), pad_id)
        out[:, 0] = np.where(first[:, 0] == 1, self.wrap.first_id, out[:, 0])
        rows = np.nonzero(self.add_last[idx])[0]
        out[rows, lengths[rows] - 1] = self.wrap.last_id
        return torch.from_numpy(out), torch.from_numpy(lengths)

    def truncate(self, n: int | None) -> None:
        """--max_train_samples: keep the first `n` sequences (after splitting and dropping; deterministic)."""
        if n is None or n >= len(self.starts):
            return
        for name in ("starts", "spans", "add_first", "add_last", "lengths"):
            setattr(self, name, getattr(self, name)[:n])
        self.stats["max_train_samples"] = n
        self.stats["sequences"] = n
        self.stats["tokens"] = int(self.lengths.sum())

    def describe(self) -> str:
        s = self.stats
        return (f"{s['sequences_in_file']} sequences in {self.file.path}: split {s['split_too_long']} longer than "
                f"{self.max_len} tokens into {s['pieces_from_split']} pieces, removed {s['removed_too_short']} too "
                f"short (< {MIN_SEQUENCE_LENGTH} tokens) and {s['removed_unknown_heavy']} with "
                f">= {MAX_UNKNOWN_FRACTION:.0%} unknown tokens; {s['sequences']} sequences ({s['tokens']} tokens) "
                "remain")


def write_items(data: LmDataset, indices: Sequence[int], path: str) -> dict[str, Any]:
    """The items `indices` of `data`, in that order, as a binarized file of their own: each item whole (a piece
    of a split sequence with the start and end tokens it was given), so that an LmDataset of the file with the
    same max_len holds exactly these items, none split or dropped again. The footer keeps the source file's
    tokenizer identity and names it. Returns the footer."""
    writer = _TokenWriter(path, data.file.dtype)
    try:
        for i in indices:
            ids, _ = data.collate([int(i)], 0)
            writer.add([ids[0].tolist()])
        source = data.file.footer
        return writer.close({**{k: source[k] for k in ("vocab", "tokenizer", "wrap", "special_token_ids")},
                             "source": {"items_of": os.path.abspath(data.file.path), "max_len": data.max_len,
                                        "items": [int(i) for i in indices]},
                             "created": time.strftime("%Y-%m-%dT%H:%M:%S")})
    except BaseException:
        writer.abort()
        raise


# ----------------------------------------------------------------------------------------------------------
# length-grouped batches


def length_groups(lengths: np.ndarray, max_len: int) -> np.ndarray:
    """Group id of every sequence: its length quantized in bins of 4 tokens up to `max_len` (the original's
    create_lengths_groups)."""
    bins = np.arange(3, max_len, 4) if max_len > 0 else np.array([10])
    return np.searchsorted(bins, np.asarray(lengths), side="right")


def grouped_batches(order: Sequence[int], groups: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Batches of `batch_size` taken from `order`, each from one length group, in the order they fill up; the
    leftovers (fewer than a batch per group) follow, concatenated by group so neighbours have similar lengths.
    Every index of `order` appears exactly once and there are ceil(len(order) / batch_size) batches: the
    original GroupedBatchSampler's batches, computed with array operations (no per-example Python objects, so
    a corpus of tens of millions of sequences costs 8 bytes per sequence here)."""
    order = np.asarray(order, dtype=np.int64)
    if len(order) == 0:
        return []
    group = np.asarray(groups)[order]
    by_group = np.argsort(group, kind="stable")  # stream positions, by group, then in stream order
    sorted_group = group[by_group]
    starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_group)) + 1])
    counts = np.diff(np.concatenate([starts, [len(group)]]))
    rank = np.arange(len(group)) - np.repeat(starts, counts)  # position within its group's stream
    in_full = rank < np.repeat(counts // batch_size * batch_size, counts)
    full = by_group[in_full].reshape(-1, batch_size)  # each row: one group's next batch_size, in stream order
    full = full[np.argsort(full[:, -1], kind="stable")]  # in the order the stream completes them
    rest = by_group[~in_full]
    return [order[row] for row in full] + [order[rest[i:i + batch_size]] for i in range(0, len(rest), batch_size)]


class LmBatches:
    """Distillation's batch source: this rank's share of the epoch's seeded permutation, in length-grouped
    batches (the original's GroupedBatchSampler) unless `group_by_size` is off; each batch collated to its
    longest sequence and passed through `label(ids, attention_mask) -> (inputs, labels)` (MLM masking or CLM
    labels) on the device. Real and padded tokens are counted on the host as batches are made (no device
    sync), for the tokens/s and padding share the log reports."""

    def __init__(self, data: LmDataset, batch_size: int, seed: int, pad_id: int,
                 label: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                 group_by_size: bool = True, max_len: int = 0) -> None:
        self.data, self.batch_size, self.seed, self.pad_id, self.label = data, batch_size, seed, pad_id, label
        self.num_examples = len(data)
        self.groups = length_groups(data.lengths, max_len) if group_by_size else None
        if self.groups is not None:
            logger.info("Length groups (bins of 4 tokens up to %d): %s sequences per group", max_len,
                        " ".join(str(int(c)) for c in np.bincount(self.groups) if c))
        self.tokens = self.padded = 0  # since the last `take_counts`
        self.total_tokens = self.total_padded = 0

    def batches_per_epoch(self, ctx: DistContext) -> int:
        return per_rank_batches(self.num_examples, self.batch_size, ctx.world_size)

    def epoch(self, epoch: int, ctx: DistContext) -> Sequence[Sequence[int]]:
        if self.groups is None:
            return epoch_batches(self.num_examples, self.batch_size, self.seed, epoch, ctx)
        order = np.asarray(rank_permutation(self.num_examples, self.seed, epoch, ctx), dtype=np.int64)
        return grouped_batches(order, self.groups, self.batch_size)

    def collate(self, indices: Sequence[int], device: torch.device) -> dict[str, torch.Tensor]:
        ids, lengths = self.data.collate([int(i) for i in indices], self.pad_id)
        real, padded = int(lengths.sum()), ids.numel()
        self.tokens, self.padded = self.tokens + real, self.padded + padded
        self.total_tokens, self.total_padded = self.total_tokens + real, self.total_padded + padded
        ids, lengths = ids.to(device), lengths.to(device)
        attention_mask = (torch.arange(ids.shape[1], device=device)[None, :] < lengths[:, None]).long()
        inputs, labels = self.label(ids, attention_mask)
        return {"input_ids": inputs, "attention_mask": attention_mask, "labels": labels}

    def planned_tokens(self, world_size: int, total_steps: int, updates_per_epoch: int,
                       accumulation: int) -> tuple[int, int]:
        """(real, padded) tokens of every batch a whole run of `total_steps` takes over all ranks, replayed from
        the batch plan (a pure function of seed and epoch): what a resumed run reports for the whole run."""
        real = padded = 0
        for batch in self.planned_batches(world_size, total_steps, updates_per_epoch, accumulation):
            lengths = self.data.lengths[batch]
            real, padded = real + int(lengths.sum()), padded + len(lengths) * int(lengths.max())
        return real, padded

    def planned_batches(self, world_size: int, total_steps: int, updates_per_epoch: int,
                        accumulation: int) -> Iterator[np.ndarray]:
        """Every batch (example indices) a whole run of `total_steps` takes, epoch after epoch and rank after
        rank, replayed from the batch plan (a pure function of seed and epoch; an epoch's micro-batches that
        fill no accumulation are left out, as the loop leaves them)."""
        epoch, steps_left = 0, total_steps
        while steps_left > 0:
            steps = min(steps_left, updates_per_epoch)
            for rank in range(world_size):
                ctx = DistContext(device=torch.device("cpu"), rank=rank, world_size=world_size)
                for batch in self.epoch(epoch, ctx)[: steps * accumulation]:
                    yield np.asarray(batch, dtype=np.int64)
            epoch, steps_left = epoch + 1, steps_left - steps

    def take_counts(self) -> tuple[int, int]:
        """(real, padded) tokens batched since the last call."""
        counts, self.tokens, self.padded = (self.tokens, self.padded), 0, 0
        return counts


def approx_rss_mb() -> dict[str, float]:
    """This process's resident memory now (total, and anonymous: without memory-mapped file pages, which the
    kernel may drop at will) and its peak, in MB; from /proc where it exists, else the peak alone."""
    out: dict[str, float] = {}
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "VmHWM"):
                    out[{"VmRSS": "rss_mb", "RssAnon": "rss_anon_mb", "VmHWM": "peak_rss_mb"}[key]] = \
                        int(value.split()[0]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_mb"] = peak / (1024 * 1024 if os.uname().sysname == "Darwin" else 1024)
    return out


__all__ = [
    "LmBatches", "LmDataset", "TokenFile", "Wrap", "approx_rss_mb", "binarize_file", "count_tokens",
    "grouped_batches", "length_groups", "load_token_counts", "read_footer", "save_token_counts",
    "special_token_ids", "token_dtype", "tokenizer_wrap", "vocab_fingerprint",
]
