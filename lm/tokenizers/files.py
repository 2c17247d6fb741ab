"""The files of a tokenizer directory: their names, and the special tokens and chat template a Hugging Face
tokenizer_config.json / special_tokens_map.json / chat_template.jinja declare."""
from __future__ import annotations

import json
import os
from typing import Optional

CONFIG, SPECIAL_MAP, TEMPLATE_FILE = "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"
TOKENIZER_JSON, SP_MODEL = "tokenizer.json", "tokenizer.model"
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _token_string(value) -> Optional[str]:
    """A special token as written in tokenizer_config.json / special_tokens_map.json: a string or a dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {path}: expected a JSON object ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"cannot read {path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_hf_config(directory: str) -> tuple[dict, dict[str, Optional[str]], Optional[str]]:
    """(tokenizer_config, special token name -> string, chat template) of an HF tokenizer directory."""
    config = _read_json(os.path.join(directory, CONFIG)) if os.path.isfile(os.path.join(directory, CONFIG)) else {}
    specials = {name: _token_string(config.get(name)) for name in SPECIAL_NAMES}
    map_path = os.path.join(directory, SPECIAL_MAP)
    if os.path.isfile(map_path):
        for name, value in _read_json(map_path).items():
            if name in specials and specials[name] is None:
                specials[name] = _token_string(value)
    template = config.get("chat_template")
    template_path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return config, specials, template if isinstance(template, str) else None
