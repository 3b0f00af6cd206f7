"""UMT5-XXL text encoder and its prompt tokenizer: golden parity, full-size layout, cleaning, padding/truncation,
strict loading of the published file layout."""
from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from conftest import load_golden
from worldstream.golden.cli import compare
from worldstream.golden.umt5 import CHECKS
from worldstream.engine.text import TEXT_LEN, PromptTokenizer, TextEncoder, clean_prompt
from worldstream.models.checkpoints import CheckpointError, init_random_
from worldstream.models.umt5 import CHECKPOINT_FILE, UMT5Config, UMT5Encoder

# models_t5_umt5-xxl-enc-bf16.pth: token_embedding 256384 x 4096 = 1,050,148,864; per layer q/k/v/o 4 x 4096^2
# + gate/fc1/fc2 3 x 10240 x 4096 + norm1/norm2 2 x 4096 + position bias 32 x 64 = 192,948,224, x 24 layers;
# final norm 4096. 11.36 GB in bf16, the published file's size. The spec states no count.
UMT5_XXL_PARAMS = 5_680_910_336
UMT5_XXL_KEYS = 1 + 24 * 10 + 1

SENTENCES = ["a cat walks on the grass in the sun", "the dog runs along the beach at dawn",
             "waves crash on the rocks while birds fly over the sea", "a red car drives through a city at night",
             "snow falls slowly on a quiet mountain village"]


