"""Tests for ``verl_patches.hf_rollout``: the CPU ``hf`` rollout backend.

Everything runs in-process on a tiny local-tokenizer Qwen2 model (no Ray, no GPU). The
model's weights are re-drawn with a larger scale than the builder's (std 0.02), so that
greedy continuations are diverse rather than one repeated token and the tests of
padding, stopping and top-p cannot pass by accident.
"""

from __future__ import annotations

import asyncio
import copy
import math
from pathlib import Path

import pytest
import torch

from recipe import models
from verl_patches import hf_rollout as hr
from verl_patches.hf_rollout import HFGenerator, normalize_sampling_params

from tests.paths import GSM8K_TRAIN, QWEN_TOK, require

require(GSM8K_TRAIN, QWEN_TOK / "tokenizer.json")

VOCAB = 512
ROWS = 300
PROMPT_LENGTH = 64
RESPONSE_LENGTH = 32
MAX_NEW = 16

PROMPT_TEXTS = [
    "Hi",
    "What is 2+2?",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.",
    "Weng earns $12 an hour for babysitting.",
    "How many clips did Natalia sell altogether in April and May?",
    "Betty is saving money for a new wallet which costs $100.",
    "James writes a 3-page letter to 2 different friends twice a week.",
    "Please reason step by step, and put your final answer within \\boxed{}.",
]


# ----------------------------------------------------------------------------- fixtures


def _randomize(model: torch.nn.Module, seed: int, embed_std: float = 0.3, std: float = 0.3) -> None:
    """Re-draws every matrix of ``model`` (norms and biases are kept)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * (embed_std if "embed" in name else std))


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """One intra-op thread: the model is tiny, and on a busy 2-core machine OpenMP threads
    competing with other processes make each ``generate`` call up to 50x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    out = models.build_tiny_model(
        tmp_path_factory.mktemp("hf_rollout") / "tiny", tokenizer="local", vocab_size=VOCAB, max_train_rows=ROWS, seed=0
    )
    model = AutoModelForCausalLM.from_pretrained(str(out))
    _randomize(model, seed=1)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture(scope="module")
def model(model_dir):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="module")
def eos_ids(model) -> list[int]:
    ge = model.generation_config.eos_token_id
    return list(ge) if isinstance(ge, (list, tuple)) else [ge]


@pytest.fixture(scope="module")
def generator(model, tok, eos_ids) -> HFGenerator:
    return HFGenerator(model, eos_ids, tok.pad_token_id)


@pytest.fixture(scope="module")
def prompts(tok) -> list[list[int]]:
    ids = [tok(t)["input_ids"] for t in PROMPT_TEXTS]
    assert len({len(p) for p in ids}) >= 6, "prompts must have different lengths"
    return ids


def _params(**kw) -> dict:
    return normalize_sampling_params(kw, 8, PROMPT_LENGTH, RESPONSE_LENGTH)


@torch.no_grad()
def plain_greedy(model, prompt: list[int], max_new: int, eos, pad: int) -> list[int]:
    """Single-prompt ``model.generate(do_sample=False)``: the new tokens (incl. the EOS)."""
    x = torch.tensor([prompt])
    out = model.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        do_sample=False,
        max_new_tokens=max_new,
        eos_token_id=eos,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return out[0, len(prompt) :].tolist()


