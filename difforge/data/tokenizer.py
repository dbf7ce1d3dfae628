"""A word-level tokenizer (the `tokenizers` library) for prompts, with the input rules in one place.

Every encoding is [CLS] w_1 ... w_k [PAD] ... to exactly `max_tokens` ids. [CLS] is always present,
so the empty prompt is the single token [CLS]: that is the null (unconditional) prompt of
classifier-free guidance, and attention over a prompt never sees an all-padding row.

Input rules (each violation is a `PromptError` whose message says what to change):
- text is lower-cased and split on whitespace and punctuation (`Whitespace` pre-tokenizer);
- a word not in the vocabulary becomes [UNK] (id 1): the prompt is still accepted;
- an empty or all-whitespace prompt is the null prompt (documented, not an error);
- more than max_tokens - 1 words is an error naming the limit (we never truncate silently);
- control characters (Unicode category Cc/Cf/Cs, e.g. "\\x00", "\\x1b", a lone surrogate) and
  bytes that are not UTF-8 are errors.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections.abc import Iterable, Sequence
from functools import lru_cache

import torch

from difforge.core.errors import InvalidArgumentError

PAD, UNK, CLS = "[PAD]", "[UNK]", "[CLS]"
PAD_ID, UNK_ID, CLS_ID = 0, 1, 2
SPECIAL = (PAD, UNK, CLS)  # ids 0, 1, 2 in this order


class PromptError(InvalidArgumentError):
    """A prompt cannot be encoded; the message names the rule and the limit."""


def check_text(text: object, max_chars: int | None = None) -> str:
    """`text` as a str, or PromptError: not text, not UTF-8, control characters, too long."""
    if isinstance(text, bytes | bytearray):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise PromptError(f"is not valid UTF-8 (byte {e.start})") from None
    if not isinstance(text, str):
        raise PromptError(f"must be text, got {type(text).__name__}")
    for i, ch in enumerate(text):
        if ch not in "\t\n" and unicodedata.category(ch) in ("Cc", "Cf", "Cs"):
            raise PromptError(f"contains a control character U+{ord(ch):04X} at position {i}")
    if max_chars is not None and len(text) > max_chars:
        raise PromptError(f"has {len(text)} characters; the limit is {max_chars}")
    return text


class Tokenizer:
    """A trained word-level `tokenizers.Tokenizer` behind difforge's prompt rules."""

    def __init__(self, json_text: str):
        from tokenizers import Tokenizer as HFTokenizer

        self._json = json_text
        self._tok = HFTokenizer.from_str(json_text)
        for i, name in enumerate(SPECIAL):
            if self._tok.token_to_id(name) != i:
                raise InvalidArgumentError(f"tokenizer: {name} must have id {i}")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def to_json(self) -> str:
        return self._json

    def words(self, text: str) -> list[str]:
        """The normalised words of `text` (known or not)."""
        norm = self._tok.normalizer.normalize_str(text)
        return [w for w, _ in self._tok.pre_tokenizer.pre_tokenize_str(norm)]

    def encode(self, text: object, max_tokens: int) -> list[int]:
        """[CLS] + word ids + [PAD]s, exactly max_tokens long; PromptError when it does not fit."""
        text = check_text(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids if text.strip() else []
        if len(ids) > max_tokens - 1:
            raise PromptError(
                f"has {len(ids)} words; the limit is {max_tokens - 1} (max_tokens {max_tokens} "
                "includes [CLS])"
            )
        return [CLS_ID, *ids] + [PAD_ID] * (max_tokens - 1 - len(ids))

    def encode_batch(self, texts: Sequence[str], max_tokens: int) -> torch.Tensor:
        """int64 (N, max_tokens) ids of `texts`."""
        return torch.tensor([self.encode(t, max_tokens) for t in texts], dtype=torch.int64)

    def decode(self, ids: Iterable[int]) -> str:
        """The words of an id row, specials dropped ([UNK] kept as "[UNK]")."""
        words = [self._tok.id_to_token(int(i)) for i in ids if int(i) not in (PAD_ID, CLS_ID)]
        return " ".join(w for w in words if w is not None)


@lru_cache(maxsize=16)
def tokenizer_from_json(json_text: str) -> Tokenizer:
    """A Tokenizer from its JSON (cached: a spec resolves many requests with one tokenizer)."""
    return Tokenizer(json_text)


def tokenizer_sha256(json_text: str) -> str:
    """The identity of a tokenizer: sha256 of its JSON (what a layout planner records)."""
    return hashlib.sha256(json_text.encode("utf-8")).hexdigest()


def train_tokenizer(corpus: Iterable[str]) -> Tokenizer:
    """A word-level vocabulary of every word in `corpus` (lower-cased), specials first."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from tokenizers.trainers import WordLevelTrainer

    tok = HFTokenizer(WordLevel(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(corpus, WordLevelTrainer(special_tokens=list(SPECIAL), min_frequency=1))
    return Tokenizer(tok.to_str())
