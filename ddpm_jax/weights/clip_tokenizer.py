"""CLIP's byte-level BPE tokenizer from a ``tokenizer/`` folder, without transformers.

The ids are those of transformers' ``CLIPTokenizer`` called as Stable Diffusion pipelines call it
(``padding="max_length"``, ``max_length=model_max_length``, ``truncation=True``): the same
`tokenizers <https://github.com/huggingface/tokenizers>`_ pipeline transformers builds —

- normalisation: NFC, every run of whitespace → one space, lower case;
- pre-tokenisation: CLIP's split (``'s``, ``'t``, ... contractions, runs of letters, single
  digits, runs of other non-space characters), then byte-level mapping;
- BPE with ``</w>`` marking word ends (unknown pieces → ``unk_token``);
- ``<|startoftext|>`` … ``<|endoftext|>`` around each prompt; the special tokens (BOS, EOS, UNK,
  PAD) are matched in the raw text as whole tokens, as transformers does (SD 2.x's pad token
  ``"!"`` therefore always encodes as its own id);
- truncated to ``model_max_length`` (77: BOS, 75 pieces, EOS) and padded with the folder's pad
  token (EOS in SD 1.x, ``"!"`` in SD 2.x).

Two folder layouts load (:func:`load_clip_tokenizer`): ``tokenizer.json`` (what transformers 5
writes; read as is, preferred when present) or ``vocab.json`` + ``merges.txt`` (the published
SD 1.x / 2.x folders). Special tokens and ``model_max_length`` come from
``tokenizer_config.json`` / ``special_tokens_map.json`` (strings or ``AddedToken`` objects).

Example:
    >>> tokenizer = load_clip_tokenizer("stable-diffusion-v1-5/tokenizer")
    >>> tokens = tokenizer.encode(["a photo of an astronaut", ""])  # int32 [2, 77]
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ddpm_jax.errors import UsageError
from ddpm_jax.weights.diffusers import read_config

# CLIP's pre-tokenisation pattern (openai/CLIP's simple_tokenizer, as transformers writes it).
CLIP_SPLIT = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"""
    r"""[^\s\p{L}\p{N}]+"""
)
DEFAULT_TOKENS = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|endoftext|>",
    "unk_token": "<|endoftext|>",
    "pad_token": None,  # the EOS token
}
DEFAULT_MAX_LENGTH = 77


