"""The request state on its own: how token frames are accepted (offsets, gaps, logprobs),
what a re-sent request carries, how failures are counted."""

from __future__ import annotations

import pytest

from segue.failures import ACTIONS, FailureReason
from segue.frontend.request import BadFrame, RequestState
from segue.protocol import ErrorCode, Final, FinishReason, Logprob, Phase, Tokens
from segue.sampling import SamplingParams


def state(**kw) -> RequestState:
    return RequestState(request_id="r", prompt_ids=[3, 1, 4], max_tokens=6, **kw)


def lp(x: float) -> Logprob:
    return Logprob(x, [], [])


def test_frames_extend_the_output_and_repeats_are_dropped():
    s = state()
    d = s.accept(Tokens(0, [10, 11]))
    assert d is not None and d.token_ids == [10, 11] and d.finish_reason is None
    # a re-sent request's worker may repeat what the client has: only the new part counts
    d = s.accept(Tokens(1, [11, 12, 13]))
    assert d is not None and d.token_ids == [12, 13]
    assert s.accept(Tokens(2, [12])) is None  # all known already
    assert s.generated == [10, 11, 12, 13]
    assert s.context == [3, 1, 4, 10, 11, 12, 13]


def test_a_gap_is_a_broken_attempt():
    s = state()
    s.accept(Tokens(0, [10]))
    with pytest.raises(BadFrame) as e:
        s.accept(Tokens(2, [12]))
    assert e.value.reason is FailureReason.TOKEN_GAP
    assert s.generated == [10]  # nothing of the bad frame was taken


def test_logprobs_must_match_the_tokens():
    s = state(sampling=SamplingParams(logprobs=1))
    with pytest.raises(BadFrame) as e:
        s.accept(Tokens(0, [10, 11], [lp(-1.0)]))
    assert e.value.reason is FailureReason.BAD_FRAME
    with pytest.raises(BadFrame):
        s.accept(Tokens(0, [10]))  # none at all
    d = s.accept(Tokens(0, [10, 11], [lp(-1.0), lp(-2.0)]))
    assert d is not None and d.logprobs == [lp(-1.0), lp(-2.0)]
    d = s.accept(Tokens(1, [11, 12], [lp(-2.0), lp(-3.0)]))
    assert d is not None and d.token_ids == [12] and d.logprobs == [lp(-3.0)]


def test_a_resent_request_continues_where_the_client_is():
    sp = SamplingParams(temperature=0.5, seed=7, logprobs=2)
    s = state(sampling=sp, echo_logprobs=True)
    first = s.engine_request()
    assert first.token_ids == [3, 1, 4] and first.max_tokens == 6 and first.start_offset == 0
    assert first.sampling is sp and first.prompt_logprobs == 2
    s.accept(Tokens(0, [10, 11], [lp(-1.0), lp(-1.0)], prompt_logprobs=[None, lp(-1), lp(-2)]))
    again = s.engine_request(Phase.DECODE)
    assert again.token_ids == [3, 1, 4, 10, 11] and again.max_tokens == 4
    assert again.start_offset == 2 and again.phase is Phase.DECODE
    assert again.prompt_logprobs is None  # received once: not asked again


def test_finish_and_a_stream_that_broke_after_its_last_token():
    s = state(sampling=SamplingParams(stop_token_ids=[99]))
    assert s.finished() is None
    s.accept(Tokens(0, [10, 99]))
    assert s.finished() is FinishReason.STOP  # no Final frame needed
    d = state().finish(Final(FinishReason.LENGTH, 6, cached_tokens=2))
    assert d.finish_reason is FinishReason.LENGTH and d.cached_tokens == 2 and not d.token_ids
    full = state()
    full.accept(Tokens(0, [1, 2, 3, 5, 6, 7]))
    assert full.finished() is FinishReason.LENGTH


def test_failures_are_counted_up_to_the_limit():
    s = state()
    assert s.count_migration(2) and s.count_migration(2)
    assert not s.count_migration(2) and s.migrations == 2
    s.count_refusal()
    assert s.refused == 1


def test_every_error_code_has_a_row_in_the_failure_table():
    for code in ErrorCode:
        assert FailureReason(code.value) in ACTIONS, code
    assert set(ACTIONS) == set(FailureReason)
