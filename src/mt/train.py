"""Training: data preparation, the loss, the learning-rate schedule, the loop, validation and checkpoints.

The schedule is the Transformer paper's (Vaswani et al., 2017, section 5.3) with the peak given directly:
linear warmup to `train.lr`, then decay with the inverse square root of the step. The loss is label-smoothed
cross-entropy (Szegedy et al., 2016) over the real (non-padding) target tokens only, so no output
projection is spent on padding. On CUDA the forward pass runs under bf16 autocast.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mt import checkpoint, corpora
from mt.config import Config, config_to_dict, load_config, save_config
from mt.data import Batch, collate, filter_pairs, lengths, load_corpus, make_batches, tokenize
from mt.errors import CheckpointError, ConfigError, DataError, MtError
from mt.evaluate import bleu
from mt.model import Transformer
from mt.tokenizer import PAD, Tokenizer
from mt.translate import translate_ids

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """Where training stands: everything besides weights and optimizer that resume must restore."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of this epoch already consumed
    seconds: float = 0.0  # training time over all sessions of the run
    best_bleu: float = -1.0
    best_step: int = 0


@dataclass
class PreparedData:
    tokenizer: Tokenizer
    train: Any  # datasets.Dataset with src_ids / tgt_ids
    valid: Any
    src_len: np.ndarray
    tgt_len: np.ndarray


def resolve_device(config: Config) -> torch.device:
    wanted = config.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(wanted)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), where bf16 autocast trains faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def autocast_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    precision = config.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" or cpu_has_bf16() else "fp32"
    return torch.bfloat16 if precision == "bf16" else None


def inverse_sqrt_schedule(step: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at update `step` (1-based)."""
    step = max(step, 1)
    return min(step / warmup, math.sqrt(warmup / step))


def prepare_run_dir(config: Config, resume: bool, overwrite: bool) -> Path:
    """Creates (or, with `overwrite`, empties) the run folder, or checks it for `resume`.

    Raises:
        MtError: if the folder exists and neither flag says what to do with it.
    """
    run_dir = config.run_dir
    if resume:
        if not (run_dir / checkpoint.LAST).is_file():
            raise CheckpointError(f"cannot resume: {run_dir / checkpoint.LAST} does not exist")
        saved = load_config(run_dir / checkpoint.CONFIG)
        for section in ("model", "tokenizer", "data"):
            if getattr(saved, section) != getattr(config, section):
                raise ConfigError(f"cannot resume {run_dir}: the {section} section differs from the run's "
                                  f"{checkpoint.CONFIG}; resume with the same config or train a new run")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise MtError(f"run folder {run_dir} already exists; pass --resume to continue it, --overwrite to "
                          "start it again, or choose another name with --set name=NEW")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def prepare_data(config: Config, run_dir: Path) -> PreparedData:
    """Reads, tokenizes and filters the corpora; trains the tokenizer unless the run already has one."""
    data = config.data
    train_files = corpora.resolve(data.train, data.src_lang, data.tgt_lang)
    valid_files = corpora.resolve(data.valid, data.src_lang, data.tgt_lang)
    log.info("reading %s (%s, %s)", train_files.name, train_files.src, train_files.tgt)
    train = load_corpus(train_files, data.max_pairs)
    valid = load_corpus(valid_files)
    if len(train) == 0:
        raise DataError(f"training corpus {train_files.name} is empty")
    tokenizer_path = run_dir / checkpoint.TOKENIZER
    if tokenizer_path.is_file():
        tokenizer = Tokenizer.load(tokenizer_path)
        log.info("reusing %s (%d pieces)", tokenizer_path, tokenizer.vocab_size)
    else:
        t = config.tokenizer
        log.info("training a %s SentencePiece tokenizer of %d pieces", t.type, t.vocab_size)
        tokenizer = Tokenizer.train(list(train["src"]) + list(train["tgt"]), t.vocab_size, t.type, t.character_coverage,
                                    t.sample_sentences, seed=config.train.seed)
        tokenizer.save(tokenizer_path)
    train, report = filter_pairs(tokenize(train, tokenizer), data.max_tokens, data.max_ratio)
    log.info("training data: %s", report.describe())
    if report.kept == 0:
        raise DataError(f"no training pairs left after filtering {train_files.name} "
                        f"(data.max_tokens={data.max_tokens}, data.max_ratio={data.max_ratio})")
    valid = tokenize(valid, tokenizer)
    src_len, tgt_len = lengths(train)
    stats = {"train": train_files.name, "valid": valid_files.name, "filter": asdict(report),
             "valid_pairs": len(valid), "vocab_size": tokenizer.vocab_size,
             "train_src_tokens": int(src_len.sum()), "train_tgt_tokens": int(tgt_len.sum())}
    (run_dir / checkpoint.DATA_STATS).write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return PreparedData(tokenizer, train, valid, src_len, tgt_len)


def loss_fn(model: Transformer, batch: Batch, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed label-smoothed cross-entropy and summed plain NLL over the batch's real target tokens."""
    memory, mask = model.encode(batch.src)
    states = model.decode(batch.tgt_in, memory, mask)
    real = batch.tgt_out != PAD
    logits = model.logits(states[real]).float()  # (N, V): only real positions
    targets = batch.tgt_out[real]
    loss = F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction="sum")
    nll = F.cross_entropy(logits.detach(), targets, reduction="sum")
    return loss, nll


