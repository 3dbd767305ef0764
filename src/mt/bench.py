"""Side-by-side speed measurements in one process, on one machine:

1. the roof: a large matrix product in the training dtype, in FLOP/s;
2. training throughput of the config's model on real length-bucketed batches (tokens/s, share of real
   tokens, model FLOP/s, MFU = model FLOP/s ÷ roof);
3. the same for a model of the same size built from `torch.nn.Transformer`, trained the plain way (fp32,
   random batches of sentences, logits for every position), and the ratio ours ÷ reference;
4. decoding a test set with greedy and beam search: ours (KV cache, batched, length-sorted) against the
   same search recomputing the whole prefix every step and, when CTranslate2 is installed (`mt[export]`), the
   run exported to it in float32 and int8: the ratios and the share of outputs identical to ours (each
   decoder's fastest of a few alternating rounds);
5. peak memory (RSS on the CPU, allocated on CUDA).

Model FLOPs count the real (non-padding) tokens only: padding is work the hardware does, not the model.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mt import checkpoint, corpora, distributed, fastpaths
from mt.config import Config, DecodeConfig, ModelConfig
from mt.data import Batch, PairTable, PreparedData, make_batches, prepare_data, read_corpus
from mt.devices import (
    autocast_dtype,
    bf16_without_instructions,
    cpu_model,
    cpu_vector_set,
    resolve_device,
    training_precision,
)
from mt.errors import CheckpointError, MtError
from mt.export import ExportedTranslator
from mt.layers import SinusoidalPositions
from mt.masks import causal_mask
from mt.tokenizer import PAD
from mt.train import Trainer
from mt.translate import Translator, translate_ids


@dataclass
class Row:
    """One line of the benchmark table."""

    what: str
    value: float
    unit: str
    note: str = ""


def matmul_roof(device: torch.device, dtype: torch.dtype, size: int, seconds: float = 2.0) -> tuple[float, int]:
    """FLOP/s of a square matrix product in `dtype`, the best of repeated timings for about `seconds`, and the
    product's size: `size`, or on a CPU the largest power of two below it whose product takes under `seconds`.

    A CPU without bf16 instructions multiplies bf16 in plain loops: a 2048² product took 100 s on a Zen 1
    EPYC (AVX2), 400 times as long as in fp32; `train.precision: auto` trains in fp32 there.
    """
    if device.type == "cpu":  # timed at 256², which takes milliseconds at any speed, then scaled by size³
        while size > 256 and _product_seconds(device, dtype, 256) * (size / 256) ** 3 > seconds:
            size //= 2
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    products = 4 if device.type == "cuda" else 1  # per timing: a GPU's take microseconds to launch
    best, deadline = math.inf, time.perf_counter() + seconds
    while best == math.inf or time.perf_counter() < deadline:
        _sync(device)
        start = time.perf_counter()
        for _ in range(products):
            a @ b
        _sync(device)
        best = min(best, (time.perf_counter() - start) / products)
    return 2 * size**3 / best, size


def _product_seconds(device: torch.device, dtype: torch.dtype, size: int) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    a @ a
    start = time.perf_counter()
    a @ a
    return time.perf_counter() - start


def training_flops(config: ModelConfig, vocab: int, src_len: np.ndarray, tgt_len: np.ndarray) -> float:
    """Forward + backward FLOPs (3 × forward) of the model over sentences with these token counts (EOS and
    BOS included), counting matrix products only and causal self-attention as half a square."""
    d, f = config.d_model, config.d_ff
    s, t = src_len.astype(np.float64), tgt_len.astype(np.float64)
    encoder = config.encoder_layers * (s * (8 * d * d + 4 * d * f) + 4 * s * s * d)
    decoder = config.decoder_layers * (t * (8 * d * d + 4 * d * d + 4 * d * f) + s * 4 * d * d
                                       + 2 * t * t * d + 4 * t * s * d)
    output = t * 2 * d * vocab
    return float(3 * (encoder + decoder + output).sum())


class ReferenceTransformer(nn.Module):
    """The same model built the plain way from `torch.nn.Transformer`: logits for every target position.

    Same sizes, norm placement and activation; where `nn.Transformer` differs it is in torch's own ways: a final
    LayerNorm after the encoder and after the decoder, and `model.dropout` on the attention weights too.
    """

    def __init__(self, config: ModelConfig, vocab: int):
        super().__init__()
        self.d_model = config.d_model
        self.embed = nn.Embedding(vocab, config.d_model, padding_idx=PAD)
        self.positions = SinusoidalPositions(config.d_model, config.max_positions)
        self.transformer = nn.Transformer(
            config.d_model, config.heads, config.encoder_layers, config.decoder_layers, config.d_ff,
            config.dropout, config.activation, batch_first=True, norm_first=config.norm == "pre",
        )

    def forward(self, src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        def embed(x):
            return self.embed(x) * math.sqrt(self.d_model) + self.positions(x.size(1))

        causal = ~causal_mask(tgt.size(1), tgt.device)  # torch's boolean masks: True = may NOT attend
        out = self.transformer(embed(src), embed(tgt), tgt_mask=causal, src_key_padding_mask=src == PAD,
                               tgt_key_padding_mask=tgt == PAD, memory_key_padding_mask=src == PAD)
        return out @ self.embed.weight.t()


COMPILED_WARMUP = 20


def measure_training(step: Callable[[Any], None], batches: list, seconds: float, device: torch.device,
                     warmup: int = 3) -> tuple[float, int, list]:
    """Runs `step` over `batches` (cycling) for about `seconds` after `warmup` steps.

    Returns:
        Elapsed seconds, steps taken and the batches measured.
    """
    for batch in batches[:warmup]:
        step(batch)
    _sync(device)
    done: list = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        batch = batches[(warmup + len(done)) % len(batches)]
        step(batch)
        done.append(batch)
    _sync(device)
    return time.perf_counter() - start, len(done), done


@dataclass
class Training:
    """Our model's training, as `train_ours` measured it."""

    tokens: float  # target tokens per second
    flops: float  # model FLOPs per second, real tokens only
    real_share: float  # real (non-padding) share of the source and target tokens
    peak: float  # bytes: peak RSS of the process on the CPU; on CUDA, peak allocated from the warm-up on
    steps: int
    warmup: int


