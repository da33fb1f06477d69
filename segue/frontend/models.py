"""The models a frontend serves: its own (`--model`, or the built-in tokenizer) and every
model its workers register with a model card. A worker whose card conflicts with the model
already registered under the same name (another tokenizer, another context length) is
refused: the router never sees it."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from segue.api import openai as oai
from segue.discovery import Instance, ModelCard
from segue.frontend.config import FrontendConfig
from segue.frontend.output import OutputProcessor
from segue.frontend.preprocess import PreparedRequest, Preprocessor
from segue.grammar import GrammarError, Grammars
from segue.models.card import CardError, card_for, tokenizer_for
from segue.tokenizer import Tokenizer

log = logging.getLogger("segue.frontend")


@dataclass
class ServedModel:
    card: ModelCard
    tokenizer: Tokenizer
    preprocess: Preprocessor
    output: OutputProcessor
    grammars: Grammars  # compiles each new constraint once, to refuse what cannot compile

    async def check(self, prep: PreparedRequest) -> None:
        """A 400 naming the field for a constraint that cannot compile (off the event loop:
        the first compile also imports xgrammar)."""
        c = prep.constraint
        if c is None:
            return
        try:
            await asyncio.to_thread(self.grammars.compile, c)
        except GrammarError as e:
            raise oai.APIError(
                400, f"{prep.constraint_param}: {e}", param=prep.constraint_param
            ) from None


class ModelRegistry:
    def __init__(self, cfg: FrontendConfig, own: Tokenizer, output: OutputProcessor) -> None:
        self.cfg = cfg
        self._ttft, self._itl = output.ttft, output.itl
        self.models: dict[str, ServedModel] = {}
        self._refused: set[str] = set()
        self._add(card_for(own, cfg.served_model_name, cfg.model), own)

    def _add(self, card: ModelCard, tok: Tokenizer) -> ServedModel:
        m = ServedModel(
            card,
            tok,
            Preprocessor(self.cfg, tok, card.name),
            OutputProcessor(tok, self._ttft, self._itl),
            Grammars(tok),
        )
        self.models[card.name] = m
        return m

    def get(self, name: str) -> ServedModel | None:
        return self.models.get(name)

    def require(self, name: str) -> ServedModel:
        """The served model `name`, or a 404 naming the ones served."""
        model = self.models.get(name)
        if model is None:
            raise oai.APIError(
                404,
                f"The model `{name}` does not exist; this server serves "
                + ", ".join(f"`{n}`" for n in self.models),
                param="model",
                code="model_not_found",
            )
        return model

    def accept(self, instances: dict[str, Instance]) -> dict[str, Instance]:
        """The instances whose model this frontend can serve (loading new models' tokenizers);
        each refused one is logged once."""
        accepted: dict[str, Instance] = {}
        for iid, inst in instances.items():
            card = inst.card
            known = self.models.get(card.name)
            why = None
            if known is None:
                try:
                    known = self._add(card, tokenizer_for(card))
                    log.info(
                        "serving model %r (from worker %s's card, tokenizer %s)",
                        card.name,
                        iid,
                        card.path or "built-in",
                    )
                except CardError as e:
                    why = str(e)
            elif (known.card.tokenizer_digest, known.card.context_length) != (
                card.tokenizer_digest,
                card.context_length,
            ):
                why = (
                    f"its model card for {card.name!r} conflicts with the registered one "
                    f"(tokenizer {card.tokenizer_digest[:12]} vs "
                    f"{known.card.tokenizer_digest[:12]}, context {card.context_length} vs "
                    f"{known.card.context_length})"
                )
            if why is None:
                accepted[iid] = inst
            elif iid not in self._refused:
                self._refused.add(iid)
                log.error("refusing worker %s (%s): %s", iid, inst.url, why)
        self._refused &= instances.keys()
        return accepted
