"""Corpus-level BLEU (Papineni et al., 2002) and chrF (Popović, 2015) through sacreBLEU, with signatures.

Scores are computed on detokenized text against one reference per sentence, sacreBLEU's defaults
(13a tokenization for BLEU), so they compare with published numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sacrebleu.metrics import BLEU, CHRF

from mt.errors import DataError, MtError
from mt.files import write_bytes


@dataclass(frozen=True)
class Score:
    metric: str
    score: float
    signature: str
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


def score(hypotheses: Sequence[str], references: Sequence[str]) -> list[Score]:
    """BLEU and chrF of `hypotheses` against `references` (same length, in order)."""
    assert len(hypotheses) == len(references), "one hypothesis per reference"
    scores = []
    for metric in (BLEU(), CHRF()):
        result = metric.corpus_score(list(hypotheses), [list(references)])
        scores.append(Score(result.name, round(result.score, 2), str(metric.get_signature()), str(result)))
    return scores


def loops(tokens: Sequence[int], copies: int = 4, longest: int = 3) -> bool:
    """Whether an output babbles: a run of 1 to `longest` pieces repeated `copies` times or more in a row
    ("The eanannenenenenenenes."), what the repetition guard (`decode.no_repeat_ngram_size`) is for."""
    for period in range(1, longest + 1):
        span = period * copies
        for start in range(len(tokens) - span + 1):
            if all(tokens[start + i] == tokens[start + i % period] for i in range(period, span)):
                return True
    return False


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    return BLEU().corpus_score(list(hypotheses), [list(references)]).score


def tune_decoding(translator, sources: Sequence[str], references: Sequence[str], beams: Sequence[int],
                  penalties: Sequence[float]) -> list[dict]:
    """BLEU of every beam size × length penalty on a held-out set (beam 1 once: it has no penalty).

    Returns:
        One dict per setting (beam_size, length_penalty, bleu), best first; beam 1's length_penalty is None.
    """
    results = []
    for beam in beams:
        for penalty in penalties if beam > 1 else [None]:
            hypotheses = translator.translate(list(sources), beam_size=beam, length_penalty=penalty)
            results.append({"beam_size": beam, "length_penalty": penalty, "bleu": bleu(hypotheses, references)})
    return sorted(results, key=lambda r: r["bleu"], reverse=True)


def describe_setting(result: dict) -> str:
    """"beam 5, length penalty 1.0", or "beam 1 (greedy)", for a result of `tune_decoding`."""
    if result["length_penalty"] is None:
        return f"beam {result['beam_size']} (greedy)"
    return f"beam {result['beam_size']}, length penalty {result['length_penalty']:g}"


def _check_writable(folder: Path) -> None:
    if not os.access(folder, os.W_OK):  # a read-only file system or folder
        raise MtError(f"cannot write to {folder}: it is read-only; copy the run somewhere writable")


def tune_run(run_dir: Path, beams: Sequence[int], penalties: Sequence[float], device: str = "auto",
             weights: str | None = None, streams: int | None = None) -> list[dict]:
    """Chooses the beam size and length penalty with the best BLEU on the run's validation set and stores
    them as the run's decoding defaults (the `decode` section of its config.yaml). `streams` overrides
    `decode.inter_threads` for the tuning only."""
    from mt import checkpoint, corpora
    from mt.config import save_config
    from mt.data import read_corpus
    from mt.translate import Translator

    _check_writable(checkpoint.check_run(Path(run_dir)))  # before the decoding, not after it
    translator = Translator.load(run_dir, device=device, weights=weights)
    config = translator.config
    if streams is not None:
        translator.config = replace(config, decode=replace(config.decode, inter_threads=streams))
    files = corpora.resolve(config.data.valid, config.data.src_lang, config.data.tgt_lang)
    sources, references = read_corpus(files)
    if not sources:
        raise DataError(f"validation set {files.name} is empty: nothing to tune on")
    results = tune_decoding(translator, sources, references, beams, penalties)
    best = results[0]
    # Greedy search has no length penalty: the one a later --beam N takes stays the run's own.
    penalty = config.decode.length_penalty if best["length_penalty"] is None else best["length_penalty"]
    decode = replace(config.decode, beam_size=best["beam_size"], length_penalty=penalty)
    save_config(replace(config, decode=decode), Path(run_dir) / checkpoint.CONFIG)
    return results


def _hypotheses_stem(files, spec) -> str:
    """The name of a test set's hypotheses in eval/: a named corpus's name (multi30k.test_2016_flickr); a pair
    of files, the source file's stem and a digest of its absolute path, so that test.fr in two folders get two
    files, in one command or two."""
    from mt import corpora

    if isinstance(files, corpora.CorpusFiles) and not isinstance(spec, str):
        digest = hashlib.sha1(str(Path(files.src).resolve()).encode()).hexdigest()[:8]
        return _file_name(files.src.stem) + "." + digest
    return _file_name(files.name)


def _file_name(text: str) -> str:
    return re.sub(r"[^\w.-]+", ".", text)


def evaluate_run(
    run_dir: Path, tests: Sequence[str | dict[str, str]] | None = None, beam_size: int | None = None,
    device: str = "auto", weights: str | None = None, no_repeat: int | None = None, precision: str | None = None,
) -> list[dict]:
    """Translates each test corpus with the run's model, scores it and writes the hypotheses to
    `run_dir/eval/`.

    Args:
        tests: corpus specs (as `data.test` takes them); default: the run's `data.test`.
        no_repeat: the repetition guard's n-gram size, instead of the run's (0: off).
        precision: auto, fp32 or bf16, instead of the run's `decode.precision`.

    Returns:
        One dict per test set: test, sentences, beam_size, hypotheses (path), scores, and looping: how many
        outputs babble (`loops`).
    """
    from mt import checkpoint, corpora
    from mt.config import load_run_config
    from mt.data import read_corpus
    from mt.translate import Translator

    own_precision = load_run_config(checkpoint.check_run(Path(run_dir)) / checkpoint.CONFIG).decode.precision
    translator = Translator.load(run_dir, device=device, weights=weights, precision=precision)
    data, decode = translator.config.data, translator.config.decode
    beam = beam_size or decode.beam_size
    # Hypotheses of other settings than the run's own go beside its own, not over them.
    settings_tag = f".{precision}" if precision not in (None, own_precision) else ""
    if no_repeat is not None and no_repeat != decode.no_repeat_ngram_size:
        translator.config = replace(translator.config, decode=replace(decode, no_repeat_ngram_size=no_repeat))
        settings_tag += f".norepeat{no_repeat}"
    out_dir = Path(run_dir) / "eval"
    out_dir.mkdir(exist_ok=True)
    _check_writable(out_dir)
    test_sets = []
    for spec in tests or [data.test]:  # every test set read before any is translated: a typo fails at once
        files = corpora.resolve(spec, data.src_lang, data.tgt_lang)
        sources, references = read_corpus(files)
        if not sources:
            raise DataError(f"test set {files.name} is empty")
        test_sets.append((files, sources, references, _hypotheses_stem(files, spec)))
    # Hypotheses of other weights than best.pt get the checkpoint's name, beside best.pt's, not over them.
    checkpoint_tag = "" if translator.weights.name == checkpoint.BEST else "." + translator.weights.stem
    results = []
    for files, sources, references, stem in test_sets:
        outputs = [t[0] for t in translator.translate_nbest(sources, beam_size=beam, progress=files.name)]
        hypotheses = [t.text for t in outputs]
        hyp_path = out_dir / f"{stem}{checkpoint_tag}.beam{beam}{settings_tag}.{data.tgt_lang}"
        index = checkpoint.read_eval_index(out_dir)  # first: a file mt writes is listed before it exists
        index[hyp_path.name] = files.name
        write_bytes(out_dir / checkpoint.EVAL_INDEX, (json.dumps(index, indent=1, sort_keys=True) + "\n").encode())
        write_bytes(hyp_path, "".join(h + "\n" for h in hypotheses).encode())
        results.append({"test": files.name, "sentences": len(sources), "beam_size": beam,
                        "hypotheses": str(hyp_path), "scores": [s.as_dict() for s in score(hypotheses, references)],
                        "looping": sum(loops(t.tokens) for t in outputs)})
    return results
