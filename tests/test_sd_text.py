"""Tests of CLIP's text encoder (ddpm_jax.models.clip_text, ddpm_jax.weights.clip_weights) and
tokenizer (ddpm_jax.weights.clip_tokenizer).

Known answers from transformers (skipped without torch / transformers): random ``CLIPTextModel``s
(``quick_gelu`` and ``gelu``, weights saved with and without the ``text_model.`` prefix) give the
same ``last_hidden_state`` (relative L2 ≤ 1e-5), and our tokenizer gives ``CLIPTokenizer``'s ids
on 240 strings (upper case, punctuation, digits, accents, CJK, emoji, repeated whitespace, the
pad token "!" of SD 2.x, prompts longer than 77 tokens) for a byte-level BPE vocabulary learned
here, from ``vocab.json`` + ``merges.txt`` and from the ``tokenizer.json`` transformers writes.
"""

import collections
import json
import random

import numpy as np
import pytest

from ddpm_jax.errors import UsageError
from ddpm_jax.weights.clip_tokenizer import load_clip_tokenizer
from ddpm_jax.weights.clip_weights import load_clip_text_encoder

CORPUS = (
    "a photo of an astronaut riding a horse on mars, highly detailed digital painting by greg "
    "rutkowski. the quick brown fox jumps over the lazy dog! a cat's portrait, 4k, trending on "
    "artstation; café crème brûlée naïve façade zürich müller straße 東京 タワー 🐱 ünïcödé "
    "they're we've i'm you'll he'd it's can't 1234567890 (masterpiece) [best quality] {art}"
)
WORDS = CORPUS.split() + [
    "SUNSET",
    "Über",
    "ÉCOLE",
    "x",
    "hello",
    "world",
    "!!!",
    "'s",
    "<|endoftext|>",
]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte → printable character map."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def _write_vocab(folder, pad_token, num_merges=250):
    """A CLIP-style vocabulary learned on CORPUS: 256 bytes, 256 word ends, merges, specials."""
    b2u = _bytes_to_unicode()
    chars = list(b2u.values())
    vocab = chars + [c + "</w>" for c in chars]
    words = collections.Counter()
    for word in CORPUS.lower().split():
        pieces = [b2u[b] for b in word.encode()]
        words[(*pieces[:-1], pieces[-1] + "</w>")] += 1
    merges = []
    for _ in range(num_merges):
        pairs = collections.Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:], strict=False):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab.append(best[0] + best[1])
        merged = collections.Counter()
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if w[i : i + 2] == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] += n
        words = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    lines = ["#version: 0.2", *(f"{a} {b}" for a, b in merges)]
    (folder / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"}
    special |= {"unk_token": "<|endoftext|>", "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    config = {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer", "do_lower_case": True}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **special}))


def _strings() -> list[str]:
    rng = random.Random(0)
    seps = [" ", "  ", "\t", "\n ", "   ", ", ", "!", "...", "-", "'", ""]
    out = ["", " ", "A", "!", "!!", "a!b", "Hello  World!!", "héllo wörld 123", "ÀÉÎÕÜ", "ß"]
    out += ["<|endoftext|> x", "a\u00a0b", "e\u0301cole", "ｆｕｌｌ width", "tab\there"]
    while len(out) < 230:
        n = rng.choice([1, 3, 8, 20, 60])  # 60 words: far more than 77 tokens
        words = [rng.choice(WORDS) for _ in range(n)]
        words = [w.upper() if rng.random() < 0.15 else w for w in words]
        words = [str(rng.randrange(10**6)) if rng.random() < 0.08 else w for w in words]
        out.append("".join(w + rng.choice(seps) for w in words).strip(rng.choice(["", " "])))
    out += ["word " * 100, "!" * 90, "9" * 80, "🐱" * 40]
    return out


