"""Tokenizer, chat template and incremental detokenizer, all from the model directory's own files.

- `tokenizer.json` is run by the `tokenizers` library (the same Rust code HF's fast tokenizers use).
- The chat template is the jinja template the model ships (`chat_template.jinja` or the
  `chat_template` field of `tokenizer_config.json`), rendered in a sandbox with the helpers HF
  templates expect (`raise_exception`, `strftime_now`, `tojson`).
- `IncrementalDetokenizer` turns a growing list of ids into text deltas. A token can end in the middle
  of a UTF-8 character, and decoders such as SentencePiece's drop the leading space of the first token
  they see, so each step decodes a small window twice (with and without the new tokens) and emits the
  difference only once it no longer ends in a replacement character (vLLM's prefix/read offsets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer

from engine.errors import ModelFormatError, RequestError

_REPLACEMENT = "\ufffd"


def _token_text(value) -> str | None:
    # tokenizer_config.json stores special tokens as strings or as serialized AddedToken objects
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise ModelFormatError(f"{model_dir}: no tokenizer.json (only fast tokenizers are supported)")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelFormatError(f"{path}: unreadable tokenizer ({exc})") from None
        cfg = _read_json(model_dir / "tokenizer_config.json")
        self.bos_token = _token_text(cfg.get("bos_token"))
        self.eos_token = _token_text(cfg.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_token_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        self.special_ids = frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.chat_template = _load_chat_template(model_dir, cfg)
        gen = _read_json(model_dir / "generation_config.json")
        eos = gen.get("eos_token_id")
        ids = set(eos if isinstance(eos, list) else ([eos] if isinstance(eos, int) else []))
        if self.eos_token_id is not None:
            ids.add(self.eos_token_id)
        self.eos_token_ids = frozenset(ids)
        self._template = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render a conversation with the model's own template (text; encode it without special tokens)."""
        if self.chat_template is None:
            raise RequestError("this model ships no chat template")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError("messages must be a list of {'role': ..., 'content': ...} objects")
        if self._template is None:
            self._template = _compile(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "",
                                         **kwargs)
        except _TemplateRaised as exc:
            raise RequestError(f"chat template refused the conversation: {exc}") from None

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> list[int]:
        # the template writes BOS itself where the model wants one, as HF's apply_chat_template does
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs),
                           add_special_tokens=False)


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: unreadable JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _load_chat_template(model_dir: Path, cfg: dict) -> str | None:
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text()
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        tpl = named.get("default")
    return tpl if isinstance(tpl, str) else None


class _TemplateRaised(Exception):
    pass


def _compile(source: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise _TemplateRaised(message)

    def tojson(value, indent=None, ensure_ascii=False):
        return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise ModelFormatError(f"chat template does not compile: {exc}") from None


@dataclass
class IncrementalDetokenizer:
    """Text deltas for ids appended one or more at a time; `ids` starts with the prompt for context."""

    tokenizer: Tokenizer
    ids: list[int]
    skip_special_tokens: bool = True
    prefix_offset: int = 0
    read_offset: int = 0
    _started: bool = field(default=False, repr=False)

    def __post_init__(self):
        self.ids = list(self.ids)
        # a few prompt tokens of left context are enough for any decoder's word-boundary rules
        self.read_offset = len(self.ids)
        self.prefix_offset = max(len(self.ids) - 6, 0)

    def add(self, new_ids: list[int]) -> str:
        self.ids.extend(new_ids)
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end of the output)."""
        return self._delta(final=True)

    def _delta(self, final: bool) -> str:
        if self.read_offset >= len(self.ids):
            return ""
        dec = self.tokenizer.decode
        prefix = dec(self.ids[self.prefix_offset:self.read_offset], self.skip_special_tokens)
        full = dec(self.ids[self.prefix_offset:], self.skip_special_tokens)
        if not final and (len(full) <= len(prefix) or full.endswith(_REPLACEMENT)):
            # nothing printable yet (a partial UTF-8 sequence, or a skipped special token): keep the
            # window so the next token is decoded with its left context
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return full[len(prefix):]
