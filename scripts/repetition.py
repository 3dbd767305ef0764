"""How often a run's outputs loop, with and without the repetition guard (`decode.no_repeat_ngram_size`).

An output loops when a run of 1 to 3 pieces comes 4 times or more in a row ("The eanannenenenenenenes."): the
babble the guard is for. For each guard size the script translates sentences unlike the training data
(tests/data/everyday.fr, written for this; no test split) and the valid splits, and prints the share of outputs
that loop and the valid BLEU, so that the default is chosen on valid data.

    MT_DATA_PATH=../shared/data python scripts/repetition.py --run runs/multi30k --sizes 0,3,4
"""

import argparse
import dataclasses
from pathlib import Path

import sacrebleu

from mt import corpora
from mt.data import read_corpus, read_lines
from mt.translate import Translator

EVERYDAY = Path(__file__).resolve().parents[1] / "tests" / "data" / "everyday.fr"


def loops(tokens: list[int], copies: int = 4, longest: int = 3) -> bool:
    """A run of 1 to `longest` pieces repeated `copies` times or more in a row."""
    for period in range(1, longest + 1):
        span = period * copies
        for start in range(len(tokens) - span + 1):
            if all(tokens[start + i] == tokens[start + i % period] for i in range(period, span)):
                return True
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--sizes", default="0,3,4", help="guard sizes to compare (0: no guard)")
    parser.add_argument("--valid", default="multi30k:valid,tatoeba:valid")
    parser.add_argument("--beam", type=int, default=None, help="default: the run's")
    args = parser.parse_args()
    translator = Translator.load(args.run)
    sets = {"everyday": (read_lines(EVERYDAY), None)}
    for spec in args.valid.split(","):
        sets[spec] = read_corpus(corpora.resolve(spec, "fr", "en"))
    base = translator.config
    print(f"| guard | {' | '.join(f'{name} loops' for name in sets)} | "
          f"{' | '.join(f'{name} BLEU' for name in sets if sets[name][1])} |")
    for size in (int(s) for s in args.sizes.split(",")):
        translator.config = dataclasses.replace(base, decode=dataclasses.replace(
            base.decode, no_repeat_ngram_size=size))
        looping, bleus = [], []
        for sources, references in sets.values():
            outputs = [o[0] for o in translator.translate_nbest(sources, args.beam)]
            looping.append(f"{sum(loops(o.tokens) for o in outputs)}/{len(outputs)}")
            if references:
                bleus.append(f"{sacrebleu.corpus_bleu([o.text for o in outputs], [references]).score:.2f}")
        print(f"| {size or 'off'} | {' | '.join(looping)} | {' | '.join(bleus)} |")


if __name__ == "__main__":
    main()
