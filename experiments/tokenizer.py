"""Trains the project's SentencePiece BPE tokenizer on text files.

  python -m experiments.tokenizer --input=data/text --vocab_size=3000 --output=runs/tokenizer/tok

writes `runs/tokenizer/tok.model` (load it with `lm.tokenizer.Tokenizer.load`) and `tok.vocab`.
"""
from absl import app, flags, logging

from lm import runs
from lm.tokenizer import Tokenizer

_INPUT = flags.DEFINE_list("input", None, "Text files or directories (their *.txt files, recursively).",
                           required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 3000, "Number of ids, special and byte pieces included.")
_OUTPUT = flags.DEFINE_string("output", None, "Output path prefix: writes PREFIX.model and PREFIX.vocab.",
                              required=True)
_COVERAGE = flags.DEFINE_float("character_coverage", 0.9995, "Share of characters given their own piece; "
                               "the rarest fall back to UTF-8 bytes.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the trainer's sampling.")


def input_files(paths):
    """Expands directories to their `.txt` files (sorted); plain paths pass through."""
    try:
        return [f for p in paths for f in runs.text_files(p, name="--input")]
    except FileNotFoundError as e:
        raise app.UsageError(str(e)) from None


def main(argv):
    del argv
    files = input_files(_INPUT.value)
    tok = Tokenizer.train(files, _VOCAB_SIZE.value, _OUTPUT.value, character_coverage=_COVERAGE.value,
                          seed=_SEED.value)
    logging.info("trained on %d files", len(files))
    print(f"wrote {tok.path} (vocab_size={tok.vocab_size}, special ids {tok.special_ids})")


if __name__ == "__main__":
    app.run(main)
