"""The `mt` command line: each command parses its options, loads what it needs and calls one library function.

Errors the user can fix (`MtError`) are printed on one line, and the command exits with code 2.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from mt.config import TUNE_BEAMS, TUNE_PENALTIES
from mt.errors import DataError, Interrupted, MtError, out_of_memory
from mt.serve import Limits  # the limits of `mt serve` (standard library only: FastAPI loads when it serves)

app = typer.Typer(
    help="Train, run and score a French→English Transformer translator.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        import mt

        typer.echo(f"mt {mt.__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print mt's version and exit.")] = False) -> None:
    pass  # the options of `mt` itself; the help text is the Typer app's


RunOption = Annotated[
    Path | None, typer.Option("--run", help="Run folder (default: the most recent one in runs/).")
]
RunsDirOption = Annotated[Path, typer.Option("--runs-dir", help="Where to look for the most recent run.")]
DeviceOption = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
WeightsOption = Annotated[
    str | None, typer.Option("--weights", help="Checkpoint file in the run folder (default: best.pt).")
]
BeamOption = Annotated[int | None, typer.Option("--beam", min=1, help="Beam size (1 = greedy; default: the run's).")]
PrecisionOption = Annotated[str | None, typer.Option(
    "--precision", help="auto, fp32 or bf16 (default: the run's decode.precision; auto: bf16 on CUDA and on CPUs "
    "with bf16 instructions).")]
NoRepeatOption = Annotated[int | None, typer.Option(
    "--no-repeat-ngram-size", min=0, help="Repetition guard: no n-gram of this many pieces twice in a translation "
    "(0: off; default: the run's decode.no_repeat_ngram_size).")]


class _TqdmHandler(logging.Handler):
    """Logs through tqdm.write so messages do not break a progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except BrokenPipeError:  # `mt train 2>&1 | head`: the work goes on, silently; train.log has every line
            self.setLevel(logging.CRITICAL + 1)
            _to_nowhere(sys.stderr)


def _to_nowhere(stream) -> None:
    """Points `stream`'s file at /dev/null: after its reader went away, later writes (and the flush at exit)
    raise no more errors."""
    with contextlib.suppress(AttributeError, OSError, ValueError):  # a stream with no file (tests)
        os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())


def _setup_logging(quiet: bool = False, verbose: bool = False) -> None:
    logger = logging.getLogger("mt")
    logger.handlers = [h for h in logger.handlers if not isinstance(h, _TqdmHandler)]
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)  # train.log gets INFO even when quiet
    logger.propagate = False


