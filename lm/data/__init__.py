"""Data for every training stage: tfds builders over local files, grain pipelines, the chat template and
GLM blank infilling."""
from lm.data.builders import data_source, prepare
from lm.data.chat import format_chat, format_prompt, format_response
from lm.data.glm import GlmTokens, blank_infilling
from lm.data.pipelines import preference_dataset, preference_pairs, pretrain_dataset, sft_dataset

__all__ = ["GlmTokens", "blank_infilling", "data_source", "format_chat", "format_prompt", "format_response",
           "prepare", "preference_dataset", "preference_pairs", "pretrain_dataset", "sft_dataset"]
