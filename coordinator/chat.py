"""Chat prompts: the checkpoint's own chat template (tokenizer_config.json `chat_template`), rendered
with a sandboxed Jinja environment the way Hugging Face tokenizers render it (messages,
add_generation_prompt, bos_token, eos_token, raise_exception)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from workers.errors import MoeshardError

ROLES = ("system", "user", "assistant", "tool", "developer")


class ChatError(MoeshardError, ValueError):
    """The messages cannot be rendered (bad shape, or the template refused them). `param` names the field."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(message)


def _token_text(v: Any) -> str:
    if isinstance(v, dict):              # {"content": "<s>", ...} in some tokenizer_config.json files
        return str(v.get("content", ""))
    return "" if v is None else str(v)


class ChatTemplate:
    """A checkpoint's chat template; `ChatTemplate.load(path)` is None where the checkpoint has none."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = ""):
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        self._template = env.from_string(source)
        self.bos_token, self.eos_token = bos_token, eos_token

    @classmethod
    def load(cls, checkpoint: str | Path) -> "ChatTemplate | None":
        path = Path(checkpoint) / "tokenizer_config.json"
        if not path.is_file():
            return None
        cfg = json.loads(path.read_text(encoding="utf-8"))
        source = cfg.get("chat_template")
        if isinstance(source, list):          # named templates: [{"name": "default", "template": ...}]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source.strip():
            return None
        return cls(source, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))

    def render(self, messages: Any) -> str:
        """The prompt text for OpenAI-style `messages`, ending where the assistant's answer starts."""
        from jinja2.exceptions import TemplateError

        msgs = check_messages(messages)
        try:
            return self._template.render(messages=msgs, add_generation_prompt=True, bos_token=self.bos_token,
                                         eos_token=self.eos_token)
        except TemplateError as e:
            raise ChatError("messages", f"the model's chat template refused the messages: {e}") from None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """[{role, content}] with string contents (text parts joined); ChatError says what is wrong."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ChatError(f"messages[{i}]", f"messages[{i}] must be an object with a role and a content")
        role, content = m["role"], m.get("content")
        if role not in ROLES:
            raise ChatError(f"messages[{i}].role", f"messages[{i}].role must be one of {', '.join(ROLES)}, "
                                                   f"got {role!r}")
        if isinstance(content, list):            # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ChatError(f"messages[{i}].content", f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ChatError(f"messages[{i}].content", f"messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return out
