"""Parallel text: checked reading through `datasets` (Arrow, cached), tokenization, filtering, batching.

A corpus is streamed into an Arrow table by `datasets.Dataset.from_generator`, which caches it keyed on the
files' paths, sizes and modification times; tokenization runs through `.map`, cached on the tokenizer's hash
in the folder the caller names (a run's `cache/`), so that every run's tokenized copy goes with the run
rather than piling up in the datasets cache.
Batches hold about `batch_tokens` tokens (padding included): pairs of similar length are grouped, so little
of each batch is padding, and the batch order is shuffled with a seed per epoch.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from mt import checkpoint, corpora
from mt.config import Config
from mt.corpora import CorpusFiles, DatasetCorpus
from mt.errors import DataError
from mt.files import free_mib, write_bytes
from mt.text import check_text, decode_lines, iter_lines, normalize_text, read_lines  # noqa: F401
from mt.tokenizer import BOS, EOS, PAD, Tokenizer

log = logging.getLogger(__name__)


def iter_pairs(files: CorpusFiles) -> Iterator[tuple[str, str]]:
    """The aligned lines of a corpus, streamed.

    Raises:
        DataError: if either file is unreadable, or the two have different line counts (raised at the end of
            the shorter one, with both counts).
    """
    src, tgt = iter_lines(files.src), iter_lines(files.tgt)
    for number, pair in enumerate(itertools.zip_longest(src, tgt), start=1):
        if None in pair:  # one file ended: count what is left of the other
            longer = number + sum(1 for _ in (tgt if pair[0] is None else src))
            src_count, tgt_count = (number - 1, longer) if pair[0] is None else (longer, number - 1)
            raise DataError(
                f"{files.name}: {files.src} has {src_count} lines but {files.tgt} has {tgt_count}; "
                "the two sides must be aligned line by line"
            )
        yield pair


def read_pairs(files: CorpusFiles) -> tuple[list[str], list[str]]:
    """The aligned lines of a corpus, in memory; see `iter_pairs`."""
    src, tgt = [], []
    for s, t in iter_pairs(files):
        src.append(s)
        tgt.append(t)
    return src, tgt


def _generate_pairs(src: str, tgt: str, stamp: str) -> Iterator[dict[str, str]]:
    del stamp  # only part of the cache key
    for s, t in iter_pairs(CorpusFiles(f"{src} | {tgt}", Path(src), Path(tgt))):
        yield {"src": s, "tgt": t}


def load_corpus(files: CorpusFiles | DatasetCorpus, max_pairs: int = 0):
    """Streams a corpus into a `datasets.Dataset` with columns `src` and `tgt`: an Arrow file in the datasets
    cache, memory-mapped, so corpora larger than memory work, and read again only when the files change.

    Raises:
        DataError: if the files are unreadable or misaligned, or the dataset cannot be loaded.
    """
    import datasets

    if not sys.stderr.isatty():  # progress bars of reading and tokenizing: on a terminal only
        datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    ds = _load_dataset(files) if isinstance(files, DatasetCorpus) else _load_files(files)
    if max_pairs and len(ds) > max_pairs:
        ds = ds.select(range(max_pairs))
    return ds


def _load_files(files: CorpusFiles):
    import datasets

    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in (files.src, files.tgt))
    try:
        if next(iter_pairs(files), None) is None:  # datasets makes no table of no rows: the caller says "empty"
            return datasets.Dataset.from_dict({"src": [], "tgt": []})
        ds = datasets.Dataset.from_generator(
            _generate_pairs, gen_kwargs={"src": str(files.src), "tgt": str(files.tgt), "stamp": stamp}
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise DataError(str(cause).replace(f"{files.src} | {files.tgt}", files.name)) from None
        raise
    return ds


def _load_dataset(corpus: DatasetCorpus):
    """A Hugging Face dataset, with its text fields copied into `src` and `tgt` columns."""
    import datasets

    try:
        if corpus.disk is not None:
            ds = datasets.load_from_disk(corpus.disk)
        else:
            ds = datasets.load_dataset(corpus.hub, corpus.config, split=corpus.split)
    except Exception as e:  # datasets raises many types for missing, offline or malformed datasets
        raise DataError(f"cannot load dataset {corpus.name}: {type(e).__name__}: {' '.join(str(e).split())}") from None
    if isinstance(ds, datasets.DatasetDict):
        if corpus.split not in ds:
            raise DataError(f"dataset {corpus.name}: no split {corpus.split!r}; it has {', '.join(ds)}")
        ds = ds[corpus.split]
    for field in (corpus.src_field, corpus.tgt_field):
        column = field.split(".")[0]
        if column not in ds.column_names:
            raise DataError(f"dataset {corpus.name} has no field {column!r} (for {field}); "
                            f"its fields: {', '.join(ds.column_names)}")
    return ds.map(_pick_fields, batched=True, remove_columns=ds.column_names,
                  fn_kwargs={"src_field": corpus.src_field, "tgt_field": corpus.tgt_field, "name": corpus.name})


def _pick_fields(batch: dict, src_field: str, tgt_field: str, name: str) -> dict[str, list[str]]:
    def dig(field: str) -> list[str]:
        column, *keys = field.split(".")
        values = batch[column]
        for key in keys:
            try:
                values = [v[key] for v in values]
            except (KeyError, TypeError):
                raise DataError(f"dataset {name}: field {field} not found (no {key!r} in {column})") from None
        return ["" if v is None else str(v) for v in values]

    return {"src": dig(src_field), "tgt": dig(tgt_field)}


def read_corpus(corpus: CorpusFiles | DatasetCorpus) -> tuple[list[str], list[str]]:
    """All pairs of a corpus in memory (for test sets): files are read directly, datasets through `datasets`."""
    if isinstance(corpus, CorpusFiles):
        return read_pairs(corpus)
    ds = load_corpus(corpus)
    return list(ds["src"]), list(ds["tgt"])


def _normalize_batch(batch: dict[str, list[str]]) -> dict[str, list]:
    src = [normalize_text(t) for t in batch["src"]]
    tgt = [normalize_text(t) for t in batch["tgt"]]
    changed = [a != x or b != y for a, b, x, y in zip(src, tgt, batch["src"], batch["tgt"], strict=True)]
    return {"src": src, "tgt": tgt, "changed": changed}


@dataclass(frozen=True)
class CleanReport:
    """What cleaning did to a corpus."""

    total: int
    normalized: int  # pairs changed by normalisation
    duplicates: int  # exact duplicate pairs removed

    def describe(self) -> str:
        return (f"{self.total} pairs read; normalisation changed {self.normalized}; "
                f"removed {self.duplicates} exact duplicates")


def clean_pairs(ds, normalize: bool = True, dedupe: bool = True):
    """Normalises the text of both sides (see `normalize_text`) and removes exact duplicate pairs.

    Returns:
        The cleaned dataset and a CleanReport.
    """
    total, changed, duplicates = len(ds), 0, 0
    if normalize:
        ds = ds.map(_normalize_batch, batched=True, batch_size=10_000)
        changed = int(ds.with_format("arrow")[:]["changed"].to_numpy(zero_copy_only=False).sum())
        ds = ds.remove_columns("changed")
    if dedupe:
        # 64-bit hashes of the pairs, in memory as one array: duplicates found without holding the text. The
        # source's length marks where it ends: a tab inside a side cannot make two pairs one.
        hashes = np.fromiter((_pair_hash(s, t) for batch in ds.iter(batch_size=50_000)
                              for s, t in zip(batch["src"], batch["tgt"], strict=True)),
                             dtype=np.uint64, count=total)
        _, first = np.unique(hashes, return_index=True)
        duplicates = total - len(first)
        if duplicates:
            ds = ds.select(np.sort(first))
    return ds, CleanReport(total, changed, duplicates)


def _pair_hash(src: str, tgt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{len(src)}:{src}{tgt}".encode(), digest_size=8).digest(), "little")


def tokenize(ds, tokenizer: Tokenizer, workers: int = 1, cache: Path | None = None):
    """Adds `src_ids` and `tgt_ids` columns through `.map` (in `workers` processes), cached on the data and
    the tokenizer: in the folder `cache` when given, else in the datasets cache beside the corpus."""
    key = hashlib.sha256(ds._fingerprint.encode() + tokenizer.proto).hexdigest()[:32]

    def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
        return {"src_ids": tokenizer.encode(batch["src"]), "tgt_ids": tokenizer.encode(batch["tgt"])}

    workers = min(workers, max(1, len(ds) // 10_000))  # small corpora are not worth the processes
    return ds.map(encode, batched=True, batch_size=10_000, new_fingerprint=key,
                  num_proc=workers if workers > 1 else None, cache_file_name=_cache_file(cache, key))


def _cache_file(folder: Path | None, key: str) -> str | None:
    """The Arrow file in `folder` that holds the dataset with fingerprint `key`: named by the key, so a file
    written for other data or another tokenizer is never taken for it."""
    if folder is None:
        return None
    folder.mkdir(parents=True, exist_ok=True)
    return str(folder / f"{key}.arrow")


@dataclass(frozen=True)
class FilterReport:
    """How many pairs each filter removed, in the order they were applied."""

    total: int
    empty: int
    too_long: int
    bad_ratio: int
    kept: int

    def describe(self) -> str:
        return (f"{self.total} pairs read; removed {self.empty} with an empty side, {self.too_long} longer "
                f"than the limit, {self.bad_ratio} with an extreme length ratio; {self.kept} kept")


def filter_pairs(ds, max_tokens: int, max_ratio: float, cache: Path | None = None):
    """Drops pairs with an empty side, a side over `max_tokens` subwords, or a length ratio over `max_ratio`.
    The kept pairs are written to the folder `cache` when given, else to the datasets cache.

    Returns:
        The filtered dataset and a FilterReport.
    """
    src_len, tgt_len = lengths(ds)
    empty = (src_len == 0) | (tgt_len == 0)
    too_long = ~empty & ((src_len > max_tokens) | (tgt_len > max_tokens))
    ratio = np.maximum(src_len, tgt_len) / np.maximum(np.minimum(src_len, tgt_len), 1)
    bad_ratio = ~empty & ~too_long & (ratio > max_ratio)
    keep = np.flatnonzero(~(empty | too_long | bad_ratio))
    report = FilterReport(len(ds), int(empty.sum()), int(too_long.sum()), int(bad_ratio.sum()), len(keep))
    if len(keep) < len(ds):
        # Written out rather than kept as an index mapping: `PairTable` then reads the Arrow columns directly.
        ds = ds.select(keep)
        ds = ds.flatten_indices(cache_file_name=_cache_file(cache, ds._fingerprint))
    return ds, report


def lengths(ds) -> tuple[np.ndarray, np.ndarray]:
    """Subword lengths of both sides, read from the Arrow columns without building Python lists."""
    import pyarrow.compute as pc

    table = ds.with_format("arrow")[:]
    return tuple(
        pc.list_value_length(table.column(name)).to_numpy(zero_copy_only=False).astype(np.int64)
        for name in ("src_ids", "tgt_ids")
    )


@dataclass
class Batch:
    """A padded batch. `tgt_in` starts with BOS, `tgt_out` ends with EOS; both are (B, T).

    `real` holds the flat indices of the real (non-padding) positions of `tgt_out`, found when the batch is
    built on the CPU: selecting them on a GPU with a boolean mask would make the host wait for the device.
    """

    src: torch.Tensor  # (B, S)
    tgt_in: torch.Tensor  # (B, T)
    tgt_out: torch.Tensor  # (B, T)
    real: torch.Tensor | None = None  # (N,) int64, into tgt_out.flatten()

    def __post_init__(self):
        if self.real is None:
            self.real = (self.tgt_out != PAD).flatten().nonzero()[:, 0]

    @property
    def target_tokens(self) -> int:
        return self.real.numel()

    def to(self, device: torch.device) -> Batch:
        """The batch on `device`; to CUDA from pinned memory, without waiting for the copy."""
        tensors = (self.src, self.tgt_in, self.tgt_out, self.real)
        if device.type != "cuda":
            return Batch(*(t.to(device) for t in tensors))
        return Batch(*(t.pin_memory().to(device, non_blocking=True) for t in tensors))


@dataclass(frozen=True)
class Layout:
    """How `make_batches` sorts pairs before cutting batches: by target length (`target`), or by the longer
    side's length (`longer`), rounded down to a multiple of `width`; then by the other length (the source's for
    `target`, the target's for `longer`), which runs up and down in turn from bucket to bucket."""

    order: Literal["target", "longer"]
    width: int

    def __str__(self) -> str:
        return f"{self.order} {self.width}"  # as a run's checkpoints keep it


