"""Thinking mode: the reasoning system prompt, and the reply split into reasoning and content.

InternVL3.5's card (seed card 004) switches thinking on with R1_SYSTEM_PROMPT as the system message;
the reply is then `<think>reasoning</think>` followed by the answer. Skywork-R1V3-style templates put
`<think>\\n` at the end of the prompt, so the reply starts inside the reasoning and has no opening tag.
The split follows vLLM's DeepSeek-R1 reasoning parser convention (`reasoning_content` between the
tags, `content` after the closing one), streaming: a delta never carries part of a tag (text that
could still become a tag is held back), and leading/trailing whitespace around each part is dropped.
"""

from __future__ import annotations

R1_SYSTEM_PROMPT = (
    "You are an AI assistant that rigorously follows this response protocol:\n"
    "1. First, conduct a detailed analysis of the question. Consider different angles, potential solutions, and "
    "reason through the problem step-by-step. Enclose this entire thinking process within <think> and </think> tags.\n"
    "2. After the thinking section, provide a clear, concise, and direct answer to the user's question. Separate "
    "the answer from the think section with a newline.\n"
    "Ensure that the thinking process is thorough but remains focused on the query. The final answer should be "
    "standalone and not reference the thinking section."
)
THINK_START, THINK_END = "<think>", "</think>"


def _held_tail(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (it may still become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Text deltas of a reply -> (reasoning delta, content delta) pairs that join to the split reply."""

    def __init__(self, in_reasoning: bool = False):
        self._state = "reasoning" if in_reasoning else "start"  # start | reasoning | content
        self._buffer = ""  # text not yet assigned (a possible tag prefix, or whitespace)
        self.saw_reasoning = in_reasoning
        self.reasoning, self.content = "", ""
        self._reasoning_pending = self._content_pending = ""  # trailing whitespace held back

    def push(self, delta: str) -> tuple[str, str]:
        self._buffer += delta
        reasoning, content = "", ""
        while True:
            if self._state == "start":
                text = self._buffer.lstrip()
                if THINK_START.startswith(text):  # empty, or maybe the opening tag
                    return reasoning, content
                if text.startswith(THINK_START):
                    self._buffer, self._state, self.saw_reasoning = text[len(THINK_START) :], "reasoning", True
                else:
                    self._buffer, self._state = text, "content"
            elif self._state == "reasoning":
                end = self._buffer.find(THINK_END)
                if end >= 0:
                    reasoning += self._emit("reasoning", self._buffer[:end], final=True)
                    self._buffer, self._state = self._buffer[end + len(THINK_END) :], "content"
                    continue
                held = _held_tail(self._buffer, THINK_END)
                reasoning += self._emit("reasoning", self._buffer[: len(self._buffer) - held], final=False)
                self._buffer = self._buffer[len(self._buffer) - held :]
                return reasoning, content
            else:
                content += self._emit("content", self._buffer, final=False)
                self._buffer = ""
                return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What is still held (a tag prefix at the very end is text)."""
        if self._state == "start":
            self._state = "content"
        part, self._buffer = self._buffer, ""
        if self._state == "reasoning":
            return self._emit("reasoning", part, final=True), ""
        return "", self._emit("content", part, final=True)

    def _emit(self, kind: str, text: str, final: bool) -> str:
        """Appends to `kind` with its leading whitespace dropped and trailing whitespace held until
        more text follows (or dropped when the part ends) -> the delta released."""
        done = getattr(self, kind)
        pending = getattr(self, f"_{kind}_pending")
        text = pending + text
        if not done:
            text = text.lstrip()
        release = text if final else text.rstrip()
        setattr(self, f"_{kind}_pending", "" if final else text[len(release) :])
        release = release.rstrip() if final else release
        setattr(self, kind, done + release)
        return release
