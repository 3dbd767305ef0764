"""Lines of text: read checked (UTF-8, line ends, plain or gzipped files), checked as input, normalised as the
training data is, and cut into chunks. No torch here: `mt translate` of an exported model runs on this, the
tokenizer and CTranslate2 alone.
"""

from __future__ import annotations

import codecs
import gzip
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

from mt.errors import DataError, MtError


def iter_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file (plain or .gz), without line endings, read one at a time.

    Raises:
        DataError: naming the file, and the line for bytes that are not UTF-8.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            yield from decode_lines(f, str(path))
    except FileNotFoundError:
        raise DataError(f"file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError; damaged data is zlib's
        raise DataError(f"cannot read {path}: {e}") from None


def decode_lines(raw_lines: Iterable[bytes], name: str) -> Iterator[str]:
    """Lines of bytes (a file or stdin's buffer) as text, without `\\n` or `\\r\\n`.

    Raises:
        DataError: naming `name` and the line, for bytes that are not UTF-8.
    """
    for number, raw in enumerate(raw_lines, start=1):
        if number == 1:
            raw = raw.removeprefix(codecs.BOM_UTF8)  # an editor's byte-order mark: not part of the text
        line = raw.rstrip(b"\n").rstrip(b"\r")
        if b"\r" in line:  # old Mac line ends (CR alone): the whole file would read as one line
            raise DataError(f"{name}, line {number}: a carriage return (CR) inside the line; lines must end with "
                            "LF or CR LF (convert old Mac line ends, e.g. with: tr '\\r' '\\n')")
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{name}, line {number}: not valid UTF-8 (byte {raw[e.start]:#04x})") from None


def check_text(text: str, where: str) -> None:
    """Checks that `text` holds no undecodable bytes: Python turns those of a command-line argument or of
    stdin (under a non-UTF-8 locale) into lone surrogates, which no tokenizer can encode.

    Raises:
        DataError: naming `where` and the first such byte.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        byte = f"byte {code - 0xDC00:#04x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise DataError(f"{where}: not valid UTF-8 ({byte})") from None


def read_lines(path: Path) -> list[str]:
    """All lines of a UTF-8 text file (plain or .gz); see `iter_lines`."""
    return list(iter_lines(path))


# Typographic apostrophes, quotes and spaces, mapped to the plain ASCII ones.
_PLAIN = str.maketrans({
    "\u2019": "'", "\u2018": "'", "\u201b": "'", "\u02bc": "'", "\u00b4": "'",
    "\u201c": '"', "\u201d": '"', "\u201e": '"', "\u00ab": '"', "\u00bb": '"',
    "\u00a0": " ", "\u202f": " ", "\u2009": " ",
})


def normalize_text(text: str) -> str:
    """Unicode NFC, plain apostrophes and quotes, single spaces, no spaces at the ends."""
    return " ".join(unicodedata.normalize("NFC", text).translate(_PLAIN).split())


def in_chunks(lines: Iterable[str], size: int = 64) -> Iterator[list[str]]:
    """`lines` in lists of `size`, each given as soon as it is full: a stream is translated as it arrives. A
    line that fails to read (a DataError) comes after the lines before it, which are given first."""
    chunk: list[str] = []
    try:
        for line in lines:
            chunk.append(line)
            if len(chunk) == size:
                yield chunk
                chunk = []
    except MtError:
        if chunk:
            yield chunk
        raise
    if chunk:
        yield chunk