LAYOUTS = tuple(Layout(order, width) for order in ("target", "longer") for width in (1, 2, 3, 4, 6))


def make_batches(src_len: np.ndarray, tgt_len: np.ndarray, batch_tokens: int, seed: int,
                 layout: Layout | None = None) -> list[np.ndarray]:
    """Groups pair indices into batches of about `batch_tokens` padded tokens, in a seeded random order.

    Pairs are sorted by their `layout` (ties broken at random) and cut into batches whose
    `size × (longest source + longest target + 2)` (EOS and BOS included) fits the budget; the batches are
    shuffled. The layout is the one of `LAYOUTS` that leaves the least padding (`batch_layout`) unless given.
    Wider buckets hold more pairs, so the other side's lengths in a batch can be closer; a batch that takes a
    large share of a small corpus spans many lengths, and sorting by the longer side then suits it best
    (`mt bench` prints the share of real tokens).
    """
    layout = layout or batch_layout(src_len, tgt_len, batch_tokens, seed)
    rng = np.random.default_rng(seed)
    noise = rng.permutation(len(src_len))  # as in batch_layout: same seed, same order
    batches, _ = _cut(_sorted(src_len, tgt_len, layout, noise), src_len, tgt_len, batch_tokens)
    rng.shuffle(batches)
    return batches


