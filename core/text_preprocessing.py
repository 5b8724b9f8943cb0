"""Per-model text cleaning, applied by every engine before tokenizing (and by the offline
references the tests compare against), so a model sees the text the way it was trained on.

``kcbert`` is KcBERT's own cleaning (github.com/Beomi/KcBERT, "Preprocessing"): characters
outside Hangul, ASCII, a few punctuation marks and emoji become a space, URLs go, and runs of
a repeated character or syllable are squeezed to two. It uses the libraries its authors use,
``emoji`` for the emoji set and ``soynlp``'s ``repeat_normalize`` for the squeezing, so our
cleaning cannot drift from theirs. KcBERT was pretrained with emoji kept (its README: "이모지까지
학습 대상에 포함"); ``kcbert_drop_emoji`` is the README's later variant that deletes them, for
fine-tunes trained on that.

Imported by server code only: the client library sends raw text and never needs emoji/soynlp.
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Literal

Preprocessing = Literal["none", "kcbert", "kcbert_drop_emoji"]

# KcBERT's URL pattern, verbatim in meaning.
_URL = re.compile(
    r"https?:\/\/(www\.)?[-a-zA-Z0-9@:%._\+~#=]{1,256}\.[a-zA-Z0-9()]{1,6}\b([-a-zA-Z0-9()@:%_\+.~#?&//=]*)"
)
_KEPT_CHARACTERS = " .,?!/@$%~％·∼()\x00-\x7Fㄱ-ㅣ가-힣"


@functools.lru_cache(maxsize=None)
def _outside_kept(keep_emoji: bool) -> re.Pattern:
    import emoji

    kept = _KEPT_CHARACTERS
    if keep_emoji:
        # Every code point that occurs in an emoji sequence (ZWJ, variation selectors included).
        kept += "".join(re.escape(char) for char in sorted({c for e in emoji.EMOJI_DATA for c in e}))
    return re.compile(f"[^{kept}]+")


def kcbert_clean(text: str, keep_emoji: bool = True) -> str:
    import emoji
    from soynlp.normalizer import repeat_normalize

    text = _outside_kept(keep_emoji).sub(" ", text)
    if not keep_emoji:
        text = emoji.replace_emoji(text, replace="")
    text = _URL.sub("", text)
    return repeat_normalize(text.strip(), num_repeats=2)


def text_preprocessor(name: Preprocessing) -> Callable[[str], str] | None:
    """The cleaning a model's configuration names; None for ``none``."""
    if name == "none":
        return None
    if name == "kcbert":
        return kcbert_clean
    if name == "kcbert_drop_emoji":
        return functools.partial(kcbert_clean, keep_emoji=False)
    raise ValueError(f"preprocessing: unknown {name!r}; choose one of none, kcbert, kcbert_drop_emoji")
