"""Model cards: what a worker publishes about its model, and how a frontend loads the
tokenizer it names."""

from __future__ import annotations

import os

from segue.discovery.base import ModelCard
from segue.tokenizer import Tokenizer, load_tokenizer


def card_for(tokenizer: Tokenizer, name: str, model_dir: str | None) -> ModelCard:
    return ModelCard(
        name=name,
        tokenizer_digest=tokenizer.digest,
        context_length=tokenizer.context_length,
        path=os.path.abspath(model_dir) if model_dir else "",
    )


class CardError(Exception):
    """The card's tokenizer cannot be loaded here, or is not the one the card describes."""


def tokenizer_for(card: ModelCard) -> Tokenizer:
    try:
        tok = load_tokenizer(card.path or None)
    except (OSError, ValueError) as e:
        raise CardError(f"cannot load the tokenizer at {card.path!r}: {e}") from None
    if tok.digest != card.tokenizer_digest or tok.context_length != card.context_length:
        raise CardError(
            f"the tokenizer at {card.path!r} is not the one its worker serves "
            "(digest or context length differs)"
        )
    return tok
