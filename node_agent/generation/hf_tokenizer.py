"""A Hugging Face checkpoint's tokenizer and chat template, without `transformers`.

- `HFTokenizer.from_dir(path)`: tokenizer.json through the `tokenizers` library (the Rust
  tokenizer transformers' fast tokenizers wrap), plus tokenizer_config.json and
  special_tokens_map.json for the special tokens and the chat template (also read from
  chat_template.jinja, where transformers 4.43+ saves it). A `paged_lm.TextTokenizer`:
  `encode` adds the special tokens the tokenizer's post-processor adds (as
  `tokenizer(text)` does), `decode` drops special tokens.
- `ChatTemplate.render(messages, add_generation_prompt=...)`: the Jinja template rendered as
  transformers' `apply_chat_template(..., tokenize=False)` does (sandboxed environment,
  trim_blocks and lstrip_blocks, `tojson`, `raise_exception`, `strftime_now`, the special
  tokens as variables). Encode its output with `encode(text, add_special_tokens=False)`:
  the template writes the BOS itself.
- `StreamDecoder`: text one token at a time, held back while the text ends inside a
  multi-byte character or a merge (`\ufffd`), as vLLM and TGI stream it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from node_agent.errors import InvalidInput, InvalidModel

__all__ = ["ChatTemplate", "HFTokenizer", "StreamDecoder"]

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InvalidModel(f"{path.name}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise InvalidModel(f"{path.name}: expected a JSON object")
    return data


def _token_text(value: object) -> str | None:
    """A special token as tokenizer_config writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template; `render` is `apply_chat_template(tokenize=False)`."""

    def __init__(self, source: str, special_tokens: Mapping[str, str]) -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self.template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise InvalidModel(f"chat template does not compile: {e}") from None
        self.source = source
        self.special_tokens = dict(special_tokens)

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt text of `messages` ({role, content} mappings); `InvalidInput` when the
        template refuses them (e.g. roles not alternating)."""
        try:
            return self.template.render(
                messages=[dict(m) for m in messages], tools=tools,
                add_generation_prompt=add_generation_prompt, **self.special_tokens, **kwargs,
            )  # fmt: skip
        except jinja2.TemplateError as e:
            raise InvalidInput(f"chat template: {e}") from None


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:  # fmt: skip
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


class StreamDecoder:
    """Text for one token at a time (a `paged_lm.IncrementalDecoder`): each piece is the
    decode of the tokens so far minus what was already emitted, held back while it ends in
    U+FFFD (an incomplete character); `flush` emits what is held."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def _text(self, start: int, stop: int) -> str:
        return self._tok.decode(self._ids[start:stop], skip_special_tokens=True)

    def feed(self, token_id: int) -> str:
        self._ids.append(token_id)
        before = self._text(self._prefix, self._read)
        now = self._text(self._prefix, len(self._ids))
        if len(now) <= len(before) or now.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return now[len(before) :]

    def flush(self) -> str:
        before = self._text(self._prefix, self._read)
        now = self._text(self._prefix, len(self._ids))
        self._prefix = self._read = len(self._ids)
        return now[len(before) :]


class HFTokenizer:
    """tokenizer.json (+ its config) of a Hugging Face checkpoint; see the module docstring."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        special_tokens: Mapping[str, str],
        chat_template: ChatTemplate | None,
    ) -> None:
        self.tokenizer = tokenizer
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template

    @classmethod
    def from_dir(cls, path: Path | str) -> HFTokenizer:
        """Read tokenizer.json (required), tokenizer_config.json, special_tokens_map.json and
        chat_template.jinja (optional); `InvalidModel` when they are malformed."""
        path = Path(path)
        try:
            tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:  # the Rust library raises plain Exceptions
            raise InvalidModel(f"tokenizer.json: cannot load: {e}") from None
        cfg = _read_json(path / "tokenizer_config.json")
        specials: dict[str, str] = {}
        for source in (_read_json(path / "special_tokens_map.json"), cfg):
            for key in SPECIAL_TOKEN_KEYS:
                text = _token_text(source.get(key))
                if text is not None:
                    specials[key] = text
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        chat = ChatTemplate(template, specials) if isinstance(template, str) and template else None
        return cls(tok, specials, chat)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def token_id(self, text: str) -> int | None:
        found = self.tokenizer.token_to_id(text)
        return None if found is None else int(found)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """The id of tokenizer_config's eos_token, if it has one in the vocabulary."""
        eos = self.special_tokens.get("eos_token")
        found = None if eos is None else self.token_id(eos)
        return () if found is None else (found,)

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(token_ids), skip_special_tokens=True))

    def incremental_decoder(self) -> StreamDecoder:
        return StreamDecoder(self.tokenizer)

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Token ids of the rendered chat (the template writes its own special tokens);
        `InvalidInput` if the checkpoint has no chat template."""
        if self.chat_template is None:
            raise InvalidInput("this model's tokenizer has no chat template")
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)
