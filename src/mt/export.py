"""Export a run to CTranslate2 (`mt export`), and translate with the exported folder (`ExportedTranslator`).

CTranslate2's `TransformerSpec` describes the same model as `mt.model.Transformer`, one weight at a time:

| mt                                              | CTranslate2 spec                                   |
| ----------------------------------------------- | -------------------------------------------------- |
| `embed.weight` (one table)                      | encoder and decoder `embeddings`, decoder `projection` |
| `embed_tokens`: × sqrt(d_model), + sinusoids    | `scale_embeddings`, `position_encodings.encodings` |
| self-attention `in_proj_weight` (q, k, v)       | `self_attention.linear[0]` (fused, same order)     |
| cross-attention `in_proj_weight`                | `attention.linear[0]` (q) and `linear[1]` (k, v)   |
| `out_proj`                                      | `linear[2]`                                        |
| `norm1`, `norm2` (, `norm3`)                    | the sublayers' `layer_norm`s, pre or post          |
| `ff.linear1`, `ff.linear2`                      | `ffn.linear_0`, `ffn.linear_1`                     |
| `encoder_norm`, `decoder_norm` (pre-norm only)  | `encoder.layer_norm`, `decoder.layer_norm`         |

The exported folder holds CTranslate2's files (`model.bin`, `config.json`, `shared_vocabulary.json`) and
what `mt` needs to translate exactly as the run does: the SentencePiece model (`tokenizer.model`), the run's
`config.yaml` (source normalisation, the decode defaults as tuned, the max-length rule) and `export.json`
(where it came from). docs/export.md says how to use it without `mt`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mt import checkpoint
from mt.config import Config, DecodeConfig, load_run_config
from mt.errors import CheckpointError, MtError
from mt.tokenizer import EOS, Tokenizer
from mt.translation import EXPORT_INFO, BaseTranslator, Hypothesis, Sampling, length_sorted_batches

if TYPE_CHECKING:  # torch is imported where it is needed: an exported model translates without it
    import torch
QUANTIZATIONS = ("float32", "int8", "int8_float32", "int16", "float16", "bfloat16", "int8_float16",
                 "int8_bfloat16")
LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's


def require_ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise MtError("exporting to and translating with CTranslate2 needs it: pip install -e '.[export]'") from None
    return ctranslate2


def export_ctranslate2(run_dir: Path, out: Path, quantization: str = "float32", weights: str | None = None) -> dict:
    """Writes the run's model as a CTranslate2 folder `out`, which must not exist yet; it appears whole or not at
    all. Returns what `export.json` records."""
    ctranslate2 = require_ctranslate2()
    if quantization not in QUANTIZATIONS:
        raise MtError(f"--quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    if out.exists():
        raise MtError(f"{out} already exists: export into a new folder (or remove that one first)")
    if (Path(run_dir) / EXPORT_INFO).is_file():
        raise CheckpointError(f"{run_dir} is already an export: export the run folder it came from")
    from mt.translate import Translator

    translator = Translator.load(run_dir, device="cpu", weights=weights)
    spec = transformer_spec(translator.model.state_dict(), translator.config, translator.tokenizer)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))  # same filesystem: rename is atomic
    try:
        _convert(spec, staging, quantization)
        shutil.copy(run_dir / checkpoint.TOKENIZER, staging / checkpoint.TOKENIZER)
        shutil.copy(run_dir / checkpoint.CONFIG, staging / checkpoint.CONFIG)
        if (run_dir / checkpoint.METRICS).is_file():  # the run's history: its validation scores
            shutil.copy(run_dir / checkpoint.METRICS, staging / checkpoint.METRICS)
        info = {"format": "ctranslate2", "ctranslate2": ctranslate2.__version__, "quantization": quantization,
                "run": str(Path(run_dir).resolve()), "weights": translator.weights.name,
                "parameters": translator.num_parameters(),
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        (staging / EXPORT_INFO).write_text(json.dumps(info, indent=1) + "\n")
        if out.exists():  # appeared meanwhile; rename(2) would replace an empty folder
            raise MtError(f"{out} appeared while exporting: the export is not written")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return info


def transformer_spec(state: dict[str, torch.Tensor], config: Config, tokenizer: Tokenizer):
    """CTranslate2's description of the model whose weights are `state` (the table in the module docstring)."""
    from ctranslate2.specs import common_spec, transformer_spec

    m = config.model
    spec = transformer_spec.TransformerSpec.from_config(
        (m.encoder_layers, m.decoder_layers), m.heads, pre_norm=m.norm == "pre",
        activation={"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU}[m.activation],
        alignment_layer=-1, alignment_heads=m.heads)  # `return_attention`: the last layer's heads, averaged
    weights = {name: tensor.float().numpy() for name, tensor in state.items()}
    table = _positions(m.d_model, m.max_positions)
    for stack in (spec.encoder, spec.decoder):
        for embeddings in stack.embeddings if isinstance(stack.embeddings, list) else [stack.embeddings]:
            embeddings.weight = weights["embed.weight"]
        stack.scale_embeddings = True
        stack.position_encodings.encodings = table
    spec.decoder.projection.weight = weights["embed.weight"]
    if m.norm == "pre":
        _layer_norm(spec.encoder.layer_norm, weights, "encoder_norm")
        _layer_norm(spec.decoder.layer_norm, weights, "decoder_norm")
    for i, layer in enumerate(spec.encoder.layer):
        prefix = f"encoder_layers.{i}."
        _attention(layer.self_attention, weights, prefix + "self_attn.", fused=True)
        _layer_norm(layer.self_attention.layer_norm, weights, prefix + "norm1")
        _feed_forward(layer.ffn, weights, prefix)
        _layer_norm(layer.ffn.layer_norm, weights, prefix + "norm2")
    for i, layer in enumerate(spec.decoder.layer):
        prefix = f"decoder_layers.{i}."
        _attention(layer.self_attention, weights, prefix + "self_attn.", fused=True)
        _layer_norm(layer.self_attention.layer_norm, weights, prefix + "norm1")
        _attention(layer.attention, weights, prefix + "cross_attn.", fused=False)
        _layer_norm(layer.attention.layer_norm, weights, prefix + "norm2")
        _feed_forward(layer.ffn, weights, prefix)
        _layer_norm(layer.ffn.layer_norm, weights, prefix + "norm3")
    spec.config.layer_norm_epsilon = LAYER_NORM_EPSILON
    spec.config.add_source_eos = True  # mt ends every source with EOS (`mt.data.collate`)
    spec.config.decoder_start_token = "<s>"
    pieces = tokenizer.pieces(range(tokenizer.vocab_size))
    spec.register_source_vocabulary(pieces)
    spec.register_target_vocabulary(pieces)
    return spec


def _positions(d_model: int, max_positions: int):
    from mt.layers import SinusoidalPositions  # torch: exporting needs it

    return SinusoidalPositions(d_model, max_positions).table.numpy()


def _attention(spec, weights, prefix: str, fused: bool) -> None:
    in_weight, in_bias = weights[prefix + "in_proj_weight"], weights[prefix + "in_proj_bias"]
    d = in_weight.shape[1]
    if fused:  # self-attention: one (3E, E) projection to queries, keys and values, in that order
        spec.linear[0].weight, spec.linear[0].bias = in_weight, in_bias
    else:  # cross-attention: queries from the decoder, keys and values (one (2E, E) product) from the encoder
        spec.linear[0].weight, spec.linear[0].bias = in_weight[:d], in_bias[:d]
        spec.linear[1].weight, spec.linear[1].bias = in_weight[d:], in_bias[d:]
    _linear(spec.linear[-1], weights, prefix + "out_proj")


def _feed_forward(spec, weights, prefix: str) -> None:
    _linear(spec.linear_0, weights, prefix + "ff.linear1")
    _linear(spec.linear_1, weights, prefix + "ff.linear2")


def _linear(spec, weights, name: str) -> None:
    spec.weight, spec.bias = weights[name + ".weight"], weights[name + ".bias"]


def _layer_norm(spec, weights, name: str) -> None:
    spec.gamma, spec.beta = weights[name + ".weight"], weights[name + ".bias"]


def _convert(spec, folder: Path, quantization: str) -> None:
    """CTranslate2's own converter, given the spec already built: it validates, quantizes and writes `folder`."""
    from ctranslate2.converters.converter import Converter

    class SpecConverter(Converter):
        def _load(self):
            return spec

    SpecConverter().convert(str(folder), quantization=quantization, force=True)


class ExportedTranslator(BaseTranslator):
    """A translator whose search runs in CTranslate2, on a folder written by `export_ctranslate2`.

    Sources are cut, normalised and tokenized as the run does; each sentence gets the run's max-length rule
    (CTranslate2 takes one maximum per call, so sentences are grouped by theirs), and its n-best lists, prefixes
    and sampling go through CTranslate2's own options.
    """

    attends_to_source_eos = False  # CTranslate2 gives it no weight and no column

    def __init__(self, engine, tokenizer: Tokenizer, config: Config, folder: Path, info: dict):
        super().__init__(tokenizer, config, weights=folder / "model.bin")
        self.engine, self.folder, self.info = engine, folder, info

    @classmethod
    def load(cls, folder: str | Path, device: str = "auto", weights: str | None = None,
             streams: int | None = None, precision: str | None = None) -> ExportedTranslator:
        """`streams`: batches decoded at once on a CPU (CTranslate2's inter_threads; default the config's
        `decode.inter_threads`)."""
        ctranslate2 = require_ctranslate2()
        folder = Path(folder)
        if weights is not None:
            raise CheckpointError(f"{folder} is an exported model: it has one set of weights, and takes no --weights")
        if precision is not None:
            raise MtError(f"{folder} is an exported model: it computes as it was exported (--quantization), and "
                          "takes no --precision")
        try:
            info = json.loads((folder / EXPORT_INFO).read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{folder / EXPORT_INFO} cannot be read: {e}") from None
        config = load_run_config(folder / checkpoint.CONFIG)
        tokenizer = Tokenizer.load(folder / checkpoint.TOKENIZER)
        if device == "auto":
            device = "cuda" if ctranslate2.get_cuda_device_count() else "cpu"
        kind, _, index = device.partition(":")
        if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
            raise MtError(f"--device {device}: an exported model runs on cpu, cuda or cuda:N")
        streams = (streams or config.decode.inter_threads) if kind == "cpu" else 1
        threads = len(os.sched_getaffinity(0))
        try:
            engine = ctranslate2.Translator(str(folder), device=kind, device_index=int(index or 0),
                                            inter_threads=min(streams, threads),
                                            intra_threads=max(1, threads // streams))
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"CTranslate2 cannot load {folder}: {e}") from None
        return cls(engine, tokenizer, config, folder, info)

    def num_parameters(self) -> int:
        return int(self.info.get("parameters", 0))

    @property
    def attention_layers(self) -> int:
        return 1  # CTranslate2 returns one map: the last layer's, averaged over its heads

    def _search(self, sources: list[list[int]], decode: DecodeConfig, nbest: int, progress: str | None,
                sampling: Sampling | None, prefixes: list[list[int]] | None) -> list[list[Hypothesis]]:
        limit = self.config.model.max_positions - 1
        sources = [list(s[:limit]) for s in sources]
        by_limit = defaultdict(list)  # the run's rule: a * (source tokens + EOS) + b, at most `limit`
        for i, source in enumerate(sources):  # as `mt.search.max_lengths` computes it, in float64
            by_limit[min(int((len(source) + 1) * decode.max_len_a + decode.max_len_b), limit)].append(i)
        options = dict(beam_size=decode.beam_size, num_hypotheses=nbest, length_penalty=decode.length_penalty,
                       no_repeat_ngram_size=decode.no_repeat_ngram_size, max_input_length=0, return_scores=True,
                       asynchronous=True,
                       return_end_token=True)  # then its scores count EOS in the length, as mt's do
        engine = self.engine
        if sampling is not None:
            engine = self._sampling_engine(sampling.seed)
            options.update(beam_size=1, sampling_topk=sampling.top_k, sampling_topp=sampling.top_p,
                           sampling_temperature=sampling.temperature, asynchronous=False)
        jobs = []
        budget = max(1, decode.batch_tokens // decode.beam_size)
        for max_len, members in by_limit.items():
            for batch in length_sorted_batches([sources[i] for i in members], budget):
                rows = [members[j] for j in batch]
                target_prefix = None
                if prefixes is not None and any(prefixes[i] for i in rows):
                    target_prefix = [self.tokenizer.pieces(prefixes[i]) or None for i in rows]
                results = engine.translate_batch([self.tokenizer.pieces(sources[i]) for i in rows],
                                                      target_prefix=target_prefix, max_decoding_length=max_len,
                                                      **options)
                jobs.append((rows, results))
        out: list[list[Hypothesis]] = [[] for _ in sources]
        for rows, results in jobs:
            for i, result in zip(rows, results, strict=True):
                result = result.result() if sampling is None else result
                out[i] = [self._hypothesis(tokens, score, decode) for tokens, score in
                          zip(result.hypotheses, result.scores, strict=True)]
        return out

    def _sampling_engine(self, seed: int):
        """A CTranslate2 translator of one thread, new for each seed: CTranslate2 seeds a thread's random
        generator when the thread starts, so that only a new one, taking the batches in order, draws the same
        tokens for the same seed."""
        import ctranslate2

        ctranslate2.set_random_seed(seed)
        return ctranslate2.Translator(str(self.folder), device=self.engine.device, inter_threads=1,
                                      intra_threads=len(os.sched_getaffinity(0)))

    def _hypothesis(self, pieces: Sequence[str], score: float, decode: DecodeConfig) -> Hypothesis:
        tokens = [self.tokenizer.sp.piece_to_id(p) for p in pieces]
        log_prob = score * len(tokens) ** decode.length_penalty  # CTranslate2 normalises greedy scores too
        if tokens and tokens[-1] == EOS:
            tokens.pop()
        return Hypothesis(tokens, score if decode.beam_size > 1 else log_prob, log_prob)

    def cross_attention(self, text: str, output_tokens: list[int]) -> torch.Tensor:
        """The last decoder layer's cross-attention, averaged over its heads (what CTranslate2 returns), while
        producing `output_tokens` from `text`: (1, 1, output tokens + EOS, source tokens). CTranslate2 gives no
        weight to the source EOS, so each row sums to 1 less that one."""
        source = self.tokenizer.pieces(self.encode([text])[0])
        target = self.tokenizer.pieces(list(output_tokens) + [EOS])
        [result] = self.engine.translate_batch([source], target_prefix=[target], beam_size=1, max_input_length=0,
                                               max_decoding_length=len(target) + 1, return_attention=True,
                                               return_end_token=True)  # the EOS row too
        import torch

        weights = torch.tensor(result.attention[0], dtype=torch.float32)[: len(target)]
        return weights[None, None]
