"""Samplers, stop strings and prompt-cache reuse of the generator."""

from __future__ import annotations

import pytest
import torch

from marco_local.generate import (
    UNTIL_FULL,
    PromptCache,
    generate,
    generate_step,
    prefill,
    prefill_chunk,
    stream_generate,
)
from marco_local.layers.kv_cache import make_cache
from marco_local.load.checkpoint import load_model
from marco_local.sampling import make_logits_processors, make_sampler
from marco_local.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def lm(checkpoint):
    folder, _ = checkpoint
    model = load_model(folder, dtype=torch.float32)
    return model, Tokenizer.from_folder(folder, config_eos=model.config.eos_token_ids)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, -1.0, 2.9])
    assert make_sampler(0.0)(logits) == 1


def test_same_seed_same_samples_and_different_seed_differs():
    logits = torch.randn(500, generator=torch.Generator().manual_seed(0))
    a, b, c = (make_sampler(1.0, seed=s) for s in (7, 7, 8))
    draws_a = [a(logits) for _ in range(50)]
    assert draws_a == [b(logits) for _ in range(50)]
    assert draws_a != [c(logits) for _ in range(50)]


def test_top_k_top_p_min_p_restrict_the_support():
    logits = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))
    draws = lambda s: {s(logits) for _ in range(300)}  # noqa: E731
    assert draws(make_sampler(1.0, top_k=2, seed=1)) == {0, 1}
    assert draws(make_sampler(1.0, top_p=0.7, seed=1)) == {0, 1}  # 0.5 + 0.25 reaches 0.7
    assert draws(make_sampler(1.0, min_p=0.4, seed=1)) == {0, 1}  # >= 0.4 * 0.5
    assert draws(make_sampler(1.0, seed=1)) == {0, 1, 2, 3, 4}


def test_extreme_but_valid_settings_sample_without_nan():
    """A temperature or repetition penalty near zero is valid: it must not overflow into NaN probabilities."""
    logits = torch.tensor([1.0, 3.0, -2.0, float("-inf")])
    assert {make_sampler(1e-320, seed=s)(logits) for s in range(5)} == {1}  # as greedy
    boosted = make_logits_processors(1e-300)[0]([0], logits)  # token 0 pushed to the top, finite
    assert torch.isfinite(boosted[:3]).all() and make_sampler(0.7, seed=1)(boosted) == 0


def test_repetition_penalty_follows_transformers_rule():
    logits = torch.tensor([2.0, -2.0, 1.0])
    out = make_logits_processors(2.0)[0]([0, 1], logits)
    assert out.tolist() == [1.0, -4.0, 1.0]
    assert make_logits_processors(1.0) == []


def test_same_seed_same_text(lm):
    model, tok = lm
    texts = [generate(model, tok, "Hello", max_tokens=20, sampler=make_sampler(0.9, top_k=50, seed=s)) for s in (3, 3)]
    assert texts[0] == texts[1]


def test_chunked_prefill_matches_one_forward(lm):
    """Chunks see the same keys as one forward (each chunk attends to the cached prefix and causally to itself)."""
    model, _ = lm
    tokens = torch.randint(0, model.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    whole_cache, chunked_cache = make_cache(model, 32), make_cache(model, 32)
    with torch.inference_mode():
        whole = model(tokens, whole_cache, last_only=True)
        chunked = prefill(model, tokens, chunked_cache, chunk=5)  # 5+5+5+5+3: a ragged last chunk
    assert chunked.shape == whole.shape == (1, 1, model.config.vocab_size)
    assert chunked_cache.offset == whole_cache.offset == 23
    torch.testing.assert_close(chunked, whole, atol=1e-4, rtol=1e-4)  # float32: only summation order differs
    assert prefill_chunk(torch.device("cpu")) < prefill_chunk(torch.device("cuda"))


def test_prompt_cache_reuse_gives_the_same_tokens(lm):
    model, tok = lm
    prompt = tok.encode("The capital of France is Paris. The capital of Spain is")
    fresh = list(generate_step(model, prompt, PromptCache(make_cache(model, 128)), make_sampler(0.0), max_tokens=12))
    cache = PromptCache(make_cache(model, 128))
    list(generate_step(model, prompt[:8] + [5, 6, 7], cache, make_sampler(0.0), max_tokens=3, prefill_step_size=4))
    assert cache.reuse(prompt) == 8  # the shared prefix stays (forwards began at 0, 4, 8), the rest is dropped
    reused = list(generate_step(model, prompt, cache, make_sampler(0.0), max_tokens=12))
    assert reused == fresh
    assert cache.tokens == prompt + fresh[:-1]  # the last sampled token has not been fed yet


def test_stop_strings_cut_the_text(lm):
    model, tok = lm
    full = generate(model, tok, "Hello", max_tokens=30, sampler=make_sampler(0.0))
    assert len(full) > 6
    stop = full[3:6]
    cut = list(stream_generate(model, tok, "Hello", max_tokens=30, sampler=make_sampler(0.0), stop_strings=[stop]))
    text = "".join(r.text for r in cut)
    assert text == full[: full.index(stop)]
    assert cut[-1].finish_reason == "stop"


def test_response_record_reports_speeds_and_length_finish(lm):
    model, tok = lm
    responses = list(stream_generate(model, tok, "Hello", max_tokens=10, sampler=make_sampler(0.0)))
    last = responses[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.prompt_tokens == len(tok.encode("Hello"))
    assert 1 <= last.generation_tokens <= 10
    assert last.prompt_tps > 0 and last.peak_memory > 0


def test_until_full_generates_until_the_context_window_is_full(lm):
    model, tok = lm
    never_ends = lambda logits: next(i for i in range(100) if i not in tok.eos_token_ids)  # noqa: E731
    ids = tok.encode("Hello there")
    for cache in (None, PromptCache(make_cache(model, 40))):  # sized here, or by the caller
        responses = list(
            stream_generate(
                model, tok, ids, max_tokens=UNTIL_FULL, sampler=never_ends, prompt_cache=cache, max_context=40
            )
        )
        assert responses[-1].generation_tokens == 40 - len(ids) and responses[-1].finish_reason == "length"
