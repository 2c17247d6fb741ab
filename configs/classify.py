"""Classification fine-tuning configs (GPT-1, section 3.3): `python -m experiments.classify
--config=configs/classify.py:PRESET --workdir=DIR --config.init_from=PRETRAINED_RUN_OR_HF_DIR`.

A linear head on the last token's final hidden state of the `init_from` model, trained with softmax
cross-entropy (optionally plus GPT-1's auxiliary LM loss, `classify.aux_lm_coef`) on labelled rows
`{text, label}` or `{text, text_pair, label}` (lm.classify). Presets: `tiny` (the bundled bilingual reviews,
positive/negative, on CPU), `llama-7b`, `bloom-7b1`, `glm-6b`.
"""
import ml_collections as mlc

from configs import common
from lm.classify import ClassifyConfig

PRESETS = ("tiny", "llama-7b", "bloom-7b1", "glm-6b")


def data(seq_len: int):
    c = mlc.ConfigDict()
    # Labelled rows (JSONL/JSON/Parquet/`datasets` dir): {text, label} or sentence pairs {text, text_pair, label};
    # labels are class ids (ints) or names (strings); schemas in lm.data.schemas
    c.path = "data/sentiment/reviews.jsonl"  # a file or a directory of them (see above)
    c.eval_path = ""  # a separate held-out file (e.g. GLUE's validation split); "" = eval_fraction of data.path
    c.labels = ()  # class names in id order, e.g. ("negative", "positive"); () = names sorted, or ids 0..max
    c.tokenizer = ""  # a .model file or a tokenizer directory; "" = the init_from run's or HF directory's own
    c.field_map = ""  # rename columns, e.g. GLUE's "sentence1=text,sentence2=text_pair" or "sentence=text"
    c.seq_len = seq_len  # tokens per row: [bos] text [eos text_pair] eos, the label read at the final eos
    c.overlong = "error"  # a row longer than seq_len: "error" (names it) or "truncate" (keeps the final eos)
    c.eval_fraction = 0.1  # share of rows held out when there is no eval_path
    c.cache_dir = ""  # prepared datasets; "" = $LM_DATA_CACHE or ~/.cache/chatgpt-jax/tfds
    return c


def get_config(preset: str = "tiny"):
    """The classification config of `preset` (one of PRESETS)."""
    if preset == "tiny":
        c = common.base(model_preset="llama-tiny", steps=200, batch_size=16, lr=1e-3, warmup_steps=20,
                        checkpoint_every=0, log_every=10, eval_every=100)
        c.data = data(seq_len=64)  # what to read and how
        c.data.eval_fraction = 0.2  # 79 of the 400 reviews held out
    elif preset in ("llama-7b", "bloom-7b1", "glm-6b"):
        # GPT-1's fine-tuning: lr 6.25e-5 with 0.2% warmup, batch 32, 3 epochs; 2e-5 suits 7B models better.
        c = common.base(model_preset=preset, steps=1000, batch_size=32, lr=2e-5, warmup_steps=20,
                        checkpoint_every=200, log_every=10, eval_every=200)
        c.data = data(seq_len=512)  # what to read and how
        c.model.overrides.dtype = "bfloat16"  # bf16 matmuls, f32 params, norms and losses
        c.model.overrides.remat = "full"  # recompute each block in the backward pass
    else:
        raise ValueError(f"unknown classify preset {preset!r}; choose one of {PRESETS}")
    c.optim.weight_decay = 0.0  # common for short fine-tunes
    c.train.eval_batches = 64  # at most this many per evaluation: one pass over the held-out rows ends sooner
    c.classify = common.from_dataclass(ClassifyConfig)  # the recipe: lm.classify.ClassifyConfig (aux_lm_coef)
    return c
