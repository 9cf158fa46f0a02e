"""The model's own tokenizer: batch encoding, chat template, EOS ids, decoding.

Only tokenizers and chat templates come from `transformers`; the engine never runs a transformers model.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from engine.errors import ModelLoadError


def _int_list(value: object) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if v is not None]
    return []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with path.open(encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


class Tokenizer:
    """Wraps a Hugging Face fast tokenizer loaded from a local model directory."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
        from transformers import AutoTokenizer

        self.model_dir = Path(model_dir)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        except Exception as exc:  # transformers raises many types here; the user needs one sentence
            raise ModelLoadError(
                f"Could not load a tokenizer from {self.model_dir}: {exc}. The model directory needs "
                "tokenizer.json (or the files of a Hugging Face tokenizer)."
            ) from exc
        template = getattr(self._tok, "chat_template", None)
        template_file = self.model_dir / "chat_template.jinja"
        if not template and template_file.is_file():
            template = template_file.read_text(encoding="utf-8")
            self._tok.chat_template = template
        self.chat_template: str | None = template or None
        self.eos_token_ids: frozenset[int] = frozenset(self._find_eos_ids())

    def _find_eos_ids(self) -> set[int]:
        ids: set[int] = set()
        ids.update(_int_list(_read_json(self.model_dir / "generation_config.json").get("eos_token_id")))
        config = _read_json(self.model_dir / "config.json")
        ids.update(_int_list(config.get("eos_token_id")))
        ids.update(_int_list(config.get("text_config", {}).get("eos_token_id")))
        ids.update(_int_list(self._tok.eos_token_id))
        return ids

    @property
    def vocab_size(self) -> int:
        return len(self._tok)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def apply_chat_template(self, user_message: str) -> str:
        """The prompt text for one user turn, ending where the assistant's answer starts."""
        assert self.chat_template is not None
        return self._tok.apply_chat_template(
            [{"role": "user", "content": user_message}], tokenize=False, add_generation_prompt=True
        )

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = True) -> list[list[int]]:
        """Token ids of each text; the fast tokenizer encodes the batch in parallel."""
        if not texts:
            return []
        out = self._tok(list(texts), add_special_tokens=add_special_tokens)["input_ids"]
        return [list(ids) for ids in out]

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return self.encode_batch([text], add_special_tokens=add_special_tokens)[0]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tok.decode(list(token_ids), skip_special_tokens=True)
