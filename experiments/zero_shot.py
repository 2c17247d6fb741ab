"""Zero-shot sentiment by text embeddings, no training: each review and the label descriptions ("a good review"
/ "a bad review"; in Chinese "好评" / "差评") are embedded with lm.embed, and a review gets the label whose
description is closest in cosine similarity (lm.embedding.zero_shot).

  python -m experiments.zero_shot --checkpoint=RUN_OR_HF_DIR [--data=data/sentiment/reviews.jsonl]
      [--pooling=mean] [--bos] [--tokenizer=PATH]

`--checkpoint` is a run directory of any stage or a Hugging Face directory (lm.load). The data is JSONL of
`{"text", "label": "positive" | "negative", "lang": "en" | "zh"}` (data/sentiment/README.md). Prints the
accuracy per language and overall beside the majority-class baseline, and the fraction predicted positive
(a classifier that always picks one label scores the baseline).
"""
import collections
import json

from absl import flags

import experiments

LABELS = ("positive", "negative")
DESCRIPTIONS = {"en": ("a good review", "a bad review"), "zh": ("好评", "差评")}  # in LABELS order

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Run directory, its checkpoints/, or a Hugging Face directory.",
                                  required=True)
_DATA = flags.DEFINE_string("data", "data/sentiment/reviews.jsonl", "JSONL of {text, label, lang} reviews.")
_POOLING = flags.DEFINE_enum("pooling", "mean", ["mean", "last"], "Pool the final hidden states by mean or last token.")
_BOS = flags.DEFINE_bool("bos", True, "Start every text with the tokenizer's bos token (as in training).")
_TOKENIZER = flags.DEFINE_string("tokenizer", "", "Tokenizer (.model file or directory); default: the model's own.")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Texts per forward pass.")


def read_reviews(path: str) -> list[dict]:
    """The rows of a reviews JSONL file; a malformed row is a ValueError naming its line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if (not isinstance(row, dict) or not isinstance(row.get("text"), str) or row.get("label") not in LABELS
                    or row.get("lang") not in DESCRIPTIONS):
                raise ValueError(f"{path}:{n}: expected {{'text': str, 'label': one of {LABELS}, 'lang': one of "
                                 f"{tuple(DESCRIPTIONS)}}}, got {line.strip()[:120]}")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no reviews")
    return rows


def main(argv):
    del argv
    import lm
    from lm import embedding, runs

    rows = read_reviews(_DATA.value)
    cfg, params, tok = lm.load(_CHECKPOINT.value, tokenizer=_TOKENIZER.value or None)
    if tok is None:
        raise ValueError(f"no tokenizer in {_CHECKPOINT.value}; pass --tokenizer=PATH")
    runs.check_vocab(tok, cfg)
    bos = [tok.bos_id] if _BOS.value and tok.bos_id is not None else []
    by_lang = collections.defaultdict(list)
    for row in rows:
        by_lang[row["lang"]].append(row)
    print(f"{_CHECKPOINT.value}: pooling={_POOLING.value} bos={bool(bos)}; labels by cosine similarity to "
          + ", ".join(f"{lang} {DESCRIPTIONS[lang]}" for lang in sorted(by_lang)))
    print(f"{'lang':<6}{'n':>6}{'accuracy':>10}{'majority':>10}{'pred pos':>10}")
    totals = collections.Counter()
    for lang in sorted(by_lang):
        group = by_lang[lang]
        preds = embedding.zero_shot(cfg, params, [bos + tok.encode(r["text"]) for r in group],
                                    [bos + tok.encode(d) for d in DESCRIPTIONS[lang]], _POOLING.value,
                                    batch_size=_BATCH.value)  # [n] indices into LABELS
        gold = [LABELS.index(r["label"]) for r in group]
        counts = {"n": len(group), "correct": sum(int(p == g) for p, g in zip(preds, gold)),
                  "pred_pos": int((preds == 0).sum()), "gold_pos": gold.count(0)}
        totals.update(counts)
        _print_row(lang, counts)
    _print_row("all", totals)


def _print_row(name: str, counts) -> None:
    """One line of the table: n, accuracy, majority-class baseline, fraction predicted positive."""
    n, pos = counts["n"], counts["gold_pos"]
    print(f"{name:<6}{n:>6}{counts['correct'] / n:>10.3f}{max(pos, n - pos) / n:>10.3f}{counts['pred_pos'] / n:>10.3f}")

if __name__ == "__main__":
    experiments.run(main)