@torch.no_grad()
def teacher_forced(model, prompt: list[int], response: list[int], temperature: float) -> torch.Tensor:
    """``log_softmax(logits / T)`` rows predicting each response token, shape ``[R, V]``."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0].float()
    rows = logits[len(prompt) - 1 : len(prompt) - 1 + len(response)]
    return torch.log_softmax(rows / temperature, dim=-1)


def _gathered(lp: torch.Tensor, response: list[int]) -> torch.Tensor:
    return lp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


def _check_finish_invariant(results, eos: set[int], max_tokens: int) -> None:
    for ids, lps, reason in results:
        assert len(lps) == len(ids) >= 1
        assert all(math.isfinite(v) and v <= 1e-6 for v in lps)
        if reason == "stop":
            assert ids[-1] in eos and not (set(ids[:-1]) & eos)
            assert len(ids) <= max_tokens
        else:
            assert reason == "length"
            assert len(ids) == max_tokens and not (set(ids) & eos)


# ----------------------------------------------------------------------------- normalize_sampling_params


def test_normalize_default_max_tokens():
    # response_length when the prompt fits in prompt_length...
    assert normalize_sampling_params({}, 10, 64, 32)["max_tokens"] == 32
    assert normalize_sampling_params({}, 64, 64, 32)["max_tokens"] == 32
    # ...otherwise what is left of prompt_length + response_length
    assert normalize_sampling_params({}, 80, 64, 32)["max_tokens"] == 16
    assert normalize_sampling_params({}, 95, 64, 32)["max_tokens"] == 1
    # the default keeps prompt + response within prompt_length + response_length even
    # when max_model_len allows more (verl's tensors are that wide)
    assert normalize_sampling_params({}, 80, 64, 32, max_model_len=200)["max_tokens"] == 16
    assert normalize_sampling_params({}, 10, 64, 32, max_model_len=200)["max_tokens"] == 32


def test_normalize_explicit_max_tokens():
    assert normalize_sampling_params({"max_tokens": 5}, 10, 64, 32)["max_tokens"] == 5
    assert normalize_sampling_params({"max_new_tokens": 7}, 10, 64, 32)["max_tokens"] == 7
    assert normalize_sampling_params({"max_tokens": 5, "max_new_tokens": 7}, 10, 64, 32)["max_tokens"] == 5
    # an explicit value may exceed response_length while the context has room (as vLLM)
    assert normalize_sampling_params({"max_tokens": 50}, 10, 64, 32)["max_tokens"] == 50
    # lower bound 1 (vLLM rejects max_tokens < 1)
    assert normalize_sampling_params({"max_tokens": 0}, 10, 64, 32)["max_tokens"] == 1


def test_normalize_capped_by_context():
    assert normalize_sampling_params({"max_tokens": 1000}, 10, 64, 32)["max_tokens"] == 86
    assert normalize_sampling_params({"max_new_tokens": 1000}, 90, 64, 32)["max_tokens"] == 6
    assert normalize_sampling_params({"max_tokens": 1000}, 10, 64, 32, max_model_len=50)["max_tokens"] == 40
    assert normalize_sampling_params({}, 30, 64, 32, max_model_len=40)["max_tokens"] == 10


def test_normalize_no_room_raises():
    with pytest.raises(ValueError, match="no room"):
        normalize_sampling_params({}, 96, 64, 32)
    with pytest.raises(ValueError, match="no room"):
        normalize_sampling_params({"max_tokens": 4}, 120, 64, 32)
    with pytest.raises(ValueError, match="no room"):
        normalize_sampling_params({}, 50, 64, 32, max_model_len=50)


def test_normalize_fields_and_defaults():
    p = normalize_sampling_params({}, 10, 64, 32)
    assert p == {
        "temperature": 1.0,
        "top_p": 1.0,
        "top_k": -1,
        "max_tokens": 32,
        "repetition_penalty": 1.0,
        "ignore_eos": False,
        "logprobs": False,
        "seed": None,
        "stop_token_ids": (),
    }
    sp = {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "logprobs": True,
          "ignore_eos": True, "max_tokens": 9, "stop_token_ids": [7, 3, 7]}
    original = dict(sp)
    p = normalize_sampling_params(sp, 10, 64, 32)
    assert sp == original, "the caller's dict must not be mutated"
    assert p == {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "max_tokens": 9, "repetition_penalty": 1.1,
                 "ignore_eos": True, "logprobs": True, "seed": None, "stop_token_ids": (3, 7)}
    assert normalize_sampling_params({"seed": 2**63 + 5}, 10, 64, 32)["seed"] == 2**63 + 5
    assert normalize_sampling_params({"top_k": None}, 10, 64, 32)["top_k"] == -1
    assert normalize_sampling_params({"top_k": -1}, 10, 64, 32)["top_k"] == -1
    assert normalize_sampling_params({"repetition_penalty": None}, 10, 64, 32)["repetition_penalty"] == 1.0
    assert normalize_sampling_params({"temperature": 0}, 10, 64, 32)["temperature"] == 0.0


@pytest.mark.parametrize("bad", [{"temperature": -0.1}, {"top_p": 0.0}, {"top_p": -0.5}, {"top_p": 1.5},
                                 {"seed": -1}, {"seed": 2**64}])
def test_normalize_invalid_values_raise(bad):
    with pytest.raises(ValueError):
        normalize_sampling_params(bad, 10, 64, 32)


# ----------------------------------------------------------------------------- HFGenerator


def test_greedy_batched_equals_unbatched(model, tok, generator, prompts, eos_ids):
    results = generator.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW))
    assert len(results) == len(prompts)
    for prompt, (ids, lps, reason) in zip(prompts, results):
        expected = plain_greedy(model, prompt, MAX_NEW, eos_ids, tok.pad_token_id)
        assert ids == expected
        assert len(lps) == len(ids)
    # non-vacuous: continuations are varied, not one repeated token
    assert max(len(set(r[0])) for r in results) >= 5
    assert len({tuple(r[0]) for r in results}) == len(prompts)
    # a batch of one gives the same as the batch
    assert generator.generate_batch([prompts[2]], _params(temperature=0, max_tokens=MAX_NEW))[0][0] == results[2][0]


def test_greedy_logprobs_match_teacher_forcing(model, generator, prompts):
    results = generator.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW))
    for prompt, (ids, lps, _) in zip(prompts, results):
        lp = teacher_forced(model, prompt, ids, temperature=1.0)
        assert torch.equal(lp.argmax(-1), torch.tensor(ids)), "greedy picks the argmax"
        torch.testing.assert_close(torch.tensor(lps), _gathered(lp, ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("seeded", [False, True], ids=["global_rng", "per_row_seeds"])
def test_sampled_logprobs_use_temperature_before_top_p(model, generator, prompts, seeded):
    temperature, top_p = 0.7, 0.8
    torch.manual_seed(1234)
    results = generator.generate_batch(
        prompts, _params(temperature=temperature, top_p=top_p, max_tokens=MAX_NEW, logprobs=True),
        seeds=list(range(100, 100 + len(prompts))) if seeded else None,
    )
    _check_finish_invariant(results, set(generator.eos_token_ids), MAX_NEW)
    excluded_somewhere = False
    for prompt, (ids, lps, _) in zip(prompts, results):
        lp = teacher_forced(model, prompt, ids, temperature=temperature)
        chosen = _gathered(lp, ids)
        # log_softmax(logits / 0.7) over the full vocabulary (not renormalised after top-p)
        torch.testing.assert_close(torch.tensor(lps), chosen, atol=1e-4, rtol=0)
        assert not torch.allclose(torch.tensor(lps), _gathered(teacher_forced(model, prompt, ids, 1.0), ids), atol=1e-3)
        # top-p honoured: the mass of tokens more probable than the chosen one is < top_p
        probs = lp.exp()
        above = (probs * (probs > chosen.exp()[:, None])).sum(-1)
        assert bool((above < top_p + 1e-5).all()), above
        # ... and the nucleus really excludes tokens (so that check can fail)
        sorted_p = probs.sort(-1, descending=True).values
        nucleus = ((sorted_p.cumsum(-1) - sorted_p) < top_p).sum(-1)
        excluded_somewhere |= bool((nucleus < probs.shape[-1] // 2).any())
    assert excluded_somewhere


def test_top_k_one_equals_greedy(generator, prompts):
    greedy = generator.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW))
    for temperature in (1.0, 0.7):
        torch.manual_seed(7)
        sampled = generator.generate_batch(prompts, _params(temperature=temperature, top_k=1, max_tokens=MAX_NEW))
        assert [r[0] for r in sampled] == [r[0] for r in greedy]


def test_sampling_reproducible_with_seed(generator, prompts):
    params = _params(temperature=1.0, max_tokens=MAX_NEW)

    def run(seed):
        torch.manual_seed(seed)
        return generator.generate_batch(prompts, params)

    first = run(123)
    again = run(123)
    assert [r[0] for r in first] == [r[0] for r in again]
    assert [r[1] for r in first] == [r[1] for r in again]
    others = [run(s) for s in (1, 2)]
    assert any([r[0] for r in o] != [r[0] for r in first] for o in others), "different seeds give different samples"


SEEDS = [11, 2**63 + 3, 5, 7, 999, 12345, 3, 2**40]


def test_seeded_rows_independent_of_batch_composition_and_order(generator, prompts):
    """A row's response depends on its seed only: alone, in the batch, or in reversed order."""
    params = _params(temperature=1.0, top_k=50, max_tokens=MAX_NEW, logprobs=True)
    batch = generator.generate_batch(prompts, params, seeds=SEEDS)
    reverse = generator.generate_batch(prompts[::-1], params, seeds=SEEDS[::-1])[::-1]
    assert [r[0] for r in reverse] == [r[0] for r in batch]
    for i in (0, 3, 7):
        alone = generator.generate_batch([prompts[i]], params, seeds=[SEEDS[i]])[0]
        assert alone[0] == batch[i][0]
        # log-probs: the same up to float32 noise of the padded batch (seen: 1.1e-5 nats)
        torch.testing.assert_close(torch.tensor(alone[1]), torch.tensor(batch[i][1]), atol=1e-4, rtol=0)
    # global RNG state is irrelevant; another seed gives another response
    torch.manual_seed(0)
    again = generator.generate_batch(prompts, params, seeds=SEEDS)
    assert [r[0] for r in again] == [r[0] for r in batch]
    other = generator.generate_batch(prompts, params, seeds=[s + 1 for s in SEEDS])
    assert sum(o[0] != b[0] for o, b in zip(other, batch)) >= len(prompts) - 1