@pytest.mark.parametrize("pad_token", ["<|endoftext|>", "!"], ids=["sd1_pad", "sd2_pad"])
def test_tokenizer_matches_transformers(tmp_path, pad_token):
    transformers = pytest.importorskip("transformers")
    _write_vocab(tmp_path / "vocab_merges", pad_token)
    ref = transformers.CLIPTokenizer.from_pretrained(tmp_path / "vocab_merges")
    ref.save_pretrained(tmp_path / "tokenizer_json")
    assert not (tmp_path / "tokenizer_json" / "vocab.json").exists()
    strings = _strings()
    assert len(strings) >= 200
    expected = ref(strings, padding="max_length", max_length=77, truncation=True).input_ids
    expected = np.asarray(expected, np.int32)
    assert (expected[:, -2] != ref.pad_token_id).sum() > 5  # some prompts were truncated
    for layout in ("vocab_merges", "tokenizer_json"):
        ours = load_clip_tokenizer(tmp_path / layout)
        assert ours.pad_id == ref.pad_token_id and ours.max_length == 77
        got = ours.encode(strings)
        bad = [s for s, a, b in zip(strings, got, expected, strict=True) if (a != b).any()]
        assert not bad, (layout, bad[:3])


def test_tokenizer_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="tokenizer.json not found"):
        load_clip_tokenizer(tmp_path)
    _write_vocab(tmp_path, "!", num_merges=5)
    assert load_clip_tokenizer(tmp_path).pad_id == 0  # "!" is the first byte of the vocabulary
    merges = tmp_path / "merges.txt"
    merges.write_text(merges.read_text() + "a b c\n")
    with pytest.raises(UsageError, match="merges.txt: line 7 is not a pair"):
        load_clip_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UsageError, match="tokenizer_config.json is damaged"):
        load_clip_tokenizer(tmp_path)


def _clip_text_model(hidden_act, seed, vocab_size=300):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    model = transformers.CLIPTextModel(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@pytest.mark.parametrize(
    "hidden_act, prefix",
    [("quick_gelu", True), ("gelu", False)],
    ids=["quick_gelu_text_model_prefix", "gelu_no_prefix"],
)
def test_text_encoder_matches_transformers(tmp_path, hidden_act, prefix):
    torch = pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    ref = _clip_text_model(hidden_act, seed=1)
    ref.save_pretrained(tmp_path / "text_encoder")
    weights = tmp_path / "text_encoder" / "model.safetensors"
    state_dict = load_file(weights)
    assert not any(k.startswith("text_model.") for k in state_dict)  # transformers >= 5.6
    if prefix:  # the published SD folders (transformers 4), with the old position_ids buffer
        state_dict = {f"text_model.{k}": v for k, v in state_dict.items()}
        state_dict["text_model.embeddings.position_ids"] = np.arange(77)[None]
        save_file(state_dict, weights)
    module, variables = load_clip_text_encoder(tmp_path)
    assert module.hidden_act == hidden_act and module.num_layers == 3

    tokens = np.random.default_rng(0).integers(0, 300, (2, 77)).astype(np.int32)
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens.astype(np.int64))).last_hidden_state.numpy()
    ours = np.asarray(module.apply(variables, tokens))
    rel = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    assert rel <= 1e-5, rel


def test_text_encoder_errors(tmp_path):
    folder = tmp_path / "text_encoder"
    folder.mkdir()
    config = {"model_type": "clip_text_model", "hidden_size": 32, "num_attention_heads": 4}
    (folder / "config.json").write_text(json.dumps({**config, "hidden_act": "relu"}))
    with pytest.raises(UsageError, match="hidden_act='relu'"):
        load_clip_text_encoder(tmp_path)
    (folder / "config.json").write_text(
        json.dumps({**config, "architectures": ["CLIPTextModelWithProjection"]})
    )
    with pytest.raises(UsageError, match="architectures"):
        load_clip_text_encoder(tmp_path)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="model.safetensors not found"):
        load_clip_text_encoder(tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(UsageError, match="damaged") as info:
        load_clip_text_encoder(tmp_path)
    assert str(folder / "model.safetensors") in str(info.value)
