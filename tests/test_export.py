"""`mt export --to ctranslate2`: the exported model translates as `mt` does, int8 stays close, every architecture
`mt` trains converts, and translate, eval and serve take the exported folder as --run."""

import dataclasses
import json
import shutil
import subprocess
import sys

import pytest
import sacrebleu
import torch
from typer.testing import CliRunner

from conftest import ROOT, one_line_error, request, start_server

pytest.importorskip("ctranslate2", reason="the export extra: pip install -e '.[export]'")

from mt import checkpoint, corpora  # noqa: E402
from mt.cli import app  # noqa: E402
from mt.config import ModelConfig, load_run_config, save_config  # noqa: E402
from mt.data import read_corpus  # noqa: E402
from mt.errors import MtError  # noqa: E402
from mt.export import ExportedTranslator, export_ctranslate2  # noqa: E402
from mt.model import Transformer  # noqa: E402
from mt.search import Sampling  # noqa: E402
from mt.translate import Translator  # noqa: E402

pytestmark = pytest.mark.slow  # every test here needs the tiny run


def fp32(run) -> Translator:
    """The run's own model in fp32, as CTranslate2's float32 computes (bf16 autocast would differ)."""
    translator = Translator.load(run, device="cpu")
    translator.amp = None
    return translator


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("exported")
    run = tiny_run / "runs" / "tiny"
    for kind in ("float32", "int8"):
        export_ctranslate2(run, folder / kind, kind)
    return folder


@pytest.fixture(scope="module")
def valid(data_path):
    return read_corpus(corpora.resolve("multi30k:valid", "fr", "en"))


def with_guard(translator: Translator, n: int) -> Translator:
    translator.config = dataclasses.replace(translator.config, decode=dataclasses.replace(
        translator.config.decode, no_repeat_ngram_size=n))
    return translator


@pytest.mark.parametrize(("beam", "guard"), [(1, 0), (2, 0), (5, 0), (1, 3), (4, 2)])
def test_float32_export_translates_as_mt_does(tiny_run, exported, valid, beam, guard):
    sources = valid[0][:300]
    ours = with_guard(fp32(tiny_run / "runs" / "tiny"), guard).translate_nbest(sources, beam, nbest=min(beam, 2))
    theirs = with_guard(Translator.load(exported / "float32"), guard).translate_nbest(sources, beam,
                                                                                      nbest=min(beam, 2))
    assert [[t.tokens for t in o] for o in ours] == [[t.tokens for t in o] for o in theirs]
    for o, t in zip(ours, theirs, strict=True):
        assert [x.score for x in o] == pytest.approx([x.score for x in t], abs=1e-3)


def test_int8_stays_within_one_bleu_of_float32_on_a_valid_split(exported, valid):
    """The tiny run scores little BLEU, so int8's outputs are also held close to float32's own (BLEU against
    them as references); the default run's figures are in BENCHMARKS.md."""
    sources, references = valid
    outputs = {kind: Translator.load(exported / kind).translate(sources) for kind in ("float32", "int8")}
    bleu = {kind: sacrebleu.corpus_bleu(output, [references]).score for kind, output in outputs.items()}
    assert abs(bleu["int8"] - bleu["float32"]) <= 1.0, bleu
    assert sacrebleu.corpus_bleu(outputs["int8"], [outputs["float32"]]).score > 50


def test_prefix_and_sampling_go_through_ctranslate2(tiny_run, exported):
    translator = Translator.load(exported / "float32")
    prefix = translator.tokenizer.encode(["Two dogs"])[0]
    [[forced]] = translator.translate_nbest(["Un homme fait du vélo."], prefix="Two dogs")
    assert forced.tokens[: len(prefix)] == prefix
    texts = ["Un homme fait du vélo.", "Deux chiens jouent dans la neige."] * 3
    first, again, other = ([o[0].text for o in translator.translate_nbest(
        texts, sampling=Sampling(top_k=20, temperature=1.5, seed=seed))] for seed in (7, 7, 8))
    assert first == again != other  # seeded: reproducible, and the seed matters
    greedy = translator.translate(texts, beam_size=1)
    assert first != greedy
    assert [o[0].text for o in translator.translate_nbest(texts, sampling=Sampling(top_k=1))] == greedy
    # A prefix for some texts only, as mt's own decoder completes them.
    some = ["Two dogs", "", "A woman"]
    outputs = translator.translate_nbest(texts[:3], beam_size=2, prefix=some)
    ours = fp32(tiny_run / "runs" / "tiny").translate_nbest(texts[:3], beam_size=2, prefix=some)
    assert [o[0].tokens for o in outputs] == [o[0].tokens for o in ours]
    assert all(o[0].text.startswith(text) for text, o in zip(some, outputs, strict=True))