@torch.no_grad()
def validate(model: Transformer, data: PreparedData, config: Config, device: torch.device,
             amp: torch.dtype | None) -> dict[str, float]:
    """Validation loss (per token, no smoothing) on all valid pairs, and greedy BLEU on the first
    `train.valid_sentences` of them."""
    model.eval()
    valid = data.valid[:]  # a dict of column lists
    limit = model.config.max_positions - 1
    src_ids = [ids[:limit] for ids in valid["src_ids"]]
    tgt_ids = [ids[: limit - 1] for ids in valid["tgt_ids"]]
    total_nll, total_tokens = 0.0, 0
    order = sorted(range(len(src_ids)), key=lambda i: len(src_ids[i]))
    for start in range(0, len(order), 64):
        chunk = order[start : start + 64]
        batch = collate([src_ids[i] for i in chunk], [tgt_ids[i] for i in chunk]).to(device)
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            _, nll = loss_fn(model, batch, 0.0)
        total_nll += float(nll)
        total_tokens += batch.target_tokens
    n = config.train.valid_sentences or len(src_ids)
    greedy = replace(config.decode, beam_size=1)
    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
        hyps = translate_ids(model, src_ids[:n], greedy)
    outputs = data.tokenizer.decode([h[0].tokens for h in hyps])
    model.train()
    loss = total_nll / max(total_tokens, 1)
    return {"valid_loss": loss, "valid_ppl": math.exp(min(loss, 50)), "valid_bleu": bleu(outputs, valid["tgt"][:n])}


def _rng_state() -> dict[str, Any]:
    """The random state that training consumes: dropout draws from torch's generators. (Batch order comes
    from its own generator, seeded with seed + epoch.)"""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def train(config: Config, resume: bool = False, overwrite: bool = False, show_progress: bool | None = None) -> Path:
    """Trains a model as `config` says and returns its run folder.

    Raises:
        MtError: for bad config values, data or run folders, before any training starts.
    """
    run_dir = prepare_run_dir(config, resume, overwrite)
    file_log = logging.FileHandler(run_dir / checkpoint.LOG, encoding="utf-8")
    file_log.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("mt").addHandler(file_log)
    try:
        return _train(config, run_dir, resume, show_progress)
    finally:
        logging.getLogger("mt").removeHandler(file_log)
        file_log.close()


