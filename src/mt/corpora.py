"""Named corpora and where their files are found.

A corpus is named `name:split` (`multi30k:train`, `tatoeba:test`) and lives in a folder `name/` holding
`<split>.<lang>` or `<split>.<lang>.gz`. Folders are searched in this order: `data/` under the current
directory, then each folder of the `MT_DATA_PATH` environment variable (separated by `:`).
A corpus may also be an explicit pair of files, `{src: PATH, tgt: PATH}`. A training corpus may be a list
of corpora, each repeated (up-sampled) N times with `name:split*N` or `{src: ..., tgt: ..., repeat: N}`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from mt.errors import DataError

KNOWN = {
    "multi30k": ("train", "valid", "test_2016_flickr", "test_2017_flickr", "test_2017_mscoco"),
    "tatoeba": ("train", "valid", "test"),
}


@dataclass(frozen=True)
class CorpusFiles:
    """An aligned pair of files and the name to show the user."""

    name: str
    src: Path
    tgt: Path


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


def parse_corpus(spec: object) -> tuple[str, str] | tuple[Path, Path]:
    """Checks the form of a corpus spec: returns (name, split) or (src path, tgt path).

    Raises:
        ValueError: explaining the two accepted forms.
    """
    if isinstance(spec, str):
        name, sep, split = spec.partition(":")
        if not sep or not name or not split or "/" in name:
            raise ValueError(f"expected 'name:split' (e.g. multi30k:train) or {{src: PATH, tgt: PATH}}, got {spec!r}")
        return name, split
    if isinstance(spec, dict):
        if set(spec) != {"src", "tgt"} or not all(isinstance(v, str) and v for v in spec.values()):
            raise ValueError(f"a pair of files needs exactly the keys src and tgt with paths, got {spec!r}")
        return Path(spec["src"]), Path(spec["tgt"])
    raise ValueError(f"expected 'name:split' or {{src: PATH, tgt: PATH}}, got {spec!r}")


def search_dirs() -> list[Path]:
    """The folders searched for named corpora, in order."""
    dirs = [Path("data")]
    dirs += [Path(p) for p in os.environ.get("MT_DATA_PATH", "").split(os.pathsep) if p]
    return dirs


def resolve(spec: object, src_lang: str = "fr", tgt_lang: str = "en") -> CorpusFiles:
    """Finds the files of a corpus spec.

    Raises:
        DataError: if the spec is malformed or its files are not found, naming where it looked.
    """
    try:
        parsed = parse_corpus(spec)
    except ValueError as e:
        raise DataError(str(e)) from None
    if isinstance(parsed[0], Path):
        src, tgt = parsed
        for path in (src, tgt):
            if not path.is_file():
                raise DataError(f"corpus file not found: {path}")
        return CorpusFiles(f"{src} | {tgt}", src, tgt)
    name, split = parsed
    looked = []
    for folder in search_dirs():
        found = [_find(folder / name / f"{split}.{lang}") for lang in (src_lang, tgt_lang)]
        if all(found):
            return CorpusFiles(f"{name}:{split}", found[0], found[1])
        looked.append(str(folder / name))
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
