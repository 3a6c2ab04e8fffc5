"""`Tokenizer`: text <-> token ids and the model's chat template, built from a GGUF file or an HF tokenizer.json.

The heavy lifting is the `tokenizers` library's BPE. From a GGUF the tokenizer is rebuilt from the metadata:
vocabulary and merges (`tokenizer.ggml.tokens` / `merges`), the byte-level pre-tokenizer that
`tokenizer.ggml.pre` names (split rules as llama.cpp applies them), control tokens as special tokens, BOS/EOS.
The chat template is rendered with jinja2 the way transformers' `apply_chat_template` does (sandboxed
environment, trim_blocks + lstrip_blocks, `raise_exception`, a `tojson` that does not escape HTML, the special
tokens as variables).

In the model cache a tokenizer is three files: `tokenizer.json`, `tokenizer_meta.json` (special tokens, EOS ids)
and `chat_template.jinja` (when the model has one).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from tpa_core.errors import TPAError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "tokenizer_meta.json"
TEMPLATE_FILE = "chat_template.jinja"

# Split rules of llama.cpp's byte-level pre-tokenizers (llama-vocab.cpp), by `tokenizer.ggml.pre`.
_GPT2_PRES = ("default", "gpt-2", "gpt2", "phi-2", "jina-es", "jina-de", "olmo", "jais", "poro-chat", "viking",
              "bloom", "gpt3-finnish", "tekken-gpt2")
_DIGITS_THEN_GPT2_PRES = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_PRES = {
    "llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "pixtral": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


@dataclass
class Tokenizer:
    """A BPE tokenizer with the model's special tokens and chat template.

    `backend` is a `tokenizers.Tokenizer`; its post-processor adds BOS when the model wants it, so
    `encode(text)` equals Hugging Face's `tokenizer(text).input_ids` and `encode(text, add_special_tokens=False)`
    what `apply_chat_template(..., tokenize=True)` feeds the model.
    """

    backend: Any
    bos_token: str | None = None
    eos_token: str | None = None
    pad_token: str | None = None
    unk_token: str | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None

    # ----- ids <-> text ------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text (`<|im_start|>`) are matched whole."""
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    # ----- chat template -----------------------------------------------------------------------------------
    @cached_property
    def _compiled_template(self):
        return compile_chat_template(self.chat_template) if self.chat_template else None

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render `messages` ([{"role", "content"}, ...]) with the model's chat template, as transformers does.

        Variables: messages, add_generation_prompt, tools=None, documents=None, bos_token, eos_token, pad_token,
        unk_token (those the model has), plus `extra`. A template's `raise_exception(msg)` becomes a TPAError.
        """
        if self._compiled_template is None:
            raise TPAError("this model has no chat template; use raw prompts (e.g. `tpa-rag generate --raw`)")
        for message in messages:
            if not isinstance(message, dict) or "role" not in message:
                raise TPAError(f"a chat message must be a dict with 'role' and 'content', got {message!r}")
        import jinja2

        variables = {name: value for name, value in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                                     ("pad_token", self.pad_token), ("unk_token", self.unk_token))
                     if value is not None}
        variables.update(extra)
        try:
            return self._compiled_template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                                  add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.TemplateError as exc:
            raise TPAError(f"the chat template rejected the conversation: {exc}") from None

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a rendered conversation (no extra BOS: the template writes what it needs)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt), add_special_tokens=False)

    # ----- persistence -------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        return {"bos_token": self.bos_token, "eos_token": self.eos_token, "pad_token": self.pad_token,
                "unk_token": self.unk_token, "eos_token_ids": list(self.eos_token_ids)}

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_meta.json and (if any) chat_template.jinja into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / TOKENIZER_FILE).write_text(self.backend.to_str(), encoding="utf-8")
        (directory / META_FILE).write_text(json.dumps(self.meta(), indent=1), encoding="utf-8")
        if self.chat_template:
            (directory / TEMPLATE_FILE).write_text(self.chat_template, encoding="utf-8")

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Inverse of `save`."""
        from tokenizers import Tokenizer as Backend

        directory = Path(directory)
        try:
            backend = Backend.from_file(str(directory / TOKENIZER_FILE))
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own kinds
            raise TPAError(f"the tokenizer in {directory} is missing or damaged ({exc})") from None
        template_path = directory / TEMPLATE_FILE
        template = template_path.read_text(encoding="utf-8") if template_path.is_file() else None
        return cls(backend=backend, bos_token=meta.get("bos_token"), eos_token=meta.get("eos_token"),
                   pad_token=meta.get("pad_token"), unk_token=meta.get("unk_token"),
                   eos_token_ids=[int(i) for i in meta.get("eos_token_ids", [])], chat_template=template)

    def fingerprint_text(self) -> str:
        """Everything that determines tokenization and prompting, as one canonical string (for hashing)."""
        return json.dumps({"tokenizer": json.loads(self.backend.to_str()), "meta": self.meta(),
                           "chat_template": self.chat_template}, sort_keys=True, ensure_ascii=False)

    # ----- construction ------------------------------------------------------------------------------------
    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any], source: str = "GGUF") -> Tokenizer:
        """Rebuild the tokenizer a GGUF file describes (only `tokenizer.ggml.model == "gpt2"`, byte-level BPE)."""
        from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
        from tokenizers import Tokenizer as Backend

        kind = metadata.get("tokenizer.ggml.model")
        tokens = metadata.get("tokenizer.ggml.tokens")
        merges = metadata.get("tokenizer.ggml.merges")
        if kind != "gpt2" or not tokens or merges is None:
            raise TPAError(f"{source}: unsupported tokenizer (tokenizer.ggml.model={kind!r}); only byte-level BPE "
                           f"('gpt2') GGUF tokenizers are supported - load the model's Hugging Face folder instead")
        byte_chars = set(bytes_to_unicode().values())
        spelling = bytes_to_unicode()
        # A token written outside the byte alphabet is re-spelled byte by byte, as transformers does.
        vocab = {(t if set(t) <= byte_chars else "".join(spelling[b] for b in t.encode("utf-8"))): i
                 for i, t in enumerate(tokens)}
        pairs = []
        for merge in merges:
            left, sep, right = merge.partition(" ")
            if not sep:
                raise TPAError(f"{source}: malformed BPE merge {merge!r}")
            pairs.append((left, right))
        backend = Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(metadata.get("tokenizer.ggml.pre", "default"), source,
                                               pre_tokenizers, Regex)
        backend.decoder = decoders.ByteLevel()
        types = metadata.get("tokenizer.ggml.token_type") or []
        control = [AddedToken(t, special=True, normalized=False)
                   for t, kind_ in zip(tokens, types) if kind_ == _CONTROL and set(t) <= byte_chars]
        backend.add_special_tokens(control)
        user = [AddedToken(t, special=False, normalized=False)
                for t, kind_ in zip(tokens, types) if kind_ == _USER_DEFINED and t in vocab]
        if user:
            backend.add_tokens(user)

        def token(key: str) -> str | None:
            index = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
            bos_id = int(metadata["tokenizer.ggml.bos_token_id"])
            backend.post_processor = processors.TemplateProcessing(
                single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 $B:1", special_tokens=[(bos, bos_id)])
        eos_ids = [int(metadata["tokenizer.ggml.eos_token_id"])] if eos is not None else []
        eot = metadata.get("tokenizer.ggml.eot_token_id")
        if eot is not None and int(eot) not in eos_ids:
            eos_ids.append(int(eot))
        return cls(backend=backend, bos_token=bos, eos_token=eos, pad_token=token("padding_token_id"),
                   unk_token=token("unknown_token_id"), eos_token_ids=eos_ids,
                   chat_template=metadata.get("tokenizer.chat_template"))

    @classmethod
    def from_hf_folder(cls, folder: str | Path, eos_token_ids: list[int] | None = None) -> Tokenizer:
        """From an HF model folder: tokenizer.json plus, where present, tokenizer_config.json (special tokens,
        chat template), chat_template.jinja / chat_template.json and generation_config.json (EOS ids)."""
        from tokenizers import Tokenizer as Backend

        folder = Path(folder)
        path = folder / TOKENIZER_FILE
        if not path.is_file():
            raise TPAError(f"no tokenizer found in {folder}: expected {TOKENIZER_FILE} "
                           f"(a Hugging Face fast-tokenizer file)")
        try:
            backend = Backend.from_file(str(path))
        except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own kinds
            raise TPAError(f"{path} is not a readable tokenizer.json ({exc})") from None
        config = _read_json(folder / "tokenizer_config.json")
        template = config.get("chat_template")
        if isinstance(template, list):  # several named templates: take the default one
            template = next((t.get("template") for t in template if t.get("name") == "default"), None)
        if (folder / TEMPLATE_FILE).is_file():
            template = (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
        elif (folder / "chat_template.json").is_file():
            template = _read_json(folder / "chat_template.json").get("chat_template", template)
        special = {name: _token_content(config.get(name)) for name in ("bos_token", "eos_token", "pad_token",
                                                                         "unk_token")}
        ids = list(eos_token_ids or [])
        generation = _read_json(folder / "generation_config.json").get("eos_token_id")
        for value in (generation if isinstance(generation, list) else [generation]):
            if value is not None and int(value) not in ids:
                ids.append(int(value))
        if special["eos_token"] is not None:
            eos_id = backend.token_to_id(special["eos_token"])
            if eos_id is not None and eos_id not in ids:
                ids.append(eos_id)
        return cls(backend=backend, eos_token_ids=ids, chat_template=template or None, **special)


def compile_chat_template(template: str):
    """A jinja2 template compiled in the sandboxed environment transformers uses for chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja's own tojson escapes HTML characters; chat templates expect plain JSON.
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise TPAError(f"the model's chat template does not parse: {exc}") from None


def _pre_tokenizer(pre: str, source: str, pre_tokenizers, Regex):
    """The `tokenizers` pre-tokenizer equal to llama.cpp's split rules for `tokenizer.ggml.pre`."""
    if pre in _GPT2_PRES:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_THEN_GPT2_PRES:
        # llama.cpp: first every digit on its own ("\p{N}"), then GPT-2's split.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _REGEX_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_REGEX_PRES[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    supported = sorted(_GPT2_PRES + _DIGITS_THEN_GPT2_PRES + tuple(_REGEX_PRES))
    raise TPAError(f"{source}: unsupported pre-tokenizer tokenizer.ggml.pre={pre!r}; supported: {', '.join(supported)}")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the alphabet of byte-level BPE vocabularies)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars)))


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TPAError(f"{path} is not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}