def batch_layout(src_len: np.ndarray, tgt_len: np.ndarray, batch_tokens: int, seed: int) -> Layout:
    """The layout of `LAYOUTS` that leaves `make_batches` the least padding with this seed: a training run
    chooses it once, rather than trying every layout each epoch."""
    noise = np.random.default_rng(seed).permutation(len(src_len))
    padded = [_cut(_sorted(src_len, tgt_len, layout, noise), src_len, tgt_len, batch_tokens)[1]
              for layout in LAYOUTS]
    return LAYOUTS[int(np.argmin(padded))]


def _sorted(src_len: np.ndarray, tgt_len: np.ndarray, layout: Layout, noise: np.ndarray) -> np.ndarray:
    """Pair indices in `layout`'s order; `noise` (a permutation) breaks ties."""
    if layout.order == "target":
        bucket, other = tgt_len // layout.width, src_len
    else:
        bucket, other = np.maximum(src_len, tgt_len) // layout.width, tgt_len
    # Up in even buckets, down in odd ones: a batch that straddles two buckets joins pairs of similar lengths.
    return np.lexsort((noise, np.where(bucket % 2 == 0, other, -other), bucket))


def _cut(order: np.ndarray, src_len: np.ndarray, tgt_len: np.ndarray,
         batch_tokens: int) -> tuple[list[np.ndarray], int]:
    """Cuts `order` into consecutive batches within `batch_tokens`; returns them and their padded tokens."""
    batches, padded, start, max_src, max_tgt = [], 0, 0, 0, 0
    for i, idx in enumerate(order):
        new_src, new_tgt = max(max_src, src_len[idx]), max(max_tgt, tgt_len[idx])
        if i > start and (i - start + 1) * (new_src + new_tgt + 2) > batch_tokens:
            batches.append(order[start:i])
            padded += (i - start) * (max_src + max_tgt + 2)
            start, new_src, new_tgt = i, src_len[idx], tgt_len[idx]
        max_src, max_tgt = new_src, new_tgt
    if start < len(order):
        batches.append(order[start:])
        padded += (len(order) - start) * (max_src + max_tgt + 2)
    return batches, int(padded)