def test_seeded_sampling_follows_the_processed_distribution(model, generator, prompts):
    """Gumbel-max with per-row generators samples softmax(top-k(logits / T)): the first
    token's empirical frequencies over 600 seeds match the probabilities (4 sigma)."""
    temperature, top_k, draws = 0.7, 4, 600
    prompt = prompts[1]
    lp = teacher_forced(model, prompt, [0], temperature)[0]
    top = lp.topk(top_k)
    probs = torch.softmax(top.values, -1)
    params = _params(temperature=temperature, top_k=top_k, max_tokens=1)
    counts = torch.zeros(top_k)
    for start in range(0, draws, 200):
        for ids, _, _ in generator.generate_batch([prompt] * 200, params, seeds=list(range(start, start + 200))):
            assert ids[0] in top.indices.tolist(), "top-k honoured"
            counts[top.indices.tolist().index(ids[0])] += 1
    freq = counts / draws
    sigma = (probs * (1 - probs) / draws).sqrt()
    assert bool(((freq - probs).abs() <= 4 * sigma + 1e-9).all()), (freq, probs)
    assert float(probs.max()) < 0.9, "non-vacuous: several tokens carry mass"


def test_server_seeded_request_same_alone_or_batched(server, prompts):
    """Through the server: a request with a seed gets the same tokens alone and among others."""
    sp = {"temperature": 1.0, "logprobs": True, "max_tokens": MAX_NEW}
    batched = _gather(server, [(p, dict(sp, seed=s)) for p, s in zip(prompts, SEEDS)])
    alone = _gather(server, [(prompts[4], dict(sp, seed=SEEDS[4]))])[0]
    assert alone.token_ids == batched[4].token_ids
    unseeded = _gather(server, [(prompts[4], dict(sp))])[0]
    assert unseeded.token_ids  # a seed is drawn from the server's generator


