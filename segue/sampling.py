"""`SamplingParams`: how the next tokens of one request are chosen, in one struct.

The frontend's preprocessor builds it from the API body; the request plane carries it whole
(`EngineRequest.sampling`), and the engine reads it from `EngineInput.sampling`. A new
sampling option is a field here, the preprocessor line that sets it and the engines that
apply it; nothing in between copies fields.
"""

from __future__ import annotations

import msgspec


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True):
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    # A sampled request always carries a seed (the frontend draws one when the client gives
    # none): a migrated continuation then samples as the first worker would have.
    seed: int = 0
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    logprobs: int | None = None  # with each token its logprob and this many top ones
    # Penalties see a migrated request's earlier output (the context's last `generated`
    # tokens) as generated ones, min_tokens counts them: a move changes nothing.
    presence_penalty: float = 0.0  # OpenAI's, over generated tokens
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's and transformers', over the whole context
    min_tokens: int = 0  # no EOS or stop token before this many generated tokens

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


GREEDY = SamplingParams()