ARCHITECTURES = [
    dict(norm="post", activation="relu"),
    dict(norm="pre", activation="gelu"),
    dict(norm="pre", activation="relu", encoder_layers=1, decoder_layers=3, heads=4, d_model=48, d_ff=40),
    dict(norm="post", activation="gelu", encoder_layers=3, decoder_layers=1, heads=1, d_model=16, d_ff=96),
]


@pytest.mark.parametrize("options", ARCHITECTURES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_every_architecture_converts_and_decodes_alike(tiny_run, tmp_path, options):
    """Untrained weights of each shape: their outputs run to the max-length rule, which is checked too."""
    run = tmp_path / "run"
    run.mkdir()
    config = load_run_config(tiny_run / "runs" / "tiny" / checkpoint.CONFIG)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, **options))
    save_config(config, run / checkpoint.CONFIG)
    shutil.copy(tiny_run / "runs" / "tiny" / checkpoint.TOKENIZER, run / checkpoint.TOKENIZER)
    torch.manual_seed(0)
    model = Transformer(config.model, 600)
    checkpoint.save({"model": model.state_dict()}, run / checkpoint.LAST)
    export_ctranslate2(run, tmp_path / "exported")
    texts = ["Un homme fait du vélo.", "Deux chiens jouent dans la neige avec une balle rouge.", "Bonjour !"]
    for beam in (1, 3):
        ours = [o[0].tokens for o in fp32(run).translate_nbest(texts, beam)]
        theirs = [o[0].tokens for o in Translator.load(tmp_path / "exported").translate_nbest(texts, beam)]
        assert ours == theirs


def test_model_options_are_all_ones_the_exporter_knows():
    """A new `model.*` option must be handled by `mt.export.transformer_spec` (or refused there) first."""
    assert {f.name for f in dataclasses.fields(ModelConfig)} == {
        "d_model", "heads", "encoder_layers", "decoder_layers", "d_ff", "dropout", "attention_dropout",
        "activation_dropout", "activation", "norm", "max_positions"}


def run_mt(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_the_cli_exports_translates_and_evaluates(tiny_run, tmp_path, data_path, monkeypatch):
    run, out = tiny_run / "runs" / "tiny", tmp_path / "int8"
    result = run_mt("export", "--run", run, "--quantization", "int8", "-o", out)
    assert result.exit_code == 0, result.output
    assert {"model.bin", "config.json", "tokenizer.model", "config.yaml", "export.json"} <= {
        p.name for p in out.iterdir()}
    assert json.loads((out / "export.json").read_text())["quantization"] == "int8"
    text = "Un homme fait du vélo."
    translated = run_mt("translate", "--run", out, text)
    assert translated.exit_code == 0 and translated.stdout.strip() == Translator.load(out).translate([text])[0]
    info = run_mt("info", out)
    assert info.exit_code == 0 and "exported: ctranslate2" in info.stdout and "int8 weights" in info.stdout
    monkeypatch.setenv("MT_DATA_PATH", str(data_path))
    scored = run_mt("eval", "--run", out, "--test", "multi30k:valid", "--json")
    assert scored.exit_code == 0, scored.output
    [result] = json.loads(scored.stdout)
    assert result["sentences"] == 1014 and (out / "eval").is_dir()


def test_export_refuses_what_it_cannot_do_in_one_line(tiny_run, tmp_path, exported):
    run = tiny_run / "runs" / "tiny"
    (tmp_path / "taken").mkdir()
    one_line_error(run_mt("export", "--run", run, "-o", tmp_path / "taken"), "already exists")
    one_line_error(run_mt("export", "--run", run, "--quantization", "int3", "-o", tmp_path / "x"),
                   "expected one of float32, int8")
    one_line_error(run_mt("export", "--run", run, "--to", "onnx", "-o", tmp_path / "x"), "ctranslate2")
    one_line_error(run_mt("translate", "--run", tmp_path / "taken", "Bonjour"), "not a run folder")
    one_line_error(run_mt("translate", "--run", exported / "int8", "--precision", "fp32", "Bonjour"),
                   "takes no --precision")
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]


def test_a_failed_export_leaves_nothing_behind(tiny_run, tmp_path, monkeypatch, exported):
    def fail(spec, folder, quantization):
        (folder / "model.bin").write_bytes(b"half")
        raise MtError("disk full")

    monkeypatch.setattr("mt.export._convert", fail)
    one_line_error(run_mt("export", "--run", tiny_run / "runs" / "tiny", "-o", tmp_path / "x"), "disk full")
    assert list(tmp_path.iterdir()) == []  # neither x nor its staging folder
    one_line_error(run_mt("export", "--run", exported / "int8", "-o", tmp_path / "y"), "already an export")


