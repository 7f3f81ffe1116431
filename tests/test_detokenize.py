"""engine.detokenize against full decodes with the tiny checkpoint's tokenizer, and TextStream
against a few-line reference of "left-strip, cut at the earliest stop string, strip"."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer

from engine.detokenize import IncrementalDetokenizer, TextStream
from engine.tokenizer import TextTokenizer

# ---------------------------------------------------------------- IncrementalDetokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte ↔ printable-character table used by byte-level BPE (independent copy)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@pytest.fixture(scope="module")
def tok(tiny) -> TextTokenizer:
    return TextTokenizer(tiny)


@pytest.fixture(scope="module")
def raw_tok(tiny) -> Tokenizer:
    return Tokenizer.from_file(str(tiny / "tokenizer.json"))


@pytest.fixture(scope="module")
def byte_ids(tok, raw_tok) -> list[int]:
    """byte_ids[b]: the id of the single-byte token for byte b."""
    table = _bytes_to_unicode()
    vocab = raw_tok.get_vocab()
    ids = [vocab[table[b]] for b in range(256)]
    assert tok.decode([ids[ord("A")]]) == "A"
    return ids


@pytest.fixture(scope="module")
def special_ids(tok, raw_tok) -> list[int]:
    ids = sorted(i for i, t in raw_tok.get_added_tokens_decoder().items() if t.special)
    assert len(ids) >= 4 and all(tok.decode([i]) == "" for i in ids)
    return ids


@pytest.fixture(scope="module")
def added_visible_ids(raw_tok) -> list[int]:
    return [raw_tok.token_to_id(t) for t in ("<think>", "</think>")]


@pytest.fixture(scope="module")
def vocab_size(raw_tok) -> int:
    return raw_tok.get_vocab_size()


CJK = "你好世界中文字符测试图片描述一个红色的小船在安静湖面上日出时分"
EMOJI = "😀🚲🌅🍊"
WORDS = "The picture shows a small red boat resting on quiet lake at sunrise . , ! ? \n  café naïve Ünïcödé".split(" ")


def _random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(1, 12)):
        kind = rng.random()
        if kind < 0.4:
            parts.append(rng.choice(WORDS) + rng.choice(["", " ", "  ", "\n"]))
        elif kind < 0.8:
            parts.append("".join(rng.choice(CJK) for _ in range(rng.randint(1, 5))))
        else:
            parts.append(rng.choice(EMOJI))
    return "".join(parts)


def _case(rng: random.Random, kind: str, tok: TextTokenizer, vocab_size, byte_ids, special_ids, added_ids) -> list[int]:
    if kind == "plain":
        return tok.encode(" ".join(rng.choice(WORDS[:15]) for _ in range(rng.randint(1, 20))))
    if kind == "text":  # mixed Latin / Chinese / emoji, as the tokenizer encodes it
        return tok.encode(_random_text(rng))
    if kind == "cut_shuffled":  # multi-byte text encoded, then cut and shuffled: broken characters
        ids = tok.encode(_random_text(rng) + _random_text(rng))
        if len(ids) > 2:
            a, b = sorted(rng.sample(range(len(ids) + 1), 2))
            ids = ids[a:b] or ids
        if rng.random() < 0.6:
            rng.shuffle(ids)
        return ids
    if kind == "bytes":  # one token per UTF-8 byte: characters split across tokens
        data = bytearray(_random_text(rng).encode())
        if rng.random() < 0.5 and len(data) > 1:  # drop / duplicate bytes: invalid sequences
            for _ in range(rng.randint(1, 3)):
                i = rng.randrange(len(data))
                if rng.random() < 0.5:
                    del data[i]
                else:
                    data.insert(i, data[i])
                if not data:
                    break
        return [byte_ids[b] for b in data] or [byte_ids[0x41]]
    if kind == "random":  # any id of the tokenizer, specials and added tokens included
        return [rng.randrange(vocab_size) for _ in range(rng.randint(1, 30))]
    if kind == "mixed":  # byte tokens, merged tokens, specials and <think> interleaved
        ids = []
        for _ in range(rng.randint(2, 8)):
            r = rng.random()
            if r < 0.3:
                ids += [byte_ids[b] for b in rng.choice(CJK + EMOJI).encode()][: rng.randint(1, 4)]
            elif r < 0.6:
                ids += tok.encode(_random_text(rng))
            elif r < 0.85:
                ids.append(rng.choice(special_ids))
            else:
                ids.append(rng.choice(added_ids))
        return ids
    raise AssertionError(kind)


KINDS = ("plain", "text", "cut_shuffled", "bytes", "random", "mixed")


@pytest.mark.parametrize("kind", KINDS)
def test_incremental_deltas_join_to_full_decode_and_stay_prefixes(
    kind, tok, vocab_size, byte_ids, special_ids, added_visible_ids
):
    rng = random.Random(f"detok-{kind}")
    saw_fffd = 0
    for _ in range(60):
        ids = _case(rng, kind, tok, vocab_size, byte_ids, special_ids, added_visible_ids)
        full = tok.decode(ids)
        saw_fffd += "\ufffd" in full
        detok = IncrementalDetokenizer(tok)
        joined = ""
        for i, token in enumerate(ids):
            joined += detok.add(token)
            so_far = tok.decode(ids[: i + 1])
            assert full.startswith(joined), (ids, i, joined, full)
            assert so_far.startswith(joined), (ids, i, joined, so_far)
            if not so_far.endswith("\ufffd"):  # nothing pending: everything decodable is out
                assert joined == so_far, (ids, i, joined, so_far)
        joined += detok.flush()
        assert joined == full, ids
        assert detok.flush() == ""
    if kind in ("cut_shuffled", "bytes", "random"):
        assert saw_fffd  # the cases really exercised broken characters


def test_character_split_over_byte_tokens_is_released_once_complete(tok, byte_ids):
    detok = IncrementalDetokenizer(tok)
    data = "a世😀".encode()
    deltas = [detok.add(byte_ids[b]) for b in data]
    # 'a' at once; 世 (3 bytes) after its last byte; 😀 (4 bytes) after its last byte.
    assert deltas == ["a", "", "", "世", "", "", "", "😀"]
    assert detok.flush() == ""


def test_incomplete_final_character_is_flushed_as_replacement_char(tok, byte_ids):
    detok = IncrementalDetokenizer(tok)
    ids = [byte_ids[b] for b in "ok中".encode()[:-1]]
    text = "".join(detok.add(i) for i in ids)
    assert text == "ok"
    assert text + detok.flush() == tok.decode(ids) == "ok\ufffd"


def test_special_tokens_produce_no_text_and_do_not_split_characters(tok, byte_ids, special_ids):
    detok = IncrementalDetokenizer(tok)
    b = "中".encode()
    ids = [byte_ids[b[0]], special_ids[0], byte_ids[b[1]], special_ids[1], byte_ids[b[2]]]
    deltas = [detok.add(i) for i in ids]
    assert "".join(deltas) + detok.flush() == tok.decode(ids) == "中"
    assert deltas[-1] == "中"


# ---------------------------------------------------------------- TextStream


def ref_stream(deltas: list[str], stops: tuple[str, ...]) -> tuple[str, bool]:
    """Streaming stop semantics, as a server applies them: generation ends at the first delta after
    which the text as generated contains a stop string (later text is never generated); the reply
    is cut at the earliest occurrence in the text at that moment, then stripped."""
    t = ""
    for delta in deltas:
        t += delta
        cuts = [t.find(s) for s in stops if s and s in t]
        if cuts:
            return t[: min(cuts)].strip(), True
    return t.strip(), False


def _split(rng: random.Random, text: str) -> list[str]:
    pieces, i = [], 0
    while i < len(text):
        n = rng.choice([0, 1, 1, 1, 2, 3, 5, 8])
        pieces.append(text[i : i + n])
        i += n
    if rng.random() < 0.3:
        pieces.insert(rng.randrange(len(pieces) + 1), "")
    return pieces


def _run_stream(stops, deltas) -> tuple[str, TextStream]:
    stream = TextStream(stops)
    out = "".join(stream.push(d) for d in deltas) + stream.finish()
    return out, stream


# Stop sets whose strings share no character, so two occurrences can never overlap.
DISJOINT_STOPS = [(), ("<END>",), ("XY", "###"), ("\n\n", "Q"), ("<|stop|>", "ZZ", "@")]
FILLER = "ab cd\tef  gh\n ij 中文 😀 "


def _random_stream_text(rng: random.Random, stops: tuple[str, ...], min_stop_pos: int) -> str:
    body = "".join(rng.choice(FILLER) for _ in range(rng.randint(0, 30)))
    if stops and rng.random() < 0.7:
        for _ in range(rng.randint(1, 3)):
            at = rng.randint(0, len(body))
            body = body[:at] + rng.choice(stops) + body[at:]
    lead = rng.choice(["", " ", "  \n", "\t "])
    trail = rng.choice(["", " ", "\n\n", " \t"])
    # Keep the first stop occurrence at least `min_stop_pos` characters into the left-stripped text.
    text = (body + trail).lstrip()
    cuts = [text.find(s) for s in stops if s in text]
    if cuts and min(cuts) < min_stop_pos:
        text = "w" * min_stop_pos + " " + text
    return lead + text


def _check_stream(rng, stops, text):
    deltas = _split(rng, text)
    expected, stopped = ref_stream(deltas, stops)
    out, stream = _run_stream(stops, deltas)
    assert out == expected, (stops, deltas)
    assert stream.text == expected, (stops, deltas)
    assert stream.stopped == stopped, (stops, deltas)
    return stopped


@pytest.mark.parametrize("stops", DISJOINT_STOPS, ids=repr)
def test_stream_equals_reference_for_random_texts_and_splits(stops):
    rng = random.Random(f"stream-{stops}")
    hold = max((len(s) for s in stops), default=0)
    n_stopped = 0
    for _ in range(300):
        n_stopped += _check_stream(rng, stops, _random_stream_text(rng, stops, min_stop_pos=hold))
    if stops:
        assert 50 < n_stopped < 300  # both outcomes exercised


def test_stream_equals_reference_for_any_stops_and_positions():
    # Texts and stops over a tiny alphabet: stops at the very start, overlapping, nested, repeated.
    rng = random.Random("stream-any")
    for _ in range(400):
        stops = tuple("".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3)))
        body = "".join(rng.choice("aab b") for _ in range(rng.randint(0, 25)))
        _check_stream(rng, stops, rng.choice(["", " ", "\n "]) + body + rng.choice(["", " ", "\n"]))


def test_stop_string_at_start_split_over_deltas_is_not_released():
    out, stream = _run_stream(("abcde",), ["abc", "de tail"])
    assert stream.stopped and stream.text == ""
    assert out == ""


def test_overlapping_stop_strings_cut_at_earliest_occurrence_whatever_the_split():
    stops = ("cd", "bc")
    whole, _ = _run_stream(stops, ["abcd"])
    by_char, _ = _run_stream(stops, list("abcd"))
    assert by_char == "a"  # "bc" completes first
    assert whole == "a"  # "bc" starts first


def test_stream_stops_at_the_first_delta_that_completes_a_stop_string():
    stops = ("bcd", "c")
    whole, _ = _run_stream(stops, ["abcd"])  # both complete in one delta: the earliest occurrence wins
    split, stream = _run_stream(stops, ["abc", "d"])  # "c" completes first: "d" is never generated
    assert whole == "a"
    assert split == stream.text == "ab"


def test_stop_string_starting_with_whitespace_does_not_leak_into_the_reply():
    for deltas in (["\nUser: hi"], ["\n", "User:", " hi"], list("\nUser: hi")):
        out, stream = _run_stream(("\nUser:",), deltas)
        assert stream.stopped and out == stream.text == "", deltas
    out, stream = _run_stream(("\nUser:",), ["Sure.", "\n", "User: more"])
    assert out == stream.text == "Sure."


def test_stream_strips_leading_and_holds_trailing_whitespace():
    stream = TextStream()
    assert stream.push("  \n ") == ""
    assert stream.push(" Hello") == "Hello"
    assert stream.push(" ") == ""
    assert stream.push(" \n") == ""
    assert stream.push("world") == "  \nworld"
    assert stream.push("  ") == ""
    assert stream.finish() == ""
    assert stream.text == "Hello  \nworld"


def test_stream_stop_spanning_deltas_is_cut_and_later_pushes_return_nothing():
    stream = TextStream(("<END>",))
    out = [stream.push(d) for d in ["Answer: 42 <E", "N", "D> and more"]]
    assert stream.stopped
    assert "".join(out) == "Answer: 42"
    assert stream.push("again <END> x") == ""
    assert stream.push("") == ""
    assert stream.finish() == ""
    assert stream.text == "Answer: 42"


def test_pushes_after_stop_return_nothing_for_random_streams():
    rng = random.Random("after-stop")
    for _ in range(100):
        stops = rng.choice(DISJOINT_STOPS[1:])
        text = _random_stream_text(rng, stops, min_stop_pos=max(map(len, stops)))
        expected, stopped = ref_stream(text, stops)
        if not stopped:
            continue
        stream = TextStream(stops)
        out = ""
        for d in _split(rng, text):
            out += stream.push(d)
        assert stream.stopped
        assert [stream.push(x) for x in ("more", " text ", stops[0], "")] == ["", "", "", ""]
        assert out + stream.finish() == expected
