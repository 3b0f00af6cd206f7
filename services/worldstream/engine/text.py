"""Text conditioning of the T2V models: prompt strings -> UMT5 context [B, 512, dim], as Wan's `WanTextEncoder`.

The tokenizer is the checkpoint folder's `google/umt5-xxl/tokenizer.json`, read from local files with HF
`tokenizers` (never downloaded); the tiny configs (seeded random weights) use `builtin_tokenizer` instead.
Prompts are cleaned as the reference cleans them, then padded or truncated to `TEXT_LEN` tokens, `</s>`
included; how many tokens a truncation dropped is reported per prompt.
"""
from __future__ import annotations

import html
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import ftfy
import torch
from omegaconf import DictConfig
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ..models.checkpoints import CheckpointError, load_strict, read_state_dict
from ..models.umt5 import CHECKPOINT_FILE, UMT5Config, UMT5Encoder
from .builders import building, load_weights, resolve_device, resolve_dtype

TEXT_LEN = 512  # Wan's text_len: every prompt becomes 512 rows, padding rows zero
TOKENIZER_DIR = "google/umt5-xxl"
TOKENIZER_FILE = "tokenizer.json"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (PAD_TOKEN, "</s>", "<unk>")  # ids 0, 1, 2 as in umt5-xxl
WORD_START = "\u2581"  # SentencePiece's word-start marker


def builtin_tokenizer() -> Tokenizer:
    """A tiny T5-style Unigram tokenizer built in code, for the tiny configs (no file, no training: the same
    tokenizer every time): umt5-xxl's special tokens at ids 0-2, the word-start marker, then one piece per
    printable ASCII character (98 pieces; anything else is `<unk>`). Same pre-tokenization and `</s>` suffix as
    the real one, so padding, truncation and masks behave alike."""
    pieces = [*SPECIAL_TOKENS, WORD_START, *(chr(c) for c in range(33, 127))]
    tokenizer = Tokenizer(models.Unigram([(piece, 0.0 if i < 3 else -1.0) for i, piece in enumerate(pieces)],
                                         unk_id=2))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=WORD_START, prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement=WORD_START, prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return tokenizer


def clean_prompt(text: str) -> str:
    """The reference's `clean='whitespace'`: ftfy, HTML unescaped twice, whitespace runs to one space, stripped."""
    text = html.unescape(html.unescape(ftfy.fix_text(text)))
    return re.sub(r"\s+", " ", text).strip()


def check_prompt(prompt: str) -> None:
    """ValueError for a prompt with nothing left after cleaning (the model would see `</s>` alone)."""
    if not clean_prompt(prompt):
        raise ValueError("the prompt is empty (or only whitespace): describe the video to generate")


@dataclass
class TokenizedPrompts:
    ids: torch.Tensor  # [B, text_len] int64: tokens, </s>, then <pad>
    mask: torch.Tensor  # [B, text_len] int64: 1 up to and including </s>
    lengths: list[int]  # tokens kept per prompt, </s> included
    truncated: list[int]  # tokens dropped per prompt by the truncation to text_len (0: none)


