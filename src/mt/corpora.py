"""Named corpora and where their files are found.

A corpus is named `name:split` (`multi30k:train`, `tatoeba:test`) and lives in a folder `name/` holding
`<split>.<lang>` or `<split>.<lang>.gz`. Folders are searched in this order: `data/` under the current
directory, then each folder of the `MT_DATA_PATH` environment variable (separated by `:`, `;` on Windows).
A named corpus that is found nowhere is downloaded from its public source into `data/` (Multi30k from its
GitHub repository, pinned to a commit), checked against the SHA-256 of each file, and written atomically.

A corpus may also be an explicit pair of files, `{src: PATH, tgt: PATH}`, or a Hugging Face dataset,
`{hub: opus_books, config: en-fr, split: train, src_field: translation.fr, tgt_field: translation.en}`
(or `disk: FOLDER` for one written by `save_to_disk`). A training corpus may be a list
of corpora, each repeated (up-sampled) N times with `name:split*N` or `{src: ..., tgt: ..., repeat: N}`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

from mt.errors import DataError
from mt.files import write_bytes

KNOWN = {
    "multi30k": ("train", "valid", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"),
    "tatoeba": ("train", "valid", "test"),
}

_MULTI30K = "https://raw.githubusercontent.com/multi30k/dataset/a3d2e0d26b56f3846f66a952536ffed4e401d05a/data/task1/raw"


@dataclass(frozen=True)
class Download:
    """Where one file of a named corpus comes from, and the SHA-256 of the file as `mt` stores it
    (decompressed, each line stripped of surrounding whitespace)."""

    url: str
    sha256: str


DOWNLOADS: dict[str, Download] = {
    f"multi30k/{split}.{lang}": Download(f"{_MULTI30K}/{'val' if split == 'valid' else split}.{lang}.gz", sha)
    for (split, lang), sha in {
        ("train", "en"): "460a15fbd157e34a7a9957ee388c1ca247fe47af3ef25fb50442af6c274e0fc6",
        ("train", "fr"): "b47e97734763b5252a979d767955c270f2c93e9e79f8ef063f71088a26e3c5a9",
        ("valid", "en"): "1f2a23d992769b5b3d209b0a10dd0b77c08cceb1f20dfb97ed0aafa49d107227",
        ("valid", "fr"): "05f2ed05aa5bf06567b3d7ad3121f6346ebd909265383dc79dbe08ef707b7bc2",
        ("test_2016_flickr", "en"): "399a4382932c1aadd3ceb9bef1008d388a64c76d4ae4e9d4728c6f4301cac182",
        ("test_2016_flickr", "fr"): "57a705a12ffb81f3da3539798bdaaaa8f2df5824de3a84e0f4ea378dab959b62",
        ("test_2017_flickr", "en"): "ce1450ddc5ab0834502579d77a170849952e15a2938b34cc503bdc25ebb4fb98",
        ("test_2017_flickr", "fr"): "57ee019ef4b802206799177fe667097dcd32fd031a92e86938fcbfea97f727f8",
        ("test_2017_mscoco", "en"): "43051fdfa86fd5395182e718a94ca67b1b227b9f7c79596ff0f6b813216981d2",
        ("test_2017_mscoco", "fr"): "7f2688662c891f60e8a1e6d27ea1986cd71efe75aef55fd383cc2bd4b4c23a67",
    }.items()
}


@dataclass(frozen=True)
class CorpusFiles:
    """An aligned pair of files and the name to show the user."""

    name: str
    src: Path
    tgt: Path


@dataclass(frozen=True)
class DatasetCorpus:
    """A Hugging Face dataset: from the hub (`hub`, with `config`) or saved with `save_to_disk` (`disk`).
    `src_field` / `tgt_field` name the text, dotted into nested fields: `translation.fr`."""

    name: str
    hub: str | None
    disk: str | None
    config: str | None
    split: str
    src_field: str
    tgt_field: str


_DATASET_KEYS = {"hub", "disk", "config", "split", "src_field", "tgt_field"}


def split_repeat(spec: object) -> tuple[object, int]:
    """`name:split*N` or `{..., repeat: N}` -> (the spec without the repeat, N); N is 1 when absent.

    Raises:
        ValueError: if N is not a positive integer.
    """
    if isinstance(spec, str) and "*" in spec:
        base, _, times = spec.rpartition("*")
        if not times.isdigit() or int(times) < 1:
            raise ValueError(f"'{spec}': the repeat count after '*' must be a positive integer")
        return base, int(times)
    if isinstance(spec, dict) and "repeat" in spec:
        times = spec["repeat"]
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise ValueError(f"repeat must be a positive integer, got {times!r}")
        return {k: v for k, v in spec.items() if k != "repeat"}, times
    return spec, 1


def parse_corpus_list(spec: object) -> list[tuple[object, int]]:
    """A corpus spec or a list of them, each with its repeat count, checked.

    Raises:
        ValueError: naming the first malformed entry.
    """
    specs = spec if isinstance(spec, list) else [spec]
    if not specs:
        raise ValueError("the list of corpora is empty")
    parsed = [split_repeat(s) for s in specs]
    for base, _ in parsed:
        parse_corpus(base)
    return parsed


def _parse_dataset(spec: dict) -> DatasetCorpus:
    unknown = set(spec) - _DATASET_KEYS
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(sorted(unknown))} in a dataset corpus; "
                         f"valid: {', '.join(sorted(_DATASET_KEYS))}")
    if ("hub" in spec) == ("disk" in spec):
        raise ValueError("a dataset corpus names exactly one of hub (a Hugging Face dataset) or disk (a folder "
                         "written by save_to_disk)")
    for key in ("src_field", "tgt_field"):
        if not isinstance(spec.get(key), str) or not spec[key]:
            raise ValueError(f"a dataset corpus needs {key}, e.g. src_field: translation.fr")
    for key in ("hub", "disk", "config", "split"):
        if key in spec and not (isinstance(spec[key], str) and spec[key]):
            raise ValueError(f"a dataset corpus's {key} is a name, got {spec[key]!r}"
                             + (f" (quote it: {key}: '{spec[key]}')" if isinstance(spec[key], int | float) else ""))
    where = spec.get("hub") or spec.get("disk")
    split = spec.get("split", "train")
    name = f"{where}{'/' + spec['config'] if spec.get('config') else ''}:{split}"
    return DatasetCorpus(name, spec.get("hub"), spec.get("disk"), spec.get("config"), split,
                         spec["src_field"], spec["tgt_field"])


def parse_corpus(spec: object) -> tuple[str, str] | tuple[Path, Path] | DatasetCorpus:
    """Checks the form of a corpus spec: returns (name, split), (src path, tgt path) or a DatasetCorpus.

    Raises:
        ValueError: explaining the accepted forms.
    """
    if isinstance(spec, str):
        name, sep, split = spec.partition(":")
        if not sep or not name or not split or "/" in name:
            raise ValueError(f"expected 'name:split' (e.g. multi30k:train), {{src: PATH, tgt: PATH}} or "
                             f"{{hub: NAME, ...}} / {{disk: FOLDER, ...}}, got {spec!r}")
        return name, split
    if isinstance(spec, dict) and ("hub" in spec or "disk" in spec):
        return _parse_dataset(spec)
    if isinstance(spec, dict):
        if set(spec) != {"src", "tgt"} or not all(isinstance(v, str) and v for v in spec.values()):
            raise ValueError(f"a pair of files needs exactly the keys src and tgt with paths, got {spec!r}")
        return Path(spec["src"]), Path(spec["tgt"])
    raise ValueError(f"expected 'name:split', {{src: PATH, tgt: PATH}} or {{hub: NAME, ...}} / "
                     f"{{disk: FOLDER, ...}}, got {spec!r}")


def search_dirs() -> list[Path]:
    """The folders searched for named corpora, in order."""
    dirs = [Path("data")]
    dirs += [Path(p) for p in os.environ.get("MT_DATA_PATH", "").split(os.pathsep) if p]
    return dirs


def resolve(spec: object, src_lang: str = "fr", tgt_lang: str = "en",
            fetch: bool = True) -> CorpusFiles | DatasetCorpus | None:
    """Finds the files of a corpus spec (a dataset corpus is returned as it is: `datasets` finds it).

    A named corpus found in no folder is downloaded from its public source; with `fetch` False it is not, and
    the result is None (a check of the spec only).

    Raises:
        DataError: if the spec is malformed or its files are not found, naming where it looked.
    """
    try:
        parsed = parse_corpus(spec)
    except ValueError as e:
        raise DataError(str(e)) from None
    if isinstance(parsed, DatasetCorpus):
        return parsed
    if isinstance(parsed[0], Path):
        src, tgt = parsed
        for path in (src, tgt):
            if not path.is_file():
                where = "" if path.is_absolute() else f" (a relative path: read from {Path.cwd()})"
                raise DataError(f"corpus file {path} is a folder" if path.is_dir()
                                else f"corpus file not found: {path}{where}")
        return CorpusFiles(f"{src} | {tgt}", src, tgt)
    name, split = parsed
    looked = []
    for folder in search_dirs():
        found = [_find(folder / name / f"{split}.{lang}") for lang in (src_lang, tgt_lang)]
        if all(found):
            return CorpusFiles(f"{name}:{split}", found[0], found[1])
        looked.append(str(folder / name))
    keys = [f"{name}/{split}.{lang}" for lang in (src_lang, tgt_lang)]
    if all(key in DOWNLOADS for key in keys):
        if not fetch:
            return None
        src, tgt = (download(key) for key in keys)
        return CorpusFiles(f"{name}:{split}", src, tgt)
    known = KNOWN.get(name)
    extra = (f"; known splits of {name}: {', '.join(known)}" if known
             else f"; known corpora: {', '.join(KNOWN)}")
    raise DataError(
        f"corpus {name}:{split} not found (looked for {split}.{src_lang}/{split}.{tgt_lang}[.gz] in "
        f"{', '.join(looked)}); put it in data/{name}/ or add its parent folder to MT_DATA_PATH{extra}"
    )


def _find(path: Path) -> Path | None:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def download(key: str, folder: Path = Path("data"), timeout: float = 30.0) -> Path:
    """Fetches one file of a named corpus into `folder` (e.g. data/multi30k/train.fr), checks its SHA-256,
    and renames it into place only then: a failed or interrupted download leaves nothing behind.

    Raises:
        DataError: if the source cannot be reached or the file does not match its checksum.
    """
    source = DOWNLOADS[key]
    target = folder / key
    try:
        with urllib.request.urlopen(source.url, timeout=timeout) as response:
            raw = response.read()
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as e:  # also a cut-off body
        reason = getattr(e, "reason", e)
        raise DataError(f"cannot download {key} from {source.url} ({reason}); put the file in {target.parent}/ "
                        f"or set MT_DATA_PATH to a folder that holds {target.parent.name}/") from None
    try:
        data = gzip.decompress(raw) if source.url.endswith(".gz") else raw
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"download of {key} from {source.url} is not a valid gzip file ({e})") from None
    text = b"".join(line.strip() + b"\n" for line in data.splitlines())
    digest = hashlib.sha256(text).hexdigest()
    if digest != source.sha256:
        raise DataError(f"checksum mismatch for {key} downloaded from {source.url}: expected sha256 "
                        f"{source.sha256}, got {digest}; nothing was written")
    target.parent.mkdir(parents=True, exist_ok=True)  # only now: a failed download leaves no empty folder
    write_bytes(target, text)
    return target