def _train(config: Config, run_dir: Path, resume: bool, show_progress: bool | None) -> Path:
    tc = config.train
    device = resolve_device(config)
    amp = autocast_dtype(config, device)
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)
    save_config(config, run_dir / checkpoint.CONFIG)
    data = prepare_data(config, run_dir)

    model = Transformer(config.model, data.tokenizer.vocab_size).to(device)
    log.info("model: %s parameters, device %s, %s", f"{model.num_parameters():,}", device,
             "bf16 autocast" if amp else "fp32")
    decay = [p for n, p in model.named_parameters() if p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if p.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=tc.lr, betas=tc.adam_betas, eps=1e-9, fused=device.type == "cuda",
    )
    progress = Progress()
    if resume:
        state = checkpoint.load(run_dir / checkpoint.LAST, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        progress = Progress(**state["progress"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        log.info("resuming %s at step %d (epoch %d)", run_dir, progress.step, progress.epoch + 1)

    def save_last() -> None:
        checkpoint.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "progress": asdict(progress), "rng": _rng_state(), "config": config_to_dict(config)},
                        run_dir / checkpoint.LAST)

    def finished() -> bool:
        return bool((tc.max_steps and progress.step >= tc.max_steps)
                    or (tc.max_epochs and progress.epoch >= tc.max_epochs)
                    or (tc.max_minutes and progress.seconds >= tc.max_minutes * 60))

    train_rows = data.train.with_format(None, columns=["src_ids", "tgt_ids"])
    bar = tqdm(total=tc.max_steps or None, initial=progress.step, unit="step", dynamic_ncols=True,
               disable=(not show_progress) if show_progress is not None else None, desc="train")
    model.train()
    last_validated = progress.step
    window_tokens, window_loss = 0, torch.zeros((), device=device)
    window_start = clock = time.perf_counter()

    def tick() -> None:  # training time includes validation: it is the wall time the run costs
        nonlocal clock
        now = time.perf_counter()
        progress.seconds += now - clock
        clock = now

    try:
        while not finished():
            batches = make_batches(data.src_len, data.tgt_len, tc.batch_tokens, seed=tc.seed + progress.epoch)
            if len(batches) < tc.accumulate:
                raise DataError(f"the training data makes {len(batches)} batches, fewer than "
                                f"train.accumulate={tc.accumulate}; lower train.accumulate or train.batch_tokens")
            for first in range(progress.batch_in_epoch, len(batches) - tc.accumulate + 1, tc.accumulate):
                step_batches = []
                for idx in batches[first : first + tc.accumulate]:
                    rows = train_rows[idx]
                    step_batches.append(collate(rows["src_ids"], rows["tgt_ids"]).to(device))
                lr = tc.lr * inverse_sqrt_schedule(progress.step + 1, tc.warmup_steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                tokens = sum(b.target_tokens for b in step_batches)
                for batch in step_batches:
                    with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                        loss, _ = loss_fn(model, batch, tc.label_smoothing)
                    (loss / tokens).backward()
                    window_loss += loss.detach()
                if tc.clip_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), tc.clip_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                progress.step += 1
                progress.batch_in_epoch = first + tc.accumulate
                window_tokens += tokens
                tick()
                bar.update(1)
                if progress.step % tc.log_every == 0:
                    elapsed = time.perf_counter() - window_start
                    record = {"step": progress.step, "epoch": progress.epoch + 1,
                              "train_loss": float(window_loss) / window_tokens, "lr": lr,
                              "tokens_per_s": window_tokens / elapsed, "seconds": round(progress.seconds, 1)}
                    checkpoint.append_metrics(run_dir, record)
                    bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{lr:.1e}",
                                    tok_s=f"{record['tokens_per_s']:.0f}", epoch=progress.epoch + 1)
                    window_tokens, window_start = 0, time.perf_counter()
                    window_loss.zero_()
                if progress.step % tc.valid_every == 0 or finished():
                    _validate_and_save(model, data, config, device, amp, progress, run_dir)
                    tick()
                    save_last()
                    last_validated = progress.step
                    window_tokens, window_start = 0, time.perf_counter()
                    window_loss.zero_()
                if finished():
                    break
            else:
                progress.epoch += 1
                progress.batch_in_epoch = 0
                log.info("epoch %d done at step %d", progress.epoch, progress.step)
    except KeyboardInterrupt:
        bar.close()
        save_last()
        raise MtError(f"interrupted at step {progress.step}; checkpoint saved. Resume with: "
                      f"mt train --config {run_dir / checkpoint.CONFIG} --resume") from None
    bar.close()
    if last_validated != progress.step:
        _validate_and_save(model, data, config, device, amp, progress, run_dir)
    save_last()
    log.info("done: %d steps in %.0f s; best valid BLEU %.2f at step %d", progress.step,
             progress.seconds, progress.best_bleu, progress.best_step)
    return run_dir


def _validate_and_save(model, data, config, device, amp, progress: Progress, run_dir: Path) -> None:
    started = time.perf_counter()
    metrics = validate(model, data, config, device, amp)
    record = {"step": progress.step, "epoch": progress.epoch + 1, **metrics,
              "validation_seconds": time.perf_counter() - started}
    checkpoint.append_metrics(run_dir, record)
    improved = metrics["valid_bleu"] > progress.best_bleu
    if improved:
        progress.best_bleu, progress.best_step = metrics["valid_bleu"], progress.step
        checkpoint.save({"model": model.state_dict(), "step": progress.step, "valid_bleu": metrics["valid_bleu"]},
                        run_dir / checkpoint.BEST)
    message = (f"step {progress.step}: valid loss {metrics['valid_loss']:.3f}, valid BLEU {metrics['valid_bleu']:.2f}"
               + (" (best)" if improved else f" (best {progress.best_bleu:.2f} at step {progress.best_step})"))
    log.info(message)