def _errors_exit_2(command):
    """Turns an MtError or OSError into `error: message` on stderr and exit code 2 (130 for an interrupted run;
    a closed output pipe ends the command quietly)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except Interrupted as e:
            typer.echo(str(e), err=True)
            raise typer.Exit(130) from None
        except MtError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except BrokenPipeError:  # `mt translate ... | head`, `mt info | head -1`: the reader has all it wants
            _to_nowhere(sys.stdout)
            raise typer.Exit(0) from None
        except OSError as e:  # a full disk, a read-only folder: the file and the reason, not a traceback
            where = f"{e.filename}: " if e.filename else ""
            typer.echo(f"error: {where}{e.strerror or e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(130) from None
        except (MemoryError, RuntimeError) as e:
            if (message := out_of_memory(e)) is None:
                raise
            typer.echo(f"error: {message}", err=True)
            raise typer.Exit(2) from None

    return wrapper


@app.command()
@_errors_exit_2
def train(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: the built-in "
                                                  "one, same as configs/multi30k.yaml).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a key: --set train.lr=3e-4 "
                                                         "(repeatable).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run from its last checkpoint.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Delete an existing run folder of the same "
                                            "name first.")] = False,
    init_from: Annotated[Path | None, typer.Option("--init-from", help="Fine-tune: start from this run's weights "
                                                   "and tokenizer, with a new optimizer and schedule.")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Log only warnings and errors (the run folder is "
                                        "still printed).")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug messages too.")] = False,
) -> None:
    """Train a tokenizer and a Transformer; the run folder is runs/<name>/.

    Example: MT_DATA_PATH=../shared/data mt train --config configs/tiny.yaml --set train.max_steps=100;
    fine-tuning: mt train --config domain.yaml --init-from runs/multi30k
    """
    from mt.checkpoint import in_its_own_folder
    from mt.config import load_config
    from mt.train import train as run_training

    # oneDNN keeps a kernel for each shape of a bf16 product on the CPU, 1,024 by default, which decoding needs
    # (configure_process). Training pads its products to a few dozen shapes, and 256 kernels keep the memory
    # of its validation's decoding about 300 MB lower. Read at the first product; a value the user set wins.
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    _setup_logging(quiet, verbose)
    if resume and overwrite:
        raise MtError("--resume and --overwrite exclude each other")
    if init_from is not None:  # the same as init_from in the config: recorded in the run's config.yaml
        overrides = [*(overrides or []), f"init_from={init_from}"]
    cfg = load_config(config, overrides or [])
    if resume and config is not None:
        cfg = in_its_own_folder(cfg, config, overrides or [])
    run_dir = run_training(cfg, resume=resume, overwrite=overwrite, show_progress=None if not quiet else False)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 speaks for the run
        typer.echo(f"run saved in {run_dir}")


@app.command()
@_errors_exit_2
def translate(
    words: Annotated[list[str] | None, typer.Argument(
        metavar="TEXT", show_default=False,
        help="French text (quoted, or its words as they come); omit it to read --input or stdin.")] = None,
    run: RunOption = None,
    beam: BeamOption = None,
    input: Annotated[Path | None, typer.Option("--input", "-i", help="Translate each line of this file "
                                               "(- for stdin).")] = None,
    nbest: Annotated[int, typer.Option(min=1, help="Print the N best translations of each line, one per output "
                                       "line: LINE ||| TRANSLATION ||| SCORE, LINE counting from 0.")] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per input line.")] = False,
    attention: Annotated[Path | None, typer.Option(help="Draw the cross-attention of TEXT's translation into "
                                                   "this PNG: one panel per layer and head.")] = None,
    layer: Annotated[int | None, typer.Option(min=1, help="With --attention: only this layer (1-based).")] = None,
    head: Annotated[int | None, typer.Option(min=1, help="With --attention: only this head (1-based).")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", help="Prompt for sentences (the default when "
                                              "stdin is a terminal and no text is given).")] = False,
    sample: Annotated[str | None, typer.Option(help="Draw each token at random instead of searching: topk=K "
                                               "(from the K most probable) or topp=P (nucleus), or all.")] = None,
    temperature: Annotated[float, typer.Option(min=0.01, help="With --sample: below 1 sharper, above 1 "
                                               "flatter.")] = 1.0,
    seed: Annotated[int, typer.Option(min=0, help="With --sample: the same seed gives the same output.")] = 0,
    prefix: Annotated[str | None, typer.Option(help="Start every translation with this English text, then "
                                               "continue it (autocompletion).")] = None,
    no_repeat: NoRepeatOption = None,
    precision: PrecisionOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    device: DeviceOption = "auto",
    weights: WeightsOption = None,
) -> None:
    """Translate French to English: one output line per input line, in order (N of them with --nbest N).

    Examples: mt translate "Un chien court dans l'herbe." --beam 5;
    mt translate --input news.fr > news.en;  cat news.fr | mt translate --json --nbest 3;
    mt translate "Un homme joue de la guitare." --attention attention.png
    """
    from mt import translation
    from mt.text import check_text, decode_lines, in_chunks, read_lines

    _setup_logging(quiet=True)
    text = " ".join(words) if words else None  # mt translate Un chat dort.: the shell's words, joined again
    if text is not None and input is not None:
        raise MtError("give either TEXT or --input, not both")
    if attention is not None and text is None:
        raise MtError("--attention draws one sentence: give it as TEXT")
    if (layer is not None or head is not None) and attention is None:
        raise MtError("--layer and --head go with --attention")
    if text is not None:
        check_text(text, "TEXT")
    sampling = _sampling(sample, temperature, seed) if sample is not None else None
    if sampling is not None and ((beam or 1) != 1 or nbest != 1):
        raise MtError("--sample draws one translation token by token: it goes with neither --beam nor --nbest")
    if prefix is not None:
        check_text(prefix, "--prefix")
    translator = translation.load(_run_folder(run, runs_dir), device=device, weights=weights, precision=precision)
    if no_repeat is not None:
        translator.config = replace(translator.config, decode=replace(translator.config.decode,
                                                                      no_repeat_ngram_size=no_repeat))
    if beam is not None and beam < nbest:
        raise MtError(f"--nbest {nbest} needs a beam at least as wide: --beam {nbest} or more")
    if nbest > 1 and (beam or translator.config.decode.beam_size) < nbest:
        beam = nbest  # n-best lists come from the beam

    emitted = 0  # lines translated so far: the sentence number of an n-best list

    def emit(lines: list[str]) -> None:
        nonlocal emitted
        outputs = translator.translate_nbest(lines, beam, nbest=nbest, sampling=sampling, prefix=prefix)
        for line, options in zip(lines, outputs, strict=True):
            if as_json:
                typer.echo(json.dumps({"source": line, "translations": [
                    {"text": t.text, "score": round(t.score, 4)} for t in options]}, ensure_ascii=False))
            elif nbest > 1:  # Moses' and Marian's n-best format: one line per hypothesis, best first
                typer.echo("\n".join(f"{emitted} ||| {t.text} ||| {t.score:.4f}" for t in options))
            else:
                typer.echo(options[0].text)
            emitted += 1

    if text is not None:
        # One output line per input line, as for a file: lines end at \n alone (not at form feeds or U+2028).
        lines = [line.removesuffix("\r") for line in text.split("\n")]
        if attention is not None:  # first: a --layer out of range is an error before any output
            if len(lines) > 1:
                raise MtError(f"--attention draws one sentence; TEXT has {len(lines)} lines")
            _draw_attention(translator, text, attention, layer, head, beam)
        emit(lines)
    elif input is not None and str(input) != "-":
        emit(read_lines(input))
    elif sys.stdin is None or not hasattr(sys.stdin, "buffer"):
        raise MtError("no input: standard input is closed; give TEXT or --input FILE")
    elif interactive or (input is None and sys.stdin.isatty()):
        typer.echo("French → English. Type a sentence and press Enter; Ctrl-D to quit.", err=True)
        while True:
            try:
                line = input_line("fr> ")
            except EOFError:
                break
            try:
                check_text(line, "that line")
            except DataError as e:  # a typing slip costs the line, not the session
                typer.echo(f"error: {e}", err=True)
                continue
            emit([line])
    else:
        for chunk in in_chunks(decode_lines(sys.stdin.buffer, "stdin")):  # translated as lines arrive
            emit(chunk)  # typer.echo flushes: each chunk reaches the reader at once


def _sampling(spec: str, temperature: float, seed: int):
    """The Sampling that `--sample topk=K|topp=P|all` asks for.

    Raises:
        MtError: for any other spec.
    """
    from mt.translation import Sampling

    name, _, value = spec.strip().partition("=")
    try:
        if name == "all" and not value:
            return Sampling(temperature=temperature, seed=seed)
        if name == "topk" and int(value) >= 1:
            return Sampling(top_k=int(value), temperature=temperature, seed=seed)
        if name == "topp" and 0.0 < float(value) <= 1.0:
            return Sampling(top_p=float(value), temperature=temperature, seed=seed)
    except ValueError:
        pass
    raise MtError(f"--sample: expected topk=K (K >= 1), topp=P (0 < P <= 1) or all; got {spec!r}")


def input_line(prompt: str) -> str:
    """One line typed by the user (raises EOFError at the end of input)."""
    sys.stderr.write(prompt)
    sys.stderr.flush()
    raw = sys.stdin.buffer.readline()
    if not raw:
        sys.stderr.write("\n")
        raise EOFError
    # In the terminal's encoding, as sys.stdin would read it; bytes it cannot decode are left for check_text to name.
    return raw.rstrip(b"\n").rstrip(b"\r").decode(sys.stdin.encoding or "utf-8", "surrogateescape")


def _draw_attention(translator, text: str, path: Path, layer: int | None, head: int | None,
                    beam: int | None) -> None:
    from mt import plots

    [best] = translator.translate_nbest([text], beam, nbest=1)
    fig = plots.attention_figure(*translator.attention_map(text, best[0].tokens), None if layer is None else layer - 1,
                                 None if head is None else head - 1)
    typer.echo(f"attention drawn in {plots.save(fig, path)}", err=True)


@app.command()
@_errors_exit_2
def plot(
    runs: Annotated[list[Path], typer.Argument(help="Run folders to draw (overlaid).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG to write.")] = Path("training.png"),
) -> None:
    """Draw training loss, validation loss and validation BLEU against steps for one or more runs.

    Example: mt plot runs/multi30k runs/tiny -o curves.png
    """
    from mt import plots

    typer.echo(f"wrote {plots.save(plots.training_figure(runs), output)}")


@app.command("runs")
@_errors_exit_2
def list_runs(runs_dir: Annotated[Path, typer.Option("--runs-dir", help="The folder whose runs to list.")]
              = Path("runs")) -> None:
    """List the runs in runs/ with the step of their last checkpoint, best validation BLEU and last change.

    Example: mt runs --runs-dir runs
    """
    import datetime

    from mt import checkpoint

    _setup_logging()
    runs = checkpoint.list_runs(runs_dir)
    if not runs:
        raise MtError(f"no runs in {runs_dir}/; train one with `mt train`")
    typer.echo(f"{'run':<24} {'step':>7} {'best BLEU':>9}  {'last change':<16}  folder")
    for run in runs:
        best = "-" if run.best_bleu is None else f"{run.best_bleu:.2f}"
        when = datetime.datetime.fromtimestamp(run.changed).strftime("%Y-%m-%d %H:%M")
        typer.echo(f"{run.folder.name:<24} {'-' if run.step is None else run.step:>7} {best:>9}  {when:<16}  "
                   f"{run.folder}")


@app.command()
@_errors_exit_2
def info(folder: Annotated[Path | None, typer.Argument(help="Run folder (default: the most recent).",
                                                        show_default=False)] = None,
         run: RunOption = None, runs_dir: RunsDirOption = Path("runs")) -> None:
    """Print a run's config, parameter count, vocabulary size and data statistics.

    Example: mt info runs/multi30k (or --run runs/multi30k, as the other commands take it)
    """
    import yaml

    from mt import checkpoint
    from mt.config import config_to_dict, load_run_config
    from mt.export import EXPORT_INFO
    from mt.model import Transformer
    from mt.tokenizer import Tokenizer

    if folder is not None and run is not None and folder != run:
        raise MtError(f"two runs given: {folder} and --run {run}")
    run_dir = _run_folder(run or folder, runs_dir)
    config = load_run_config(run_dir / checkpoint.CONFIG)
    tokenizer = Tokenizer.load(run_dir / checkpoint.TOKENIZER)
    params = Transformer(config.model, tokenizer.vocab_size).num_parameters()
    typer.echo(f"run: {run_dir}\nparameters: {params:,}\nvocabulary: {tokenizer.vocab_size} SentencePiece pieces")
    if config.init_from:
        typer.echo(f"fine-tuned from: {config.init_from}")
    if (run_dir / EXPORT_INFO).is_file():
        try:
            export = json.loads((run_dir / EXPORT_INFO).read_bytes())
            typer.echo(f"exported: {export['format']} {export['ctranslate2']}, {export['quantization']} weights, "
                       f"from {export['run']} ({export['weights']}) at {export['exported']}")
        except (ValueError, KeyError, TypeError) as e:
            typer.echo(f"exported: {run_dir / EXPORT_INFO} is unreadable ({e!r})")
    stats = run_dir / checkpoint.DATA_STATS
    if stats.is_file():
        try:
            data = json.loads(stats.read_bytes())
            typer.echo(yaml.safe_dump({"data read": data}, sort_keys=False, allow_unicode=True).rstrip())
        except ValueError as e:
            typer.echo(f"data read: {stats} is unreadable ({e})")
    records = checkpoint.read_metrics(run_dir)
    bleus = [r for r in records if "valid_bleu" in r]
    if bleus:
        best = max(bleus, key=lambda r: r["valid_bleu"])
        typer.echo(f"best validation BLEU: {best['valid_bleu']:.2f} at step {best['step']}")
    typer.echo("config:\n" + yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True).rstrip())


@app.command("eval")
@_errors_exit_2
def evaluate(
    run: RunOption = None,
    test: Annotated[str | None, typer.Option(help="Test sets, comma-separated: name:split or SRC|REF "
                                             "(default: the run's data.test).")] = None,
    src: Annotated[Path | None, typer.Option(help="Source file (with --ref) instead of --test.")] = None,
    ref: Annotated[Path | None, typer.Option(help="Reference file, aligned with --src.")] = None,
    beam: BeamOption = None,
    no_repeat: NoRepeatOption = None,
    precision: PrecisionOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the scores as JSON.")] = False,
    runs_dir: RunsDirOption = Path("runs"),
    device: DeviceOption = "auto",
    weights: WeightsOption = None,
) -> None:
    """Translate test sets and score them with sacreBLEU (BLEU, chrF), printing the signatures, and count the
    translations that loop (1 to 3 pieces 4 times or more in a row).

    Example: mt eval --run runs/multi30k --test multi30k:test_2016_flickr,multi30k:test_2017_flickr
    """
    from mt.evaluate import evaluate_run

    _setup_logging(quiet=True)
    if (src is None) != (ref is None):
        raise MtError("--src and --ref go together")
    if src is not None and test is not None:
        raise MtError("give either --test or --src/--ref, not both")
    if src is not None:
        tests = [{"src": str(src), "tgt": str(ref)}]
    else:
        tests = [_corpus_arg(item) for item in test.split(",")] if test is not None else None
    results = evaluate_run(_run_folder(run, runs_dir), tests, beam_size=beam, device=device, weights=weights,
                           no_repeat=no_repeat, precision=precision)
    if as_json:
        typer.echo(json.dumps(results, indent=2, ensure_ascii=False))
        return
    width = max(len(r["test"]) for r in results)
    typer.echo(f"{'test set':<{width}}  sentences  beam    BLEU   chrF2  looping  hypotheses")
    for r in results:
        scores = {s["metric"]: s["score"] for s in r["scores"]}
        typer.echo(f"{r['test']:<{width}}  {r['sentences']:>9}  {r['beam_size']:>4}  {scores['BLEU']:6.2f}  "
                   f"{scores['chrF2']:6.2f}  {r['looping']:>7}  {r['hypotheses']}")
    signatures = {s["metric"]: s["signature"] for r in results for s in r["scores"]}
    for metric, signature in signatures.items():
        typer.echo(f"{metric} signature: {signature}")


@app.command()
@_errors_exit_2
def average(
    run: RunOption = None,
    last: Annotated[int, typer.Option(min=2, help="How many of the newest numbered checkpoints to average.")] = 3,
    runs_dir: RunsDirOption = Path("runs"),
) -> None:
    """Average the weights of a run's last N checkpoints into averaged.pt (use it with --weights averaged.pt).

    Example: mt average --run runs/multi30k --last 3 && mt eval --run runs/multi30k --weights averaged.pt
    """
    from mt import checkpoint

    run_dir = _run_folder(run, runs_dir)
    with checkpoint.RunLock(run_dir):
        paths = checkpoint.numbered_checkpoints(run_dir)[:last]
        if len(paths) < last:
            raise MtError(f"{run_dir} has {len(paths)} numbered checkpoints, fewer than --last {last}; "
                          "raise train.keep_checkpoints to keep more")
        checkpoint.save({"model": checkpoint.average(paths), "averaged": [p.name for p in paths]},
                        run_dir / checkpoint.AVERAGED)
    typer.echo(f"averaged {', '.join(p.name for p in paths)} into {run_dir / checkpoint.AVERAGED}")


@app.command()
@_errors_exit_2
def serve(
    run: RunOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port (0: any free one).")] = 8000,
    max_batch_tokens: Annotated[int, typer.Option(min=1, help="Source tokens decoded together at most.")] = (
        Limits.max_batch_tokens),
    max_wait_ms: Annotated[float, typer.Option(min=0, max=60_000, help="How long a batch waits for the "
                                               "requests it expects to share it.")] = Limits.max_wait_ms,
    max_chars: Annotated[int, typer.Option(min=1, help="Characters in one text at most.")] = Limits.max_chars,
    max_texts: Annotated[int, typer.Option(min=1, help="Texts in one request at most.")] = Limits.max_texts,
    max_body_bytes: Annotated[int, typer.Option(min=1, help="Bytes of one request body at most.")] = (
        Limits.max_body_bytes),
    max_beam: Annotated[int, typer.Option(min=1, help="The widest beam a request may ask for.")] = Limits.max_beam,
    precision: PrecisionOption = None,
    runs_dir: RunsDirOption = Path("runs"),
    device: DeviceOption = "auto",
    weights: WeightsOption = None,
) -> None:
    """Serve a run over HTTP: POST /translate, a page to try it at /, the API's docs at /docs.

    Needs the serve extra (pip install -e '.[serve]'). Example: mt serve --run runs/multi30k, then
    curl -s localhost:8000/translate -H 'content-type: application/json' -d '{"text": "Un chat dort."}'
    """
    from mt.serve import on_model_thread, require_extra
    from mt.serve import serve as run_server
    from mt.translate import Translator

    _setup_logging()
    require_extra()  # a missing extra is reported before the model loads
    run_dir = _run_folder(run, runs_dir)
    translator = on_model_thread(Translator.load, run_dir, device=device, weights=weights, precision=precision)
    limits = Limits(max_chars=max_chars, max_texts=max_texts, max_body_bytes=max_body_bytes, max_beam=max_beam,
                    max_batch_tokens=max_batch_tokens, max_wait_ms=max_wait_ms)
    run_server(translator, run_dir.name, host, port, limits, ready=lambda line: typer.echo(line, err=True))
    typer.echo("stopped", err=True)


@app.command()
@_errors_exit_2
def export(
    run: RunOption = None,
    to: Annotated[str, typer.Option("--to", help="The format: ctranslate2.")] = "ctranslate2",
    quantization: Annotated[str, typer.Option(help="Weights stored as float32, int8, int8_float32, int16, "
                                              "float16, ... (int8: about 4× smaller, faster on CPUs).")] = "float32",
    out: Annotated[Path, typer.Option("--out", "-o", help="The folder to write; it must not exist yet.")] = Path(
        "exported"),
    runs_dir: RunsDirOption = Path("runs"),
    weights: WeightsOption = None,
) -> None:
    """Export a run for deployment: a CTranslate2 model folder with its tokenizer and decode settings, which
    mt translate, mt eval and mt serve also take as --run (pip install -e '.[export]'; docs/export.md).

    Example: mt export --run runs/multi30k --quantization int8 -o runs/multi30k-int8
    """
    from mt.export import export_ctranslate2

    _setup_logging(quiet=True)
    if to != "ctranslate2":
        raise MtError(f"--to {to!r}: the one format mt exports to is ctranslate2")
    info = export_ctranslate2(_run_folder(run, runs_dir), out, quantization, weights)
    typer.echo(f"exported {info['run']} ({info['weights']}, {info['quantization']}) to {out}")


@app.command()
@_errors_exit_2
def tune(
    run: RunOption = None,
    beams: Annotated[str, typer.Option(help="Beam sizes to try, comma-separated.")] = ",".join(map(str, TUNE_BEAMS)),
    penalties: Annotated[str, typer.Option(help="Length penalties to try, comma-separated.")] = ",".join(
        map(str, TUNE_PENALTIES)),
    runs_dir: RunsDirOption = Path("runs"),
    device: DeviceOption = "auto",
    weights: WeightsOption = None,
) -> None:
    """Choose beam size and length penalty by BLEU on the run's valid set; store them as its defaults.

    Example: mt tune --run runs/multi30k --beams 4,5,8 --penalties 0.8,1.0,1.2
    """
    from mt import checkpoint
    from mt.config import load_run_config
    from mt.evaluate import tune_run

    try:
        beam_list = [int(b) for b in beams.split(",")]
        penalty_list = [float(p) for p in penalties.split(",")]
    except ValueError:
        raise MtError(f"--beams takes integers and --penalties numbers, comma-separated; got {beams!r}, "
                      f"{penalties!r}") from None
    if min(beam_list) < 1 or not all(0 <= p < math.inf for p in penalty_list):  # NaN fails the test too
        raise MtError(f"beam sizes must be >= 1 and length penalties finite numbers >= 0; got {beams!r}, "
                      f"{penalties!r}")
    run_dir = _run_folder(run, runs_dir)
    with checkpoint.RunLock(run_dir):
        results = tune_run(run_dir, beam_list, penalty_list, device=device, weights=weights)
    for r in results:
        penalty = "-" if r["length_penalty"] is None else f"{r['length_penalty']:.2f}"
        typer.echo(f"beam {r['beam_size']:>2}  length penalty {penalty:>4}  BLEU {r['bleu']:6.2f}")
    decode = load_run_config(run_dir / checkpoint.CONFIG).decode
    typer.echo(f"stored in {run_dir / checkpoint.CONFIG}: decode.beam_size={decode.beam_size}, "
               f"decode.length_penalty={decode.length_penalty:g}")


@app.command()
@_errors_exit_2
def bench(
    config: Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: built-in).")] = None,
    overrides: Annotated[list[str] | None, typer.Option("--set", help="Override a key (repeatable).")] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Trained run for the decoding measurements "
                                             "(default: the most recent one in runs/, if any).")] = None,
    seconds: Annotated[float, typer.Option(min=1, help="Seconds of timed training for each model.")] = 60,
    sentences: Annotated[int, typer.Option(min=1, help="Test sentences to decode.")] = 1000,
    test: Annotated[str | None, typer.Option(help="Test set for decoding (default: the config's data.test).")] = None,
    rounds: Annotated[int, typer.Option(min=1, help="Decoding rounds; each decoder's fastest counts.")] = 3,
    decode: Annotated[bool, typer.Option(help="Measure decoding (needs a trained run; --no-decode measures "
                                         "training alone).")] = True,
    reference: Annotated[bool, typer.Option(help="Train the nn.Transformer reference (--no-reference: our model "
                                            "alone, to compare settings quickly).")] = True,
    plain: Annotated[bool, typer.Option("--plain", help="Run the plain path of every fast path (mt.fastpaths), to "
                                        "measure what they win.")] = False,
    runs_dir: RunsDirOption = Path("runs"),
) -> None:
    """Measure speed side by side: matmul roof, training (ours vs nn.Transformer), decoding (cache vs
    recompute), peak memory; print one table.

    Example: MT_DATA_PATH=../shared/data mt bench --config configs/multi30k.yaml --run runs/multi30k
    """
    from mt import fastpaths
    from mt.bench import format_table, run_benchmark
    from mt.checkpoint import latest_run
    from mt.config import load_config
    from mt.errors import CheckpointError

    _setup_logging(quiet=True)
    fastpaths.ENABLED = not plain
    cfg = load_config(config, overrides or [])
    if run is None:
        try:
            run = latest_run(runs_dir)
        except CheckpointError:
            run = None
    rows: list = []
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)  # `timeout`'s signal: print what was measured
    try:
        run_benchmark(cfg, run, seconds=seconds, sentences=sentences, test=test, rounds=rounds, decode=decode,
                      reference=reference, rows=rows)
    except KeyboardInterrupt:
        if not rows:
            raise
        typer.echo(format_table(rows))
        typer.echo("stopped before the end: the rows measured so far", err=True)
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        fastpaths.ENABLED = True
    typer.echo(format_table(rows))


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _run_folder(run: Path | None, runs_dir: Path) -> Path:
    """The run a command reads: `--run`, else the newest under `runs_dir`; a run folder either way."""
    from mt import checkpoint

    return checkpoint.check_run(run or checkpoint.latest_run(runs_dir))


def _corpus_arg(text: str) -> str | dict[str, str]:
    """A --test item: `name:split`, or `SRC|REF` for a pair of files.

    Raises:
        MtError: for anything else.
    """
    from mt.corpora import parse_corpus

    src, sep, ref = text.strip().partition("|")
    spec = {"src": src.strip(), "tgt": ref.strip()} if sep else text.strip()
    try:
        parse_corpus(spec)
    except ValueError:
        raise MtError(f"--test: expected name:split (e.g. multi30k:test_2016_flickr) or SRC|REF (a source and a "
                      f"reference file), comma-separated; got {text.strip()!r}") from None
    return spec


def configure_process() -> None:
    """The process-wide settings every `mt` command runs with (`mt train` adds one of its own: `train`).

    glibc's malloc keeps freed blocks of up to 64 MB for reuse instead of handing them back to the system: a
    training step makes and frees tensors of a few megabytes, and without this each of them page-faults its
    memory in again (BENCHMARKS.md, "Levers"). Keeping up to 256 MB free costs at most that much memory.
    Nothing is changed where the C library is not glibc, or where the user set any MALLOC_* variable.

    oneDNN's kernel cache keeps torch's default (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1,024 kernels): decoding
    brings hundreds of shapes, and a smaller cache rebuilds their kernels at every batch (BENCHMARKS.md).
    `mt train` alone sets 256, for memory (`train`).
    """
    try:
        glibc = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        glibc = None
    if glibc and not any(name.startswith("MALLOC_") for name in os.environ):
        import ctypes

        mallopt = ctypes.CDLL(None).mallopt
        m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
        mallopt(m_mmap_threshold, 64 << 20)
        mallopt(m_trim_threshold, 256 << 20)


def main() -> None:
    """The `mt` command: process settings, then the command. A usage error (an unknown command or option, a
    bad option value) is one line on stderr and exit code 2; `--help` shows the full usage."""
    configure_process()
    try:
        code = app(standalone_mode=False)
    except typer.Abort:
        typer.echo("interrupted", err=True)
        code = 130
    except Exception as e:  # click's UsageError (typer vendors click: its class is not importable alike everywhere)
        if getattr(e, "exit_code", None) != 2 or not hasattr(e, "format_message"):
            raise
        ctx = getattr(e, "ctx", None)
        where = f"; see '{ctx.command_path} --help'" if ctx is not None else ""
        typer.echo(f"error: {' '.join(e.format_message().split())}{where}", err=True)
        code = 2
    sys.exit(code if isinstance(code, int) else 0)