def collate(src_ids: list[list[int]], tgt_ids: list[list[int]] | None = None) -> Batch:
    """Pads token lists into a Batch: EOS ends every source; tgt tensors are empty when `tgt_ids` is None."""
    src = pad(src_ids, end=EOS)
    if tgt_ids is None:
        empty = torch.zeros(len(src_ids), 0, dtype=torch.long)
        return Batch(src, empty, empty)
    return Batch(src, pad(tgt_ids, start=BOS), pad(tgt_ids, end=EOS))


def pad(seqs: list[list[int]], start: int | None = None, end: int | None = None) -> torch.Tensor:
    """Right-pads with PAD into a (len(seqs), longest + extras) long tensor, with `start` before and `end`
    after each sequence when given. Vectorised: one pass over all the tokens, not one tensor per row."""
    lengths = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter(itertools.chain.from_iterable(seqs), dtype=np.int64, count=int(lengths.sum()))
    return pad_flat(flat, lengths, start, end)


def pad_flat(flat: np.ndarray, lengths: np.ndarray, start: int | None = None, end: int | None = None) -> torch.Tensor:
    """`pad` of sequences given as their concatenation `flat` and their `lengths`."""
    first = int(start is not None)
    width = lengths.max() + first + int(end is not None) if len(lengths) else 0
    out = np.full((len(lengths), width), PAD, dtype=np.int64)
    out[np.repeat(np.arange(len(lengths)), lengths), _within(lengths) + first] = flat
    if start is not None and len(lengths):
        out[:, 0] = start
    if end is not None:
        out[np.arange(len(lengths)), lengths + first] = end
    return torch.from_numpy(out)