def test_a_damaged_export_is_one_line(exported, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(exported / "int8", broken)
    (broken / "model.bin").write_bytes(b"not a model")
    one_line_error(run_mt("translate", "--run", broken, "Bonjour"), "CTranslate2 cannot load")


def test_export_without_the_extra_names_the_install_command(tiny_run, tmp_path):
    code = ("import sys; sys.modules['ctranslate2'] = None\n"
            "from mt.cli import main; sys.argv = ['mt', 'export', '--run', sys.argv[1], '-o', sys.argv[2]]; main()")
    result = subprocess.run([sys.executable, "-c", code, str(tiny_run / "runs" / "tiny"), str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: exporting to and translating with CTranslate2 needs it: pip install -e '.[export]'")


def test_serve_takes_an_exported_folder(exported):
    pytest.importorskip("fastapi")
    translator = Translator.load(exported / "float32")
    assert isinstance(translator, ExportedTranslator)
    process, url = start_server(["--run", str(exported / "float32")])
    try:
        texts = ["Un chat dort.", "Bonjour"]
        assert request(url + "/translate", {"text": texts, "beam_size": 2}) == (
            200, {"translations": translator.translate(texts, beam_size=2)})
        status, info = request(url + "/info")
        assert status == 200 and info["parameters"] == translator.num_parameters() > 0
        status, heatmap = request(url + "/attention", {"text": "Un chat dort."})
        assert status == 200 and heatmap.startswith(b"\x89PNG")
        [[best]] = translator.translate_nbest(["Un chat dort."])
        weights, source, output = translator.attention_map("Un chat dort.", best.tokens)
        assert weights.shape == (1, 1, len(output), len(source))
        assert torch.all(weights.sum(-1) <= 1.0 + 1e-5)
    finally:
        process.terminate()
        assert process.wait(timeout=30) == 0


def test_the_steps_in_docs_export_translate_as_mt_does_without_mt(exported, valid):
    """docs/export.md's recipe, written with CTranslate2, SentencePiece and YAML alone."""
    import ctranslate2
    import sentencepiece
    import yaml

    from mt.data import normalize_text

    folder = exported / "float32"
    config = yaml.safe_load((folder / "config.yaml").read_text())
    decode, limit = config["decode"], config["model"]["max_positions"] - 1
    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    engine = ctranslate2.Translator(str(folder))
    texts = valid[0][:100]
    outputs = []
    for text in texts:
        pieces = sp.encode(normalize_text(text), out_type=str)[:limit]
        length = min(int((len(pieces) + 1) * decode["max_len_a"] + decode["max_len_b"]), limit)
        [result] = engine.translate_batch([pieces], beam_size=decode["beam_size"],
                                         length_penalty=decode["length_penalty"], max_decoding_length=length,
                                         max_input_length=0, return_end_token=True,
                                         no_repeat_ngram_size=decode.get("no_repeat_ngram_size", 3))
        tokens = [p for p in result.hypotheses[0] if p != "</s>"]
        outputs.append(" ".join(sp.decode(tokens).split()))
    assert outputs == Translator.load(folder).translate(texts)


def test_translating_with_an_export_needs_no_torch(exported):
    code = ("import sys\nfrom mt.cli import main\n"
            "sys.argv = ['mt', 'translate', '--run', sys.argv[1], 'Un chat dort.']\n"
            "try:\n    main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    result = subprocess.run([sys.executable, "-c", code, str(exported / "int8")], capture_output=True, text=True,
                            timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == Translator.load(exported / "int8").translate(["Un chat dort."])[0]


def test_an_export_takes_no_weights_option(exported):
    one_line_error(run_mt("translate", "--run", exported / "int8", "--weights", "last.pt", "Bonjour"),
                   "takes no --weights")


def test_the_bench_gives_torch_its_threads_back_after_ctranslate2(tiny_run, tmp_path):
    from mt.bench import _ctranslate2_decoders

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        decoders = _ctranslate2_decoders(tiny_run / "runs" / "tiny", tmp_path, torch.device("cpu"), streams=2)
        assert torch.get_num_threads() == 2  # creating a CTranslate2 translator had set it to its intra_threads
        run, _ = decoders["CTranslate2 float32"]
        config = load_run_config(tiny_run / "runs" / "tiny" / checkpoint.CONFIG)
        assert run([[5, 6, 7]], config.decode)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)
