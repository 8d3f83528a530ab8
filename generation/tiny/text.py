"""Offline tokenizers and tiny text encoders (CLIP-L, OpenCLIP-bigG, T5-XXL stand-ins)."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import torch

CLIP_MAX_LENGTH = 77


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte → printable character table (the vocabulary of byte-level BPE)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_clip_tokenizer(directory: Path) -> None:
    """A byte-level CLIP BPE tokenizer with no merges (every byte is a token): real class, tiny vocab."""
    from transformers import CLIPTokenizer

    characters = list(_bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(characters)}
    vocab.update({c + "</w>": len(characters) + i for i, c in enumerate(characters)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as scratch:
        vocab_file, merges_file = Path(scratch) / "vocab.json", Path(scratch) / "merges.txt"
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(str(vocab_file), str(merges_file), model_max_length=CLIP_MAX_LENGTH)
        tokenizer.save_pretrained(directory)


def clip_vocab_size() -> int:
    return 2 * 256 + 2


def write_t5_tokenizer(directory: Path, max_length: int = 512) -> None:
    """A unigram T5 tokenizer over letters, digits and punctuation."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -1.0)]
    pieces += [(c, -2.0) for c in string.ascii_letters + string.digits + string.punctuation]
    pieces += [("▁" + c, -1.5) for c in string.ascii_lowercase]
    tokenizer = Tokenizer(models.Unigram(pieces, unk_id=2))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    wrapped = T5TokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
    wrapped.save_pretrained(directory)


def t5_vocab_size() -> int:
    return 4 + len(string.ascii_letters + string.digits + string.punctuation) + len(string.ascii_lowercase)


def write_clip_text_model(directory: Path, *, hidden_size: int, projection_dim: int | None = None, seed: int) -> None:
    """CLIPTextModel (or ...WithProjection when `projection_dim` is given), random weights."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=clip_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=CLIP_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=clip_vocab_size() - 2,
        eos_token_id=clip_vocab_size() - 1,
        pad_token_id=clip_vocab_size() - 1,
    )
    model_class = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    model_class(config).save_pretrained(directory)


def write_t5_encoder(directory: Path, *, d_model: int, seed: int) -> None:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=t5_vocab_size(),
        d_model=d_model,
        d_kv=8,
        d_ff=d_model * 2,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=0,
        eos_token_id=1,
    )
    T5EncoderModel(config).save_pretrained(directory)