def train_ours(config: Config, data: PreparedData, batches: list[np.ndarray], seconds: float) -> Training:
    """Times `mt train`'s own update (`Trainer.step`) of a fresh model on `batches` (row indices), one batch an
    update. The model is freed before it returns."""
    trainer = Trainer(config, data, distributed.Context())
    device = trainer.device
    # Compiled, the warm-up runs the first COMPILED_WARMUP batches: a few batch sizes cross thresholds that
    # torch.compile's generated code guards on, and each first crossing compiles again.
    warmup = COMPILED_WARMUP if config.train.compile else 3
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elapsed, steps, done = measure_training(trainer.one_batch_step, batches, seconds, device, warmup)
    done = [trainer.rows.batch(idx) for idx in done]
    flops = sum(training_flops(config.model, data.tokenizer.vocab_size, *_batch_lengths(b)) for b in done)
    result = Training(tokens=sum(b.target_tokens for b in done) / elapsed, flops=flops / elapsed,
                      real_share=_real_share(done), peak=_peak_memory(device), steps=steps, warmup=warmup)
    del trainer
    _free(device)
    return result


def _train_reference(model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
                     ) -> Callable[[Batch], None]:
    """One update of the `nn.Transformer` reference on a batch: fp32, plain autograd loss."""

    def step(batch: Batch) -> None:
        batch = batch.to(device)
        (_reference_loss(model, batch) / batch.target_tokens).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def _reference_loss(model: ReferenceTransformer, batch: Batch) -> torch.Tensor:
    logits = model(batch.src, batch.tgt_in)
    return F.cross_entropy(logits.flatten(0, 1).float(), batch.tgt_out.flatten(), ignore_index=PAD,
                           label_smoothing=0.1, reduction="sum")