class PromptTokenizer:
    """Clean, tokenize, pad and truncate like `HuggingfaceTokenizer(seq_len=512, clean='whitespace')`."""

    def __init__(self, tokenizer: Tokenizer, text_len: int = TEXT_LEN, source: str = "the tokenizer"):
        # Two copies: one pads/truncates as the reference, one counts what a truncation drops.
        self._fixed = Tokenizer.from_str(tokenizer.to_str())
        self._counting = Tokenizer.from_str(tokenizer.to_str())
        self._counting.no_truncation()
        self._counting.no_padding()
        pad_id = self._fixed.token_to_id(PAD_TOKEN)
        if pad_id is None:
            raise CheckpointError(f"{source}: the vocabulary has no {PAD_TOKEN!r} token; is this a T5 tokenizer?")
        self._fixed.enable_truncation(max_length=text_len)
        self._fixed.enable_padding(length=text_len, pad_id=pad_id, pad_token=PAD_TOKEN)
        self.text_len = text_len
        self.vocab_size = self._fixed.get_vocab_size()

    @classmethod
    def from_file(cls, tokenizer_file: str | Path, text_len: int = TEXT_LEN) -> "PromptTokenizer":
        path = Path(tokenizer_file)
        if not path.is_file():
            raise CheckpointError(f"tokenizer file not found: {path} (the checkpoint folder's "
                                  f"{TOKENIZER_DIR}/{TOKENIZER_FILE}, as published)")
        return cls(Tokenizer.from_file(str(path)), text_len, str(path))

    @classmethod
    def from_folder(cls, checkpoint_folder: str | Path, text_len: int = TEXT_LEN) -> "PromptTokenizer":
        return cls.from_file(Path(checkpoint_folder) / TOKENIZER_DIR / TOKENIZER_FILE, text_len)

    def __call__(self, prompts: Sequence[str]) -> TokenizedPrompts:
        texts = [clean_prompt(p) for p in prompts]
        encodings = self._fixed.encode_batch(texts)
        lengths = [sum(e.attention_mask) for e in encodings]
        truncated = [0] * len(texts)
        for i, length in enumerate(lengths):
            if length == self.text_len:  # possibly cut: count the full tokenization
                truncated[i] = len(self._counting.encode(texts[i]).ids) - length
        return TokenizedPrompts(ids=torch.tensor([e.ids for e in encodings], dtype=torch.int64),
                                mask=torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64),
                                lengths=lengths, truncated=truncated)


@dataclass
class EncodedPrompts:
    context: torch.Tensor  # [B, text_len, dim]; rows past each prompt's length are zero
    lengths: list[int]
    truncated: list[int]


class TextEncoder:
    """Prompt strings -> `EncodedPrompts` (the DiT's text context), on the model's device and dtype."""

    def __init__(self, model: UMT5Encoder, tokenizer: PromptTokenizer):
        if tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"tokenizer vocabulary ({tokenizer.vocab_size}) exceeds the encoder's embedding table "
                             f"({model.cfg.vocab_size})")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = model.token_embedding.weight.device
        self.dtype = model.token_embedding.weight.dtype

    @classmethod
    def from_folder(cls, checkpoint_folder: str | Path, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, cfg: UMT5Config | None = None) -> "TextEncoder":
        """The published layout: `models_t5_umt5-xxl-enc-bf16.pth` + `google/umt5-xxl/` in one folder (Wan's
        `Wan2.1-T2V-1.3B/`). bf16 on a GPU, fp32 on the CPU unless `dtype` says otherwise."""
        folder, device = Path(checkpoint_folder), torch.device(device)
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        tokenizer = PromptTokenizer.from_folder(folder)
        with building(device, dtype):
            model = UMT5Encoder(cfg)
        path = folder / CHECKPOINT_FILE
        load_strict(model, read_state_dict(path), str(path))
        return cls(model, tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: Sequence[str]) -> EncodedPrompts:
        if not prompts:
            raise ValueError("no prompt given")
        for prompt in prompts:
            check_prompt(prompt)
        tokens = self.tokenizer(prompts)
        context = self.model.encode(tokens.ids.to(self.device), tokens.mask.to(self.device))
        return EncodedPrompts(context=context, lengths=tokens.lengths, truncated=tokens.truncated)


def build_text_encoder(cfg: DictConfig) -> TextEncoder:
    """The text encoder of a T2V config: `models_t5_umt5-xxl-enc-bf16.pth` and `google/umt5-xxl/` from the
    checkpoint folder `checkpoints.base`, or seeded random weights and `builtin_tokenizer` (`init_seed`)."""
    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    with building(device, dtype):
        model = UMT5Encoder(UMT5Config(**cfg.text_encoder))
    folder = Path(cfg.checkpoints.base)
    model = load_weights(model, cfg, str(folder / CHECKPOINT_FILE), seed_offset=5)
    text_len = int(cfg.dit.text_len)
    tokenizer = (PromptTokenizer(builtin_tokenizer(), text_len) if cfg.init_seed is not None
                 else PromptTokenizer.from_folder(folder, text_len))
    return TextEncoder(model, tokenizer)