class ClipTokenizer:
    """CLIP's tokenizer with a fixed length.

    Args:
        tokenizer: a ``tokenizers.Tokenizer`` (normaliser, pre-tokeniser, BPE model, special
            tokens and BOS/EOS post-processor set); its padding and truncation are replaced.
        pad_token: the padding token (in the vocabulary).
        max_length: L, the length of every encoded prompt (77 in SD).
        source: names the folder in messages.

    Attributes:
        max_length: L.
        pad_id / bos_id / eos_id: the special ids.
        vocab_size: number of ids, added tokens included.
    """

    def __init__(self, tokenizer, *, pad_token: str, max_length: int, source: str = "tokenizer"):
        self._tokenizer = tokenizer
        self.max_length = max_length
        self.pad_id = self._id(pad_token, "pad_token", source)
        tokenizer.no_padding()  # a tokenizer.json may have kept the settings of its last call
        tokenizer.no_truncation()
        encoded = tokenizer.encode("").ids
        if len(encoded) != 2:
            raise UsageError(
                f"{source}: the tokenizer does not add <|startoftext|> / <|endoftext|>"
            )
        self.bos_id, self.eos_id = encoded
        tokenizer.enable_truncation(max_length=max_length)
        tokenizer.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad_token)
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)

    def _id(self, token: str, key: str, source: str) -> int:
        token_id = self._tokenizer.token_to_id(token)
        if token_id is None:
            raise UsageError(f"{source}: {key}={token!r} is not in the vocabulary")
        return token_id

    def encode(self, prompts: Sequence[str]) -> np.ndarray:
        """Prompts → int32 [B, max_length] ids: BOS, pieces (truncated), EOS, padding."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts: expected a list of strings, got {type(prompts).__name__}")
        encodings = self._tokenizer.encode_batch(list(prompts))
        return np.asarray([e.ids for e in encodings], np.int32).reshape(-1, self.max_length)

    def decode(self, ids: Sequence[int]) -> str:
        """One row of ids → text (special tokens skipped, ``</w>`` as spaces)."""
        text = self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace("</w>", " ").strip()


def _token(value, key: str, source: str) -> str | None:
    """A special token written as a string or as an ``AddedToken`` dict."""
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise UsageError(f"{source}: {key}={value!r}: must be a string")
    return value


def _tokenizer_settings(directory: Path) -> tuple[dict, int]:
    """Special tokens (``bos_token`` ...) and ``model_max_length`` of a tokenizer folder."""
    tokens = dict(DEFAULT_TOKENS)
    max_length = DEFAULT_MAX_LENGTH
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        path = directory / name
        if not path.is_file():
            continue
        config = read_config(path)
        for key in DEFAULT_TOKENS:
            if config.get(key) is not None:
                tokens[key] = _token(config[key], key, str(path))
        if "model_max_length" in config:
            max_length = config["model_max_length"]
            if not (isinstance(max_length, int) and 2 < max_length <= 100_000):
                raise UsageError(
                    f"{path}: model_max_length={max_length!r}: must be an int (77 for CLIP)"
                )
    tokens["pad_token"] = tokens["pad_token"] or tokens["eos_token"]
    return tokens, max_length


def _from_vocab_and_merges(directory: Path, tokens: dict):
    """Builds transformers' CLIP pipeline from ``vocab.json`` and ``merges.txt``."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from tokenizers.models import BPE

    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab = read_config(vocab_path)
    if not all(isinstance(v, int) for v in vocab.values()):
        raise UsageError(f"{vocab_path} is damaged (ids must be ints): download it again")
    try:
        lines = merges_path.read_text(encoding="utf-8").splitlines()
    except (OSError, ValueError) as e:
        raise UsageError(f"{merges_path} is damaged or missing ({e}): download it again") from e
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        pair = line.split()
        if len(pair) != 2:
            raise UsageError(f"{merges_path}: line {n} is not a pair of tokens: download it again")
        merges.append(tuple(pair))
    try:
        model = BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=tokens["unk_token"],
        )
    except Exception as e:  # tokenizers raises its own errors for merges outside the vocabulary
        raise UsageError(
            f"{merges_path} does not fit {vocab_path} ({e}): download them again"
        ) from e
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    specials = [tokens[k] for k in ("unk_token", "bos_token", "eos_token", "pad_token")]
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)]
    )
    bos, eos = tokens["bos_token"], tokens["eos_token"]
    ids = {}
    for key, token in (("bos_token", bos), ("eos_token", eos)):
        ids[key] = tokenizer.token_to_id(token)
        if ids[key] is None:
            raise UsageError(f"{directory}: {key}={token!r} is not in {vocab_path.name}")
    tokenizer.post_processor = processors.RobertaProcessing(
        (eos, ids["eos_token"]), (bos, ids["bos_token"]), trim_offsets=False, add_prefix_space=False
    )
    return tokenizer


def load_clip_tokenizer(directory: str | Path) -> ClipTokenizer:
    """Loads CLIP's tokenizer from a ``tokenizer/`` folder (or a pipeline folder holding one).

    Args:
        directory: a folder with ``tokenizer.json``, or ``vocab.json`` + ``merges.txt``; plus
            optionally ``tokenizer_config.json`` / ``special_tokens_map.json``.

    Returns:
        The :class:`ClipTokenizer`.

    Raises:
        UsageError: missing or damaged files, a special token outside the vocabulary (one line
            naming the file).
    """
    directory = Path(directory)
    if not any((directory / n).is_file() for n in ("tokenizer.json", "vocab.json")):
        if (directory / "tokenizer").is_dir():
            directory = directory / "tokenizer"
    tokens, max_length = _tokenizer_settings(directory)
    path = directory / "tokenizer.json"
    if path.is_file():
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as e:  # tokenizers' parse errors are plain Exceptions
            reason = " ".join(str(e).split())
            raise UsageError(f"{path} is damaged ({reason}): download it again") from e
    elif (directory / "vocab.json").is_file():
        tokenizer = _from_vocab_and_merges(directory, tokens)
    else:
        raise UsageError(
            f"{path} not found (nor vocab.json + merges.txt): download CLIP's tokenizer there"
        )
    return ClipTokenizer(
        tokenizer, pad_token=tokens["pad_token"], max_length=max_length, source=str(directory)
    )


__all__ = ["ClipTokenizer", "load_clip_tokenizer"]