def _real_share(batches: list[Batch]) -> float:
    real = sum(int((b.src != PAD).sum() + (b.tgt_out != PAD).sum()) for b in batches)
    padded = sum(b.src.numel() + b.tgt_out.numel() for b in batches)
    return real / padded


def _batch_lengths(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
    return (batch.src != PAD).sum(1).numpy(), (batch.tgt_out != PAD).sum(1).numpy()


def run_benchmark(config: Config, run_dir: Path | None, seconds: float = 60.0, sentences: int = 1000,
                  test: str | None = None, rounds: int = 3, decode: bool = True, reference: bool = True,
                  rows: list[Row] | None = None) -> list[Row]:
    """Measures everything listed in the module docstring and returns the table's rows; without `decode`,
    training alone (the run, if given, still lends its tokenizer); without `reference`, no `nn.Transformer`
    (to compare settings of our own model quickly). Rows are appended to `rows`, when given, as they are
    measured: a caller stopped midway still has them."""
    device = resolve_device(config)
    if decode and run_dir is not None:  # a bad run or test set fails now, not after the training measurements
        if isinstance(Translator.load(run_dir, device="cpu"), ExportedTranslator):  # its config, tokenizer, weights
            raise CheckpointError(f"{run_dir} is an export: mt bench measures a run folder (and exports it itself)")
        corpora.resolve(test or _default_test(config), config.data.src_lang, config.data.tgt_lang)
    amp = autocast_dtype(config.train.precision, device)
    rows = [] if rows is None else rows
    roof_dtype = amp or torch.float32
    largest = 8192 if device.type == "cuda" else 2048
    scale, flop_unit = (1e12, "TFLOP/s") if device.type == "cuda" else (1e9, "GFLOP/s")
    roof, size = matmul_roof(device, roof_dtype, largest, min(2.0, seconds))
    slow = ", no bf16 instructions: train.precision auto trains in fp32 here" if bf16_without_instructions(
        config, device) else ""
    rows.append(Row(f"roof: {size}² matmul, {str(roof_dtype).removeprefix('torch.')}", roof / scale, flop_unit,
                    _device_name(device) + slow))
    if amp is not None:
        fp32_roof, size = matmul_roof(device, torch.float32, largest, min(2.0, seconds))
        rows.append(Row(f"roof: {size}² matmul, float32", fp32_roof / scale, flop_unit))

    data = training_data(config, run_dir)
    vocab = data.tokenizer.vocab_size
    table = PairTable(data.train)
    index_batches = make_batches(data.src_len, data.tgt_len, config.train.batch_tokens, seed=config.train.seed)
    n_batches = min(len(index_batches), 400)
    per_batch = int(np.mean([len(b) for b in index_batches]))
    shuffled = np.random.default_rng(config.train.seed).permutation(len(data.src_len))
    ref_batches = [table.batch(shuffled[i : i + per_batch])
                   for i in range(0, min(len(shuffled), per_batch * n_batches), per_batch) if reference]

    ours = train_ours(config, data, index_batches[:n_batches], seconds)
    rows += [
        Row("train ours: target tokens/s", ours.tokens, "tok/s", f"{ours.steps} steps, {config.train.batch_tokens} "
            f"tokens/batch, {training_precision(config, amp)}"
            f"{f', compiled, {ours.warmup} warm-up steps' if config.train.compile else ''}"
            f"{'' if fastpaths.ENABLED else ', fast paths off (--plain)'}"),
        Row("train ours: real (non-pad) share", 100 * ours.real_share, "%", "source + target"),
        Row("train ours: model FLOP/s", ours.flops / scale, flop_unit),
        Row("train ours: MFU", 100 * ours.flops / roof, "%", "model FLOP/s ÷ roof"),
        Row("train ours: peak memory", ours.peak / 2**30, "GiB", "RSS" if device.type == "cpu" else "allocated"),
    ]
    if reference:
        rows += _reference_rows(config, vocab, ref_batches, per_batch, seconds, device, roof, ours.tokens)
    if not decode:
        return rows
    if run_dir is None:
        rows.append(Row("decoding", math.nan, "", "skipped: no trained run (pass --run)"))
        return rows
    rows += _decoding_rows(run_dir, config, device, test or _default_test(config), sentences, rounds)
    return rows


def _reference_rows(config: Config, vocab: int, batches: list[Batch], per_batch: int, seconds: float,
                    device: torch.device, roof: float, ours_tokens: float) -> list[Row]:
    """Trains the `nn.Transformer` reference the plain way and compares; a reference that runs out of device
    memory (fp32, logits for every position of random, hence long-padded, batches) gets a row saying so."""
    torch.manual_seed(config.train.seed)
    reference = ReferenceTransformer(config.model, vocab).to(device).train()
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-4)
    step = _train_reference(reference, optimizer, device)
    try:
        measured = measure_training(step, batches, seconds, device)
    except torch.OutOfMemoryError:
        measured = None  # freed below, once the exception no longer holds the step's tensors
    if measured is None:
        del reference, optimizer, step
        _free(device)
        return [Row("train nn.Transformer", math.nan, "", f"out of {device.type} memory with random batches of "
                    f"{per_batch} sentences: not compared (lower train.batch_tokens)")]
    elapsed, steps, done = measured
    ref_tokens = sum(b.target_tokens for b in done) / elapsed
    ref_flops = sum(training_flops(config.model, vocab, *_batch_lengths(b)) for b in done) / elapsed
    return [
        Row("train nn.Transformer: target tokens/s", ref_tokens, "tok/s",
            f"{steps} steps, fp32, random batches of {per_batch} sentences"),
        Row("train nn.Transformer: real (non-pad) share", 100 * _real_share(done), "%"),
        Row("train nn.Transformer: MFU", 100 * ref_flops / roof, "%", "÷ the first roof, whatever dtype it is"),
        Row("train speed-up, ours ÷ nn.Transformer", ours_tokens / ref_tokens, "×"),
    ]