def _within(lengths: np.ndarray) -> np.ndarray:
    """For sequences of `lengths` laid end to end, each token's position within its own sequence."""
    return np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)


class PairTable:
    """Tokenized pairs (`src_ids`, `tgt_ids`), fetched by row indices as padded batches straight from the
    dataset's Arrow columns, without Python lists.

    Row access through `datasets` (`ds[indices]`) builds a Python list per sentence, then `collate` pads them:
    65 ms for a 64k-token batch on the H100 machine's host, where a training step takes 87 ms (BENCHMARKS.md,
    "GPU speed"). `scripts/bench_batches.py` times both ways.
    """

    def __init__(self, ds):
        # Without an index mapping (`filter_pairs` writes the kept pairs out) a zero-copy slice of the file.
        table = ds.select_columns(["src_ids", "tgt_ids"]).with_format("arrow")[:]
        self.src, self.tgt = ListColumn(table.column("src_ids")), ListColumn(table.column("tgt_ids"))

    def __len__(self) -> int:
        return len(self.src)

    def batch(self, indices: np.ndarray) -> Batch:
        """The pairs at `indices`, as `collate` pads them."""
        src, src_len = self.src.take(indices)
        tgt, tgt_len = self.tgt.take(indices)
        return Batch(pad_flat(src, src_len, end=EOS), pad_flat(tgt, tgt_len, start=BOS),
                     pad_flat(tgt, tgt_len, end=EOS))


