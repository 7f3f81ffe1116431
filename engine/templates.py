"""Conversation templates: the checkpoint's named InternVL template, else the tokenizer's chat_template.

Named templates follow InternVL's conversation.py (MPT separator style): the prompt is
`system_template.format(system) + sep`, then `role + message + sep` per turn, then the open
assistant role. The stop token is `sep` stripped, as `model.chat` does, or `sep2` stripped when the
template has one: MPT_TWO (internvl3_5_gpt_oss, OpenGVLab/InternVL internvl_chat_gpt_oss/internvl/
model/internvl_chat/conversation.py) ends only a final assistant message with sep2, which a
generation prompt never has, so it renders as MPT; its chat() stops at sep2 and decodes the reply
with special tokens kept (`batch_decode(..., skip_special_tokens=False)`, then split at sep2): the
harmony channel markers (`<|channel|>final<|message|>`) stay in the reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import jinja2
import jinja2.sandbox

Turn = tuple[str, str]  # (user message, assistant reply)

_INTERNVL_SYSTEM = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
_GPT_OSS_SYSTEM = (
    "You are InternVL, a large language model trained by Shanghai AI Laboratory.\nKnowledge cutoff: 2024-06\n"
    "Current date: 2025-08-06\n\nReasoning: low\n\n# Valid channels: final. Channel must be included for every message."
)
_INTERNVL2_SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    system_template: str
    system_message: str
    user_role: str
    assistant_role: str
    sep: str
    sep2: str | None = None
    skip_special_tokens: bool = True  # how chat() decodes the reply

    @property
    def stop_token(self) -> str:
        return (self.sep2 or self.sep).strip()

    def render(self, system_message: str, history: list[Turn], question: str) -> str:
        parts = [self.system_template.format(system_message=system_message), self.sep]
        for user, assistant in history:
            parts += [self.user_role, user, self.sep, self.assistant_role, assistant, self.sep]
        parts += [self.user_role, question, self.sep, self.assistant_role]
        return "".join(parts)


def _chatml(name: str, system_message: str, sep: str) -> Template:
    return Template(
        name=name,
        system_template="<|im_start|>system\n{system_message}",
        system_message=system_message,
        user_role="<|im_start|>user\n",
        assistant_role="<|im_start|>assistant\n",
        sep=sep,
    )


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        _chatml("internvl2_5", _INTERNVL_SYSTEM, "<|im_end|>\n"),
        _chatml("Hermes-2", _INTERNVL2_SYSTEM, "<|im_end|>"),
        _chatml("internlm2-chat", _INTERNVL2_SYSTEM, "<|im_end|>"),
        Template(
            name="phi3-chat",
            system_template="<|system|>\n{system_message}",
            system_message=_INTERNVL2_SYSTEM,
            user_role="<|user|>\n",
            assistant_role="<|assistant|>\n",
            sep="<|end|>",
        ),
        Template(
            name="internvl3_5_gpt_oss",
            system_template="<|start|>system<|message|>{system_message}",
            system_message=_GPT_OSS_SYSTEM,
            user_role="<|start|>user<|message|>",
            assistant_role="<|start|>assistant",
            sep="<|end|>",
            sep2="<|return|>",
            skip_special_tokens=False,
        ),
    )
}


@dataclass(frozen=True)
class ChatTemplate:
    """The tokenizer's Jinja chat_template (HF `apply_chat_template` semantics, generation prompt on)."""

    source: str
    stop_token: str
    special_tokens: dict[str, str]  # bos_token, eos_token, ... as the template expects them

    @cached_property
    def _compiled(self) -> jinja2.Template:
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.source)

    def render(self, system_message: str | None, history: list[Turn], question: str) -> str:
        messages = [{"role": "system", "content": system_message}] if system_message else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        messages.append({"role": "user", "content": question})
        return self._compiled.render(messages=messages, add_generation_prompt=True, **self.special_tokens)