def _free(device: torch.device) -> None:
    """Returns the memory of deleted models to the device, so that the next measurement starts clean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def training_data(config: Config, run_dir: Path | None):
    """The config's training data, prepared in a temporary folder and tokenized with the run's tokenizer when
    there is one (else a new tokenizer is trained)."""
    workdir = Path(tempfile.mkdtemp(prefix="mt-bench-"))
    try:
        if run_dir is not None and (run_dir / checkpoint.TOKENIZER).is_file():
            shutil.copy(run_dir / checkpoint.TOKENIZER, workdir / checkpoint.TOKENIZER)
        return prepare_data(config, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _default_test(config: Config) -> str:
    return config.data.test if isinstance(config.data.test, str) else "multi30k:test_2016_flickr"


def _decoding_rows(run_dir: Path, config: Config, device: torch.device, test: str, sentences: int,
                   rounds: int) -> list[Row]:
    translator = Translator.load(run_dir, device=str(device))
    files = corpora.resolve(test, config.data.src_lang, config.data.tgt_lang)
    sources = translator.tokenizer.encode(read_corpus(files)[0][:sentences])
    precision = "bf16 autocast" if translator.amp else "fp32"

    def ours(use_cache: bool) -> Callable[[list[list[int]], DecodeConfig], list[list[int]]]:
        return lambda batch, decode: [h[0].tokens for h in translate_ids(translator.model, batch, decode,
                                                                         use_cache=use_cache, amp=translator.amp)]

    decoders = {"ours (KV cache)": (ours(True), precision), "recompute prefix": (ours(False), precision)}
    with tempfile.TemporaryDirectory(prefix="mt-bench-") as exports:
        decoders |= _ctranslate2_decoders(run_dir, Path(exports), device, config.decode.inter_threads)
        rows = []
        for beam in (1, 5):
            rows += _time_decoders(decoders, sources, files.name, beam, rounds, device, replace(
                translator.config.decode, beam_size=beam, batch_tokens=config.decode.batch_tokens,
                inter_threads=config.decode.inter_threads))  # the run's tuned settings, the machine's batches
    return rows


def _ctranslate2_decoders(run_dir: Path, folder: Path, device: torch.device, streams: int) -> dict:
    """CTranslate2 float32 and int8 decoders of the run, exported into `folder`; none when CTranslate2 is not
    installed or does not run on `device`."""
    from mt import export

    try:
        ctranslate2 = export.require_ctranslate2()
    except MtError:
        return {}
    if device.type not in ("cpu", "cuda"):
        return {}
    decoders = {}
    kinds = {"float32", "int8"} & ctranslate2.get_supported_compute_types(device.type)
    for kind in sorted(kinds):
        export.export_ctranslate2(run_dir, folder / kind, kind)
        with _torch_threads_kept():
            exported = export.ExportedTranslator.load(folder / kind, device.type, streams=streams)

        def decode_with(batch: list[list[int]], decode: DecodeConfig, exported=exported) -> list[list[int]]:
            with _torch_threads_kept():
                return [h[0].tokens for h in exported._search(batch, decode, 1, None, None, None)]

        decoders[f"CTranslate2 {kind}"] = (decode_with, f"CTranslate2 {ctranslate2.__version__}, {kind} weights")
    return decoders


@contextlib.contextmanager
def _torch_threads_kept():
    """Gives torch back its thread count on leaving: CTranslate2 sets the OpenMP thread count of the thread that
    creates or runs a translator, which torch shares, and torch's decoding then ran on one thread of two."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _time_decoders(decoders: dict, sources: list[list[int]], test_name: str, beam: int, rounds: int,
                   device: torch.device, decode: DecodeConfig) -> list[Row]:
    """Each decoder's fastest of `rounds` alternating rounds, and the ratios against ours (KV cache)."""
    search = "greedy" if beam == 1 else f"beam {beam}"
    elapsed = dict.fromkeys(decoders, math.inf)
    outputs = {}
    for run, _ in decoders.values():  # warm-up
        run(sources[:8], decode)
    for _ in range(rounds):  # the decoders alternate, so that all see the machine in the same states
        for name, (run, _) in decoders.items():
            _sync(device)
            start = time.perf_counter()
            outputs[name] = run(sources, decode)
            _sync(device)
            elapsed[name] = min(elapsed[name], time.perf_counter() - start)
    rows = []
    for name, (_, note) in decoders.items():
        tokens = sum(len(t) + 1 for t in outputs[name])
        rows.append(Row(f"{search} {name}: sentences/s", len(sources) / elapsed[name], "sent/s",
                        f"{len(sources)} sentences of {test_name}, {tokens / elapsed[name]:.0f} tokens/s, {note}, "
                        f"decode.batch_tokens {decode.batch_tokens}, inter_threads {decode.inter_threads}"))
    ours = "ours (KV cache)"
    for name in decoders:
        if name == ours:
            continue
        same = sum(a == b for a, b in zip(outputs[ours], outputs[name], strict=True))
        rows.append(Row(f"{search} {ours} ÷ {name}", elapsed[name] / elapsed[ours], "×",
                        f"fastest of {rounds} alternating rounds each; identical outputs: {same}/{len(sources)}"))
    return rows


def _peak_memory(device: torch.device) -> float:
    if device.type == "cuda":
        return float(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux reports KiB


def _device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name, threads and widest vector instructions."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads, {cpu_vector_set()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def format_table(rows: list[Row]) -> str:
    width = max(len(r.what) for r in rows)
    lines = [f"| {'measure':<{width}} | {'value':>10} | unit    | note |",
             f"|{'-' * (width + 2)}|-----------:|---------|------|"]
    for r in rows:
        value = "—" if math.isnan(r.value) else f"{r.value:,.2f}" if r.value < 100 else f"{r.value:,.0f}"
        lines.append(f"| {r.what:<{width}} | {value:>10} | {r.unit:<7} | {r.note} |")
    return "\n".join(lines)