def test_repetition_penalty_independent_of_padding(model, generator, prompts):
    """HF's repetition penalty counts every id in ``input_ids``: the left padding must not
    penalise the pad token (an EOS) in padded rows only."""
    penalty = 1.5
    params = _params(temperature=0, max_tokens=MAX_NEW, repetition_penalty=penalty)
    batched = generator.generate_batch(prompts, params)
    plain = generator.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW))
    assert [r[0] for r in batched] != [r[0] for r in plain], "the penalty has an effect"
    for prompt, (ids, lps, _) in zip(prompts, batched):
        single = generator.generate_batch([prompt], params)[0]
        assert ids == single[0]
        torch.testing.assert_close(torch.tensor(lps), torch.tensor(single[1]), atol=1e-5, rtol=0)
        # log-probs of the penalised logits (prompt and generated tokens penalised, as vLLM)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        for t, tok_id in enumerate(ids):
            row = logits[len(prompt) - 1 + t].clone()
            seen = torch.tensor(sorted(set(prompt + ids[:t])))
            row[seen] = torch.where(row[seen] > 0, row[seen] / penalty, row[seen] * penalty)
            assert abs(torch.log_softmax(row, -1)[tok_id].item() - lps[t]) < 1e-4


def _stop_token_in_row0(rows: list[list[int]]) -> tuple[int, int]:
    """A token at position >= 2 of row 0 (first occurrence) that as few other rows as possible contain."""
    best = None
    for k, t in enumerate(rows[0]):
        if k < 2 or t in rows[0][:k]:
            continue
        others = sum(t in r for r in rows[1:])
        if best is None or others < best[2]:
            best = (t, k, others)
    assert best is not None, rows[0]
    return best[0], best[1]


