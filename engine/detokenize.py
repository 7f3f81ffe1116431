"""Incremental, UTF-8-safe detokenization: text deltas that join to exactly `decode(all ids)`.

Byte-level tokens can end in the middle of a character. A delta is released only when the decoded
window does not end in U+FFFD (an incomplete character); each window re-decodes a few tokens
before the new ones so merges and spaces come out as the full decode has them.
"""

from __future__ import annotations

from engine.reasoning import ReasoningSplitter
from engine.tokenizer import TextTokenizer


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TextTokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the context window
        self._read_offset = 0  # ids up to here have been released as text

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return text[len(prefix) :]

    def flush(self) -> str:
        """What is still held back (a final incomplete character decodes to U+FFFD, as in the full decode)."""
        prefix = self._tokenizer.decode(self._ids[self._prefix_offset : self._read_offset])
        text = self._tokenizer.decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return text[len(prefix) :]


class TextStream:
    """Turns raw text deltas into deltas of the final reply: cut at a stop string, stripped.

    Stop strings are searched in the text as generated (a stop may begin with whitespace, e.g.
    "\nUser:"); the reply is what precedes the cut, stripped. Leading whitespace is dropped,
    trailing whitespace is held until more text follows, and the last `max(len(stop)) - 1`
    characters are held until they cannot start a stop string. Generation stops at the first delta
    after which the text holds a stop string (as servers do: later text is never generated); the
    reply is cut at the earliest occurrence at that moment.
    """

    def __init__(self, stop_strings: tuple[str, ...] = ()):
        self._stops = tuple(s for s in stop_strings if s)
        self._hold = max((len(s) for s in self._stops), default=1) - 1
        self._raw = ""  # the text as generated, cut at the stop string once found
        self._sent = 0  # characters of the stripped reply released so far
        self.stopped = False

    def push(self, delta: str) -> str:
        if self.stopped:
            return ""
        start = max(len(self._raw) - self._hold, 0)  # earlier starts were searched by earlier pushes
        self._raw += delta
        found = [i for stop in self._stops if (i := self._raw.find(stop, start)) >= 0]
        if found:  # the earliest occurrence of any stop string
            self._raw, self.stopped = self._raw[: min(found)], True
        ready = self._raw if self.stopped else self._raw[: max(len(self._raw) - self._hold, 0)]
        return self._release(ready.strip())

    def finish(self) -> str:
        return self._release(self._raw.strip())

    def _release(self, upto: str) -> str:
        if len(upto) <= self._sent:
            return ""
        delta, self._sent = upto[self._sent :], len(upto)
        return delta

    @property
    def text(self) -> str:
        return self._raw.strip()


class ReplyStream:
    """Token ids in, reply-text deltas out: incremental detokenization + strip + stop strings."""

    def __init__(self, tokenizer: TextTokenizer, stop_strings: tuple[str, ...] = ()):
        self._detok = IncrementalDetokenizer(tokenizer)
        self._text = TextStream(stop_strings)

    def add(self, token_ids) -> str:
        return "".join(self._text.push(self._detok.add(t)) for t in token_ids)

    def finish(self) -> str:
        return self._text.push(self._detok.flush()) + self._text.finish()

    @property
    def stopped(self) -> bool:
        return self._text.stopped

    @property
    def text(self) -> str:
        return self._text.text


class ReplyParts:
    """A served reply's token ids -> (text, reasoning, content) deltas and its token count: the
    ReplyStream's text, split into reasoning and content as it streams (engine/reasoning.py)."""

    def __init__(self, tokenizer: TextTokenizer, stop_strings: tuple[str, ...] = (), opens_reasoning: bool = False):
        self._reply = ReplyStream(tokenizer, stop_strings)
        self._split = ReasoningSplitter(opens_reasoning)
        self.tokens = 0

    def add(self, token_ids, final: bool) -> tuple[str, str, str]:
        self.tokens += len(token_ids)
        text = self._reply.add(token_ids) + (self._reply.finish() if final else "")
        reasoning, content = self._split.push(text)
        if final:
            more_reasoning, more_content = self._split.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        return text, reasoning, content

    @property
    def stopped(self) -> bool:
        return self._reply.stopped

    @property
    def text(self) -> str:
        return self._reply.text

    @property
    def content(self) -> str:
        return self._split.content

    @property
    def reasoning_content(self) -> str | None:
        """None when the reply has no reasoning (no `<think>`, and the prompt did not open one)."""
        return self._split.reasoning if self._split.saw_reasoning else None
