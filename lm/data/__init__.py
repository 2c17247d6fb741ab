"""Data for every training stage: tfds builders over local files, grain pipelines, the chat template and
GLM blank infilling. tfds and grain load on first use of what needs them."""
from lm import _lazy

_ATTRS = {
    "data_source": "lm.data.builders", "prepare": "lm.data.builders",
    "format_chat": "lm.data.chat", "format_prompt": "lm.data.chat", "format_response": "lm.data.chat",
    "GlmTokens": "lm.data.glm", "blank_infilling": "lm.data.glm",
    "classify_dataset": "lm.data.pipelines", "preference_dataset": "lm.data.pipelines",
    "preference_pairs": "lm.data.pipelines",
    "pretrain_dataset": "lm.data.pipelines", "sft_dataset": "lm.data.pipelines",
    "prompt_dataset": "lm.data.pipelines", "read_prompts": "lm.data.pipelines",
}
_MODULES = ("builders", "chat", "glm", "pipelines")

__all__ = sorted(_ATTRS)

__getattr__, __dir__ = _lazy.attributes(__name__, _ATTRS, _MODULES)