def test_eos_ends_response_and_is_included(model, tok, generator, prompts):
    full = generator.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    rows = [r[0] for r in full]
    stop, k = _stop_token_in_row0(rows)
    stopper = HFGenerator(model, [stop], tok.pad_token_id)
    results = stopper.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW))
    # row 0 stops at and includes the first `stop`
    assert results[0][0] == rows[0][: k + 1]
    assert results[0][2] == "stop"
    torch.testing.assert_close(torch.tensor(results[0][1]), torch.tensor(full[0][1][: k + 1]), atol=1e-5, rtol=0)
    for (ids, lps, reason), row in zip(results, rows):
        if stop in row:
            j = row.index(stop)
            assert (ids, reason) == (row[: j + 1], "stop")
        else:  # rows without the stop token run to max_tokens, unaffected by rows that finished
            assert (ids, reason) == (row, "length")
        assert len(lps) == len(ids)
    assert any(r[2] == "length" for r in results)
    _check_finish_invariant(results, {stop}, MAX_NEW)


def test_ignore_eos_gives_exactly_max_tokens(model, tok, generator, prompts):
    full = generator.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    stop, _ = _stop_token_in_row0([r[0] for r in full])
    stopper = HFGenerator(model, [stop], tok.pad_token_id)
    ignored = stopper.generate_batch(prompts, _params(temperature=0, max_tokens=MAX_NEW, ignore_eos=True))
    assert [r[0] for r in ignored] == [r[0] for r in full]
    assert stop in ignored[0][0][:-1], "the stop token was generated and generation went on"
    for ids, lps, reason in ignored:
        assert len(ids) == len(lps) == MAX_NEW and reason == "length"
    # sampling with the model's real EOS ids
    torch.manual_seed(5)
    sampled = generator.generate_batch(prompts, _params(temperature=1.0, max_tokens=11, ignore_eos=True))
    assert all(len(r[0]) == len(r[1]) == 11 and r[2] == "length" for r in sampled)


def test_sampling_finish_invariant_with_real_eos(generator, prompts):
    torch.manual_seed(3)
    results = generator.generate_batch(prompts, _params(temperature=1.0, max_tokens=MAX_NEW))
    _check_finish_invariant(results, set(generator.eos_token_ids), MAX_NEW)


