"""InternLM2 checkpoints as InternVL2.5-2B/8B/26B ship them: a sentencepiece `tokenizer.model` (BPE, byte
fallback, the chat tokens as user-defined pieces) and InternVL's `<img>` / `</img>` / `<IMG_CONTEXT>` in
`tokenizer_config.json`'s added_tokens_decoder beyond the pieces — no tokenizer.json.

Reference: InternLM2Tokenizer (tokenization_internlm2.py, the slow tokenizer model.chat uses) written
out with the sentencepiece library: the text is split at the added tokens, every other piece encoded
by `sp_model.encode`, BOS first (add_bos_token). Decoding follows InternLM2's fast tokenizer, checked
against `sp_model.decode`.
"""

from __future__ import annotations

import io
import json
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from build.checkpoint import CORPUS, generate
from engine.config import ConfigError, ModelConfig
from engine.pipeline import Pipeline
from engine.tokenizer import TextTokenizer
from tests import reference_chat, reference_custom_chat, reference_preprocess
from tests.test_internlm2 import IMAGES, MAX_NEW, STOP, SYSTEM, TEMPLATE

CHAT_PIECES = ["<|im_start|>", "<|im_end|>", "<|action_start|>", "<|action_end|>"]  # user-defined, as InternLM2's
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>"]  # added by InternVL after the pieces
TEXTS = [
    "Hello, who are you?",
    "  two leading spaces and  double  spaces ",
    "line one\nline two\n\n\tindented",
    "你是书生·万象，英文名是InternVL。",
    "emoji 🙂 and rare ǅ letters",
    "<|im_start|>system\nBe brief.<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is it?<|im_end|><|im_start|>assistant\n",
    "text<|im_end|>glued<img>  spaced </img>",
]


@pytest.fixture(scope="module")
def sp_checkpoint(tmp_path_factory):
    """The tiny InternLM2 checkpoint with its tokenizer replaced by a trained sentencepiece model."""
    src = generate("tiny", "internlm2", tmp_path_factory.mktemp("internlm2") / "ckpt", fmt="custom", ps_version="v2")
    dst = tmp_path_factory.mktemp("internlm2-sp") / "ckpt"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("onnx", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"))
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.read_text(encoding="utf-8").splitlines()),
        model_writer=model,
        model_type="bpe",
        vocab_size=900,
        byte_fallback=True,
        user_defined_symbols=CHAT_PIECES,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    (dst / "tokenizer.model").write_bytes(model.getvalue())
    sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
    added = {str(sp.piece_to_id(t)): {"content": t, "special": True} for t in CHAT_PIECES}
    added.update({str(sp.get_piece_size() + i): {"content": t, "special": True} for i, t in enumerate(INTERNVL_TOKENS)})
    config = {"tokenizer_class": "InternLM2Tokenizer", "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added}
    (dst / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return src, dst, sp


def slow_encode(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
    """InternLM2Tokenizer(text).input_ids: split at the added tokens, sentencepiece for the rest, BOS."""
    added = {t: sp.piece_to_id(t) for t in CHAT_PIECES} | {t: sp.get_piece_size() + i for i, t in enumerate(INTERNVL_TOKENS)}
    ids = [sp.bos_id()]
    for part in re.split("(" + "|".join(map(re.escape, added)) + ")", text):
        if part in added:
            ids.append(added[part])
        elif part:
            ids.extend(sp.encode(part))
    return ids


def test_encoding_equals_the_slow_sentencepiece_tokenizer(sp_checkpoint):
    _, path, sp = sp_checkpoint
    tok = TextTokenizer(path)
    for text in TEXTS:
        assert tok.prefix_ids + tok.encode(text) + tok.suffix_ids == slow_encode(sp, text), text
    assert any(sp.id_to_piece(i).startswith("<0x") for i in slow_encode(sp, TEXTS[4]))  # byte fallback was exercised


def test_decoding_equals_sentencepiece(sp_checkpoint):
    _, path, sp = sp_checkpoint
    tok = TextTokenizer(path)
    rng = np.random.default_rng(0)
    for text in TEXTS[:5]:
        ids = sp.encode(text)
        assert tok.decode(ids) == sp.decode(ids) == text
        # a reply starts at any piece (not inside a character's fallback bytes: the incremental
        # detokenizer never releases half a character)
        starts = [i for i in range(1, len(ids)) if not sp.id_to_piece(ids[i]).startswith("<0x")]
        cut = ids[starts[int(rng.integers(len(starts)))] :]
        assert tok.decode(cut) == sp.decode(cut)


def test_a_sentencepiece_only_checkpoint_answers_as_the_reference(sp_checkpoint):
    """ModelConfig reads the special ids from the converted tokenizer; the prompt and the greedy
    tokens equal the custom model.chat() port fed the slow tokenizer's ids (same weights)."""
    src, path, sp = sp_checkpoint
    assert not (path / "tokenizer.json").exists()
    config = ModelConfig.from_pretrained(path)
    assert config.image_token_id == sp.get_piece_size() + 2 and config.stop_token_id == sp.piece_to_id(STOP)
    tiles = [reference_preprocess.load_image(io.BytesIO(IMAGES["a"]), input_size=448, max_num=6).numpy()]
    query, _ = reference_chat.chat_query(TEMPLATE, SYSTEM, "Describe the image in detail.", [len(t) for t in tiles])
    import torch

    port = reference_custom_chat.model(src)
    port.image_context_id = config.image_token_id
    expected, _ = port.generate_from_ids(torch.tensor([slow_encode(sp, query)]), np.concatenate(tiles), config.stop_token_id, MAX_NEW)
    with Pipeline.from_pretrained(path, vision_backend="torch") as pipe:
        prompt = pipe.prepare("Describe the image in detail.", [IMAGES["a"]], max_tiles=6).prompt
        real = np.where(prompt.input_ids >= config.text.vocab_size, config.image_token_id, prompt.input_ids)
        assert real.tolist() == slow_encode(sp, query)
        assert pipe.generate("Describe the image in detail.", [IMAGES["a"]], max_new_tokens=MAX_NEW, max_tiles=6).token_ids == expected


def test_sentencepiece_normalization_rules_are_refused(sp_checkpoint, tmp_path):
    _, path, _ = sp_checkpoint
    from transformers.convert_slow_tokenizer import import_protobuf

    proto = import_protobuf().ModelProto()
    proto.ParseFromString((path / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    for name in ("tokenizer_config.json", "config.json"):
        shutil.copy(path / name, tmp_path / name)
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    with pytest.raises(ConfigError, match="remove_extra_whitespaces"):
        ModelConfig.from_pretrained(tmp_path)