def tiny_config() -> UMT5Config:
    return UMT5Config(vocab_size=96, dim=32, dim_attn=32, dim_ffn=48, num_heads=2, num_layers=2)


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    """A Wan2.1-T2V-1.3B-like folder: a tiny encoder saved as the published .pth and a tiny T5-style Unigram
    tokenizer trained here, saved as google/umt5-xxl/ saves it (tokenizer.json + special_tokens_map.json)."""
    root = tmp_path_factory.mktemp("Wan2.1-T2V-1.3B")
    tokenizer = Tokenizer(models.Unigram())
    tokenizer.normalizer = normalizers.Sequence([normalizers.Nmt(), normalizers.NFKC(),
                                                 normalizers.Replace(Regex(" {2,}"), " ")])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.train_from_iterator(SENTENCES * 4, trainers.UnigramTrainer(
        vocab_size=80, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    tokenizer.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                             special_tokens=[("</s>", 1)])
    folder = root / "google" / "umt5-xxl"
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))
    model = UMT5Encoder(tiny_config())
    init_random_(model, seed=5)
    torch.save({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, root / CHECKPOINT_FILE)
    return root


def test_golden_parity():
    tensors, meta = load_golden("umt5_encoder")
    results = CHECKS[meta["kind"]](tensors, meta)
    assert [name for name, _, _ in results] == [
        "intermediate.rel_bucket", "intermediate.block0.out", "intermediate.block1.out",
        "intermediate.encoder_out", "output.prompt_embeds"]
    for name, actual, expected in results:
        _, rel, ok = compare(actual, expected)
        assert ok and rel <= 1e-5, (name, rel)
    prompt_embeds = results[-1][1]
    assert prompt_embeds[0, 19:].abs().max() == 0 and prompt_embeds[1, 200:].abs().max() == 0


def test_full_size_parameter_count_on_meta():
    with torch.device("meta"):
        model = UMT5Encoder()
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(shapes) == UMT5_XXL_KEYS
    assert shapes["token_embedding.weight"] == (256384, 4096)
    assert shapes["blocks.23.pos_embedding.embedding.weight"] == (32, 64)
    assert shapes["blocks.0.ffn.gate.0.weight"] == shapes["blocks.0.ffn.fc1.weight"] == (10240, 4096)
    assert shapes["blocks.0.ffn.fc2.weight"] == (4096, 10240)
    assert shapes["norm.weight"] == (4096,)
    assert sum(p.numel() for p in model.parameters()) == UMT5_XXL_PARAMS


def test_clean_prompt():
    assert clean_prompt("  a  cat\n\t on\u00a0the   mat ") == "a cat on the mat"
    assert clean_prompt("fish &amp;amp; chips &lt;b&gt;") == "fish & chips <b>"  # unescaped twice
    assert clean_prompt("caf\u00c3\u00a9 sc\u00c3\u00a8ne") == "café scène"  # ftfy repairs mojibake


def test_tokenizer_round_trip_and_padding(checkpoint_folder):
    tokenizer = PromptTokenizer.from_folder(checkpoint_folder)
    tokens = tokenizer(["a  cat walks on the grass", "the dog runs"])
    assert tokens.ids.shape == tokens.mask.shape == (2, TEXT_LEN)
    assert tokens.ids.dtype == tokens.mask.dtype == torch.int64
    raw = Tokenizer.from_file(str(checkpoint_folder / "google" / "umt5-xxl" / "tokenizer.json"))
    for row, text in enumerate(["a cat walks on the grass", "the dog runs"]):
        n = tokens.lengths[row]
        assert tokens.mask[row].tolist() == [1] * n + [0] * (TEXT_LEN - n)
        assert tokens.ids[row, n - 1] == 1 and tokens.ids[row, n:].eq(0).all()  # </s>, then <pad>
        assert tokens.ids[row, :n].tolist() == raw.encode(text).ids
        assert raw.decode(tokens.ids[row].tolist()) == text
    assert tokens.truncated == [0, 0]


def test_truncation_to_512_is_reported(checkpoint_folder):
    tokenizer = PromptTokenizer.from_folder(checkpoint_folder)
    long_prompt = " ".join(SENTENCES * 40)
    full = len(Tokenizer.from_file(str(checkpoint_folder / "google" / "umt5-xxl" / "tokenizer.json"))
               .encode(long_prompt).ids)
    assert full > TEXT_LEN
    tokens = tokenizer([long_prompt, "a cat"])
    assert tokens.lengths[0] == TEXT_LEN and tokens.mask[0].all()
    assert tokens.ids[0, -1] == 1  # still ends with </s>, as the reference's truncation keeps it
    assert tokens.truncated == [full - TEXT_LEN, 0]


def test_text_encoder_from_published_layout(checkpoint_folder):
    encoder = TextEncoder.from_folder(checkpoint_folder, cfg=tiny_config())
    assert encoder.dtype == torch.float32  # fp32 on the CPU, from the bf16 file
    out = encoder(["a cat walks on the grass", "the dog runs along the beach at dawn"])
    assert out.context.shape == (2, TEXT_LEN, 32) and out.context.dtype == torch.float32
    for row, n in enumerate(out.lengths):
        assert out.context[row, n:].abs().max() == 0 and out.context[row, :n].abs().min() > 0
    # The trimmed production run equals the reference's full-length run on the valid rows.
    tokens = encoder.tokenizer(["a cat walks on the grass", "the dog runs along the beach at dawn"])
    with torch.no_grad():
        full = encoder.model(tokens.ids, tokens.mask) * tokens.mask[..., None]
    torch.testing.assert_close(out.context, full, rtol=1e-5, atol=1e-5)
    single = encoder(["a cat walks on the grass"])
    torch.testing.assert_close(single.context[0], out.context[0], rtol=1e-5, atol=1e-5)


def test_wrong_key_is_a_clear_error(checkpoint_folder, tmp_path):
    state = torch.load(checkpoint_folder / CHECKPOINT_FILE, weights_only=True)
    (tmp_path / "google").symlink_to(checkpoint_folder / "google")
    state["blocks.0.attn.qkv.weight"] = state.pop("blocks.0.attn.q.weight")
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=r"missing key 'blocks.0.attn.q.weight'"):
        TextEncoder.from_folder(tmp_path, cfg=tiny_config())
    state["blocks.0.attn.q.weight"] = state.pop("blocks.0.attn.qkv.weight")
    state["encoder.extra"] = torch.zeros(1)
    torch.save(state, tmp_path / CHECKPOINT_FILE)
    with pytest.raises(CheckpointError, match=r"unexpected key 'encoder.extra'"):
        TextEncoder.from_folder(tmp_path, cfg=tiny_config())


def test_missing_tokenizer_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"tokenizer file not found: .*google/umt5-xxl/tokenizer.json"):
        PromptTokenizer.from_folder(tmp_path)


def test_bf16_close_to_fp32():
    model = UMT5Encoder(tiny_config()).eval()
    init_random_(model, seed=3)
    ids = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        reference = model.encode(ids, mask)
        low = model.to(torch.bfloat16).encode(ids, mask)
    assert low.dtype == torch.bfloat16
    assert (low.float() - reference).norm() <= 0.03 * reference.norm()