# ----------------------------------------------------------------------------- HFRolloutServer (no Ray)


def _server(model_dir, **rollout_overrides):
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import HFModelConfig, RolloutConfig

    cfg = {
        "name": "hf",
        "prompt_length": PROMPT_LENGTH,
        "response_length": RESPONSE_LENGTH,
        "max_num_seqs": 16,
        "tensor_model_parallel_size": 1,
        "engine_kwargs": {"hf": {"batch_wait_ms": 30}},
    }
    cfg.update(rollout_overrides)
    rollout_config = omega_conf_to_dataclass(cfg, dataclass_type=RolloutConfig)
    model_config = HFModelConfig(path=str(model_dir))
    return hr.HFRolloutServer(rollout_config, model_config)


@pytest.fixture(scope="module")
def server(model_dir):
    return _server(model_dir)


def _gather(server, requests):
    async def main():
        return await asyncio.gather(
            *[server.generate(p, dict(sp), f"req-{i}") for i, (p, sp) in enumerate(requests)], return_exceptions=True
        )

    return asyncio.run(main())


def test_server_reads_eos_and_pad(server, tok):
    im_end, endoftext = tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert server.generator.eos_token_ids == [im_end, endoftext]
    assert server.generator.pad_token_id == tok.pad_token_id
    assert server.generator.logprobs_mode == "processed_logprobs"  # verl's rollout.logprobs_mode default
    assert server.max_batch == 16
    assert server.batch_wait_s == pytest.approx(0.03)


def test_server_batches_concurrent_requests(server, model, tok, prompts, eos_ids):
    before = server.get_stats()
    outs = _gather(server, [(p, {"temperature": 0, "max_tokens": 12, "logprobs": True}) for p in prompts])
    after = server.get_stats()
    assert after["requests"] - before["requests"] == 8
    assert after["batches"] - before["batches"] == 1  # all 8 in one generate call
    for prompt, out in zip(prompts, outs):
        assert not isinstance(out, BaseException), out
        assert out.token_ids == plain_greedy(model, prompt, 12, eos_ids, tok.pad_token_id)
        assert out.log_probs is not None and len(out.log_probs) == len(out.token_ids)
        assert out.stop_reason == "completed"
        assert out.extra_fields["finish_reason"] == ("stop" if out.token_ids[-1] in eos_ids else "length")
    assert after["tokens"] - before["tokens"] == sum(len(o.token_ids) for o in outs)


def test_server_waits_for_staggered_requests(server, prompts):
    """Requests arriving a few ms apart (less than batch_wait_ms) still share a batch."""

    async def late(i, p):
        await asyncio.sleep(0.002 * i)
        return await server.generate(p, {"temperature": 0, "max_tokens": 4}, f"late-{i}")

    async def main():
        return await asyncio.gather(*[late(i, p) for i, p in enumerate(prompts[:5])])

    before = server.get_stats()
    outs = asyncio.run(main())
    after = server.get_stats()
    assert len(outs) == 5 and all(len(o.token_ids) >= 1 for o in outs)
    assert after["batches"] - before["batches"] == 1


def test_server_splits_mixed_sampling_params(server, model, tok, prompts, eos_ids):
    requests, expect = [], []
    for i, p in enumerate(prompts[:4]):  # group A: logprobs does not split a batch
        requests.append((p, {"temperature": 0, "max_tokens": 6, "logprobs": i % 2 == 0}))
        expect.append((6, i % 2 == 0))
    for p in prompts[4:6]:  # group B: another max_tokens
        requests.append((p, {"temperature": 0, "max_new_tokens": 10, "logprobs": True}))
        expect.append((10, True))
    for p in prompts[6:]:  # group C: sampling with top_k=1 (== greedy)
        requests.append((p, {"temperature": 1.0, "top_k": 1, "max_tokens": 6}))
        expect.append((6, False))
    order = [0, 4, 6, 1, 5, 7, 2, 3]  # interleaved arrival
    before = server.get_stats()
    outs = _gather(server, [requests[i] for i in order])
    after = server.get_stats()
    assert after["batches"] - before["batches"] == 3
    assert after["requests"] - before["requests"] == 8
    for i, out in zip(order, outs):
        assert not isinstance(out, BaseException), out
        n, want_lp = expect[i]
        assert out.token_ids == plain_greedy(model, requests[i][0], n, eos_ids, tok.pad_token_id)
        if want_lp:
            assert out.log_probs is not None and len(out.log_probs) == len(out.token_ids)
        else:
            assert out.log_probs is None


