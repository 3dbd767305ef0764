"""A joint French+English SentencePiece tokenizer (Kudo & Richardson, 2018): train, load, encode, decode.

The special ids live here and nowhere else: PAD=0, UNK=1, BOS=2, EOS=3.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from mt.errors import CheckpointError, DataError
from mt.files import write_bytes

PAD, UNK, BOS, EOS = 0, 1, 2, 3


class Tokenizer:
    """Wraps a SentencePiece model. `encode` gives ids without BOS/EOS (the batches add them); `decode` drops the
    special ids (PAD, UNK, BOS, EOS)."""

    def __init__(self, model_proto: bytes):
        self.proto = model_proto
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def load(cls, path: Path) -> Tokenizer:
        try:
            proto = Path(path).read_bytes()
            if not proto:  # SentencePiece would load it as a model of no pieces
                raise CheckpointError(f"tokenizer {path} is empty: copy the run's tokenizer.model back or train again")
            return cls(proto)
        except FileNotFoundError:
            raise CheckpointError(f"tokenizer not found: {path}") from None
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot load tokenizer {path}: {e}") from None

    @classmethod
    def train(
        cls,
        sentences: Iterable[str],
        vocab_size: int,
        model_type: str = "unigram",
        character_coverage: float = 1.0,
        sample_sentences: int = 2_000_000,
        seed: int = 1,
    ) -> Tokenizer:
        """Trains on `sentences` (both languages together), sampling at most `sample_sentences` of them.

        Raises:
            DataError: if the corpus is too small for `vocab_size`.
        """
        pool = [s for s in sentences if s.strip()]
        if len(pool) > sample_sentences:
            pool = random.Random(seed).sample(pool, sample_sentences)
        if not pool:
            raise DataError("cannot train a tokenizer: the training corpus has no text")
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(pool),
                model_writer=model,
                vocab_size=vocab_size,
                model_type=model_type,
                character_coverage=character_coverage,
                pad_id=PAD, unk_id=UNK, bos_id=BOS, eos_id=EOS,
                input_sentence_size=0,
                num_threads=2,
                minloglevel=2,
                hard_vocab_limit=True,
            )
        except RuntimeError as e:
            message = " ".join(str(e).split())
            if "smaller than required_chars" in message:
                raise DataError(
                    f"tokenizer.vocab_size={vocab_size} is too small for the characters of this training corpus: "
                    f"{message}; raise tokenizer.vocab_size or lower tokenizer.character_coverage"
                ) from None
            if "Vocabulary size" in message or "vocab_size" in message:
                raise DataError(
                    f"tokenizer.vocab_size={vocab_size} is too large for this training corpus "
                    f"({len(pool)} sentences): {message}; lower tokenizer.vocab_size"
                ) from None
            raise DataError(f"SentencePiece training failed: {message}") from None
        return cls(model.getvalue())

    def save(self, path: Path) -> None:
        write_bytes(path, self.proto)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, texts: Sequence[str]) -> list[list[int]]:
        return self.sp.encode(list(texts))

    def decode(self, ids: Sequence[Sequence[int]]) -> list[str]:
        return [self.sp.decode([i for i in seq if i > EOS]) for seq in ids]

    def pieces(self, ids: Sequence[int]) -> list[str]:
        return [self.sp.id_to_piece(i) for i in ids]