class ListColumn:
    """An Arrow list-of-integers column, read by row: NumPy views of its chunks' values (zero-copy, so a
    memory-mapped file stays on disk), and each row's chunk, start and length.

    Arrow's own `take` on a column of many chunks (`datasets` writes one per 1,000 rows) first joins them all:
    a copy of the whole column for every batch. Here a batch costs its own rows only.
    """

    def __init__(self, column):
        self.values = [chunk.values.to_numpy() for chunk in column.chunks]  # offsets index the unsliced values
        offsets = [chunk.offsets.to_numpy() for chunk in column.chunks]
        # 12 bytes a row where positions within a chunk fit in 32 bits (Arrow's `list` offsets always do):
        # 120 MB for both sides of 5M pairs.
        position = np.int32 if all(o[-1] < 2**31 for o in offsets if len(o)) else np.int64
        self.chunk = np.repeat(np.arange(len(offsets), dtype=np.int32), [len(o) - 1 for o in offsets])
        self.start = np.concatenate([o[:-1] for o in offsets] or [[]]).astype(position)
        self.length = np.concatenate([np.diff(o) for o in offsets] or [[]]).astype(position)

    def __len__(self) -> int:
        return len(self.chunk)

    def take(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The rows `indices`, as their concatenated values (int64) and their lengths."""
        chunk = self.chunk[indices]
        start, length = self.start[indices].astype(np.int64), self.length[indices].astype(np.int64)
        if len(self.values) == 1:  # one array: a single gather
            flat = self.values[0][np.repeat(start, length) + _within(length)]
        else:
            flat = np.concatenate([self.values[c][s : s + n] for c, s, n in
                                   zip(chunk.tolist(), start.tolist(), length.tolist(), strict=True)]
                                  or [np.zeros(0, dtype=np.int64)])
        return flat.astype(np.int64, copy=False), length


@dataclass
class PreparedData:
    """A run's tokenizer and tokenized data, ready for batching."""

    tokenizer: Tokenizer
    train: Any  # datasets.Dataset with src_ids / tgt_ids
    valid: Any
    src_len: np.ndarray
    tgt_len: np.ndarray

    @functools.cached_property
    def valid_columns(self) -> dict[str, list]:
        """The validation set as column lists, read from Arrow once per run rather than at every validation."""
        return self.valid[:]


def check_corpora(config: Config) -> None:
    """Finds every corpus the config names (fetching those mt downloads, but not the test set), so that a typo
    fails before anything else is done.

    Raises:
        DataError: naming the config key of a corpus that cannot be found.
    """
    for spec, _ in corpora.parse_corpus_list(config.data.train):
        _resolve("data.train", spec, config)
    _resolve("data.valid", config.data.valid, config)
    _resolve("data.test", config.data.test, config, fetch=False)


def _resolve(key: str, spec: Any, config: Config, fetch: bool = True):
    """`corpora.resolve` for one corpus of the config; its errors name the config key."""
    try:
        return corpora.resolve(spec, config.data.src_lang, config.data.tgt_lang, fetch=fetch)
    except DataError as e:
        raise DataError(f"{key}: {e}") from None


def prepare_data(config: Config, run_dir: Path) -> PreparedData:
    """Reads, tokenizes and filters the corpora; trains the tokenizer unless the run already has one."""
    import datasets

    data = config.data
    valid_files = _resolve("data.valid", data.valid, config)  # a typo fails before the long read
    # mt eval's test set, checked now rather than after training; a corpus mt would download is not fetched yet
    _resolve("data.test", data.test, config, fetch=False)
    parts, names, cleaning = [], [], []
    for spec, repeat in corpora.parse_corpus_list(data.train):
        files = _resolve("data.train", spec, config)
        plain = not isinstance(files, corpora.CorpusFiles) or str(files.src) in files.name  # a dataset, or paths
        where = "" if plain else f" ({files.src}, {files.tgt})"
        log.info("reading %s%s", files.name, where)
        corpus = load_corpus(files, data.max_pairs)
        if len(corpus) == 0:
            raise DataError(f"training corpus {files.name} is empty")
        corpus, report = clean_pairs(corpus, data.normalize, data.dedupe)
        log.info("%s: %s%s", files.name, report.describe(), f"; repeated {repeat} times" if repeat > 1 else "")
        parts += [corpus] * repeat
        names.append(files.name + (f"*{repeat}" if repeat > 1 else ""))
        cleaning.append({"corpus": files.name, "repeat": repeat, **asdict(report)})
    train = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    valid = load_corpus(valid_files)
    if len(valid) == 0:
        raise DataError(f"validation corpus {valid_files.name} is empty")
    if data.normalize:
        valid = valid.map(_normalize_source, batched=True)
    tokenizer_path = run_dir / checkpoint.TOKENIZER
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        log.info("reusing %s (%d pieces)", tokenizer_path, tokenizer.vocab_size)
    else:
        t = config.tokenizer
        log.info("training a %s SentencePiece tokenizer of %d pieces", t.type, t.vocab_size)
        sample = train
        if 2 * len(train) > t.sample_sentences:  # a random sample of pairs: the corpus is never all in memory
            picked = np.random.default_rng(config.train.seed).choice(len(train), t.sample_sentences // 2, replace=False)
            sample = train.select(np.sort(picked))
        tokenizer = Tokenizer.train(list(sample["src"]) + list(sample["tgt"]), t.vocab_size, t.type,
                                    t.character_coverage, t.sample_sentences, seed=config.train.seed)
        tokenizer.save(tokenizer_path)
    cache = run_dir / checkpoint.CACHE
    try:
        train, report = filter_pairs(tokenize(train, tokenizer, data.workers, cache), data.max_tokens,
                                     data.max_ratio, cache)
        valid = tokenize(valid, tokenizer, cache=cache)
    except OSError as e:  # datasets' and Arrow's writes name no file
        raise DataError(f"cannot write the tokenized data to {cache}/: {e.strerror or e} "
                        f"({free_mib(run_dir):,.0f} MiB free on its disk)") from None
    log.info("training data: %s", report.describe())
    if report.kept == 0:
        raise DataError(f"no training pairs left after filtering {' + '.join(names)} "
                        f"(data.max_tokens={data.max_tokens}, data.max_ratio={data.max_ratio})")
    src_len, tgt_len = lengths(train)
    stats = {"train": names, "valid": valid_files.name, "cleaning": cleaning, "filter": asdict(report),
             "valid_pairs": len(valid), "vocab_size": tokenizer.vocab_size,
             "train_src_tokens": int(src_len.sum()), "train_tgt_tokens": int(tgt_len.sum())}
    write_bytes(run_dir / checkpoint.DATA_STATS, (json.dumps(stats, indent=2) + "\n").encode())
    return PreparedData(tokenizer, train, valid, src_len, tgt_len)


def _normalize_source(batch: dict[str, list[str]]) -> dict[str, list[str]]:
    # Validation sources are normalised as translation input is; references stay as they are.
    return {"src": [normalize_text(t) for t in batch["src"]]}