def test_server_respects_max_num_seqs(server, prompts):
    old = server.max_batch
    server.max_batch = 3
    try:
        before = server.get_stats()
        outs = _gather(server, [(p, {"temperature": 0, "max_tokens": 3}) for p in prompts])
        after = server.get_stats()
    finally:
        server.max_batch = old
    assert all(not isinstance(o, BaseException) for o in outs)
    assert after["batches"] - before["batches"] == 3  # ceil(8 / 3)


def test_server_errors(server, prompts, monkeypatch):
    # a prompt that leaves no room is rejected before queueing
    outs = _gather(server, [(list(range(PROMPT_LENGTH + RESPONSE_LENGTH)), {"temperature": 0})])
    assert isinstance(outs[0], ValueError)
    with pytest.raises(NotImplementedError):
        asyncio.run(server.generate(prompts[0], {"temperature": 0}, "img", image_data=[object()]))

    # a failing batch delivers the error to every request in it, and the server goes on
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(server.generator, "generate_batch", boom)
    outs = _gather(server, [(p, {"temperature": 0, "max_tokens": 3}) for p in prompts[:3]])
    assert all(isinstance(o, RuntimeError) and str(o) == "boom" for o in outs)
    monkeypatch.undo()
    outs = _gather(server, [(prompts[0], {"temperature": 0, "max_tokens": 3})])
    assert len(outs[0].token_ids) >= 1


def test_server_update_weights(model_dir, model, tok, prompts, eos_ids):
    srv = _server(model_dir)
    req = {"temperature": 0, "max_tokens": 10}
    before = _gather(srv, [(p, req) for p in prompts])
    assert [o.token_ids for o in before] == [plain_greedy(model, p, 10, eos_ids, tok.pad_token_id) for p in prompts]

    new_model = copy.deepcopy(model)
    _randomize(new_model, seed=99)
    state = {k: v.clone() for k, v in new_model.state_dict().items()}
    assert srv.update_weights(state, global_steps=7) == len(state)
    after = _gather(srv, [(p, req) for p in prompts])
    expected = [plain_greedy(new_model, p, 10, eos_ids, tok.pad_token_id) for p in prompts]
    assert [o.token_ids for o in after] == expected
    assert [o.token_ids for o in after] != [o.token_ids for o in before]
    assert all(o.extra_fields["global_steps"] == 7 for o in after)

    # an unknown name is rejected and nothing is loaded
    bad = {k: v * 0 for k, v in model.state_dict().items()}
    bad["model.layers.99.mlp.up_proj.weight"] = torch.zeros(3)
    with pytest.raises(KeyError):
        srv.update_weights(bad)
    still = _gather(srv, [(p, req) for p in prompts])
    assert [o.token_ids for o in still] == expected


# ----------------------------------------------------------------------------- registration


def test_register_resolves_hf(monkeypatch):
    monkeypatch.delenv("VERL_PLATFORM", raising=False)
    from verl.workers.rollout.base import BaseRollout, get_rollout_class
    from verl.workers.rollout.replica import RolloutReplica, get_rollout_replica_class

    hr.register()
    hr.register()  # idempotent
    adapter = get_rollout_class("hf")
    replica = get_rollout_replica_class("hf")
    assert adapter is hr.HFServerAdapter
    assert replica is hr.HFReplica
    assert issubclass(adapter, BaseRollout)
    assert issubclass(replica, RolloutReplica)
    assert get_rollout_class("hf", "async") is adapter
