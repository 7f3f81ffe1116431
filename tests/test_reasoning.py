"""The thinking-mode split (engine/reasoning.py): reasoning inside <think>…</think>, content after it,
also when the prompt already opened the tag; streaming deltas in any chunking join to the same split
and never carry part of a tag."""

from __future__ import annotations

import numpy as np
import pytest

from engine.reasoning import R1_SYSTEM_PROMPT, THINK_END, THINK_START, ReasoningSplitter

CASES = [  # (reply, prompt opened the tag, reasoning, content)
    ("<think>\nLook at the colours.\nThe sky is blue.\n</think>\n\nBlue.", False, "Look at the colours.\nThe sky is blue.", "Blue."),
    ("Just an answer.", False, "", "Just an answer."),
    ("  \n<think>a</think>", False, "a", ""),
    ("The tag was in the prompt.\n</think>\nAnswer here.", True, "The tag was in the prompt.", "Answer here."),
    ("<thinking about it> is content", False, "", "<thinking about it> is content"),
    ("<think>cut off mid-reasoning </thi", False, "cut off mid-reasoning </thi", ""),
    ("<think>x < y and y </ z</think> so x < z", False, "x < y and y </ z", "so x < z"),
    ("", True, "", ""),
]


def _run(reply: str, in_reasoning: bool, cuts) -> tuple[ReasoningSplitter, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(in_reasoning)
    pieces = np.split(np.array(list(reply), dtype=object), sorted(cuts)) if reply else []
    deltas = [splitter.push("".join(p)) for p in pieces]
    deltas.append(splitter.finish())
    return splitter, deltas


@pytest.mark.parametrize("reply, in_reasoning, reasoning, content", CASES)
def test_split_is_the_same_for_every_chunking_and_never_leaks_a_tag(reply, in_reasoning, reasoning, content):
    rng = np.random.default_rng(len(reply))
    chunkings = [[], list(range(1, len(reply)))] + [rng.choice(max(len(reply), 1), size=min(4, len(reply)), replace=False) for _ in range(20)]
    for cuts in chunkings:
        splitter, deltas = _run(reply, in_reasoning, [c for c in cuts if 0 < c < len(reply)])
        assert "".join(r for r, _ in deltas) == splitter.reasoning == reasoning
        assert "".join(c for _, c in deltas) == splitter.content == content
        for r, c in deltas[:-1]:  # while streaming (the final flush may hold an unfinished tag as text)
            assert THINK_START not in c and THINK_END not in c and THINK_END not in r
    assert splitter.saw_reasoning == (in_reasoning or reply.lstrip().startswith(THINK_START))


def test_the_thinking_prompt_is_the_cards():
    assert R1_SYSTEM_PROMPT.startswith("You are an AI assistant that rigorously follows this response protocol:")
    assert "Enclose this entire thinking process within <think> and </think> tags." in R1_SYSTEM_PROMPT
    assert R1_SYSTEM_PROMPT.endswith("The final answer should be standalone and not reference the thinking section.")


def test_pipeline_thinking_mode_is_the_cards_system_prompt_and_the_reply_is_split(tiny):
    from engine.pipeline import Pipeline

    with Pipeline.from_pretrained(tiny, vision_backend="torch") as pipe:
        thinking = pipe.generate("What color is the sky?", enable_thinking=True, max_new_tokens=10)
        explicit = pipe.generate("What color is the sky?", system_message=R1_SYSTEM_PROMPT, max_new_tokens=10)
        plain = pipe.generate("What color is the sky?", max_new_tokens=10)
    assert thinking.token_ids == explicit.token_ids != plain.token_ids  # the prompt is the card's, and it matters
    splitter = ReasoningSplitter()
    splitter.push(thinking.text)
    splitter.finish()
    assert (thinking.content, thinking.reasoning_content) == (splitter.content, splitter.reasoning if splitter.saw_reasoning else None)


def test_a_template_that_opens_the_think_tag_puts_the_whole_reply_in_reasoning_until_it_closes(tiny, tmp_path):
    """Skywork-R1V3 style: the generation prompt ends in <think>\\n, so the reply has no opening tag."""
    from engine.pipeline import Pipeline
    from tests.thinking_checkpoint import copy_with_think_opening_template

    copy_with_think_opening_template(tiny, tmp_path)
    with Pipeline.from_pretrained(tmp_path, vision_backend="torch") as pipe:
        assert pipe.prepare("Hi").prompt.opens_reasoning
        result = pipe.generate("Hi", max_new_tokens=6)
    assert THINK_END not in result.text  # the tiny model never closes it
    assert result.reasoning_content == result.text and result.content == ""
