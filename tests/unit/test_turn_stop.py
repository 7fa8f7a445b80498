"""Stop at the end of the assistant turn, and processed behaviour log-probs (issue 16).

A tiny Qwen2 with the real Qwen2.5 tokenizer, made "base-style" (tokenizer and generation
config name only ``<|endoftext|>`` as EOS, as Qwen2.5 base checkpoints do), is forced to
write an answer, ``<|im_end|>``, an invented next turn with another box, then
``<|endoftext|>``. With the turn-end stop (:func:`turn_stop_token_ids`, used by the eval
backends and the hf rollout server) the response ends at ``<|im_end|>`` and the graded
box is the first one; with the EOS alone it runs into the invented turn.

The log-prob tests force fixed logits and compare the recorded behaviour log-probs with
values computed by hand for both ``logprobs_mode`` values.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from recipe import models
from recipe.reward.answers import last_boxed
from tests.paths import require
from verl_patches.hf_rollout import HFGenerator, normalize_sampling_params, processed_log_probs, turn_stop_token_ids

ENDOFTEXT, IM_END = 151643, 151645
SCRIPT = "So \\boxed{1}.<|im_end|>\n<|im_start|>user\nAgain?<|im_end|>\n<|im_start|>assistant\n\\boxed{2}<|endoftext|>"


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2 + Qwen2.5 tokenizer whose tokenizer and generation config say EOS = <|endoftext|>."""
    require(models.default_qwen_tokenizer_path())
    out = models.build_tiny_model(tmp_path_factory.mktemp("turn_stop") / "tiny", tokenizer="qwen2.5",
                                  hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=32)
    tc = out / "tokenizer_config.json"
    cfg = json.loads(tc.read_text())
    cfg["eos_token"] = "<|endoftext|>"
    tc.write_text(json.dumps(cfg))
    gc = out / "generation_config.json"
    gen = json.loads(gc.read_text()) if gc.exists() else {}
    gen["eos_token_id"] = ENDOFTEXT
    gc.write_text(json.dumps(gen))
    return out


@pytest.fixture(scope="module")
def tok(base_model_dir):
    from transformers import AutoTokenizer

    t = AutoTokenizer.from_pretrained(str(base_model_dir))
    assert t.eos_token_id == ENDOFTEXT and t.convert_tokens_to_ids("<|im_end|>") == IM_END
    return t


def _force(model, prompt_len: int, script: list[int] | None = None, logits: torch.Tensor | None = None):
    """Makes ``model`` emit ``script`` token by token (or score ``logits`` at every step)."""
    orig = model.forward
    state = {"step": 0}

    def forced(*args, **kwargs):
        out = orig(*args, **kwargs)
        last = out.logits[:, -1, :]
        if logits is not None:
            last.copy_(logits.to(last.dtype).expand_as(last))
        else:
            # the prefill call sees the whole prompt; every later call one new token
            state["step"] = 0 if kwargs["input_ids"].shape[1] == prompt_len else state["step"] + 1
            step = state["step"]
            last.fill_(-1e9)
            last[:, script[min(step, len(script) - 1)]] = 0.0
        return out

    model.forward = forced


def test_turn_stop_token_ids(tok):
    assert turn_stop_token_ids(tok, ENDOFTEXT) == [ENDOFTEXT, IM_END]
    assert turn_stop_token_ids(tok, [ENDOFTEXT, IM_END]) == [ENDOFTEXT, IM_END]
    assert turn_stop_token_ids(None, 7) == [7]

    class NoChatML:  # a chat template without <|im_end|>: not a stop token
        eos_token_id, unk_token_id, chat_template = 2, None, "{{ messages }}"

        def convert_tokens_to_ids(self, t):
            return 99

    assert turn_stop_token_ids(NoChatML(), None) == [2]


def test_base_model_stops_at_im_end(base_model_dir, tok):
    from recipe.eval import HFBackend

    prompt = tok.apply_chat_template([{"role": "user", "content": "1?"}], add_generation_prompt=True, tokenize=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    script = tok.encode(SCRIPT, add_special_tokens=False)
    assert IM_END in script and script[-1] == ENDOFTEXT

    backend = HFBackend(base_model_dir, tok, temperature=0.0, top_p=1.0, max_tokens=64, batch_size=4, seed=0)
    assert backend.stop_token_ids == [ENDOFTEXT, IM_END]
    _force(backend.model, len(prompt_ids), script)
    [[(ids, reason)]] = backend.generate([prompt_ids], 1)
    assert ids == script[: script.index(IM_END) + 1] and reason == "stop"
    response = tok.decode(ids, skip_special_tokens=True)
    assert response == "So \\boxed{1}." and last_boxed(response) == "1"

    # EOS alone (the old behaviour): the response runs into the invented turn, whose box is graded
    eos_only = HFGenerator(backend.model, [ENDOFTEXT], tok.pad_token_id)
    params = normalize_sampling_params({"temperature": 0.0, "max_tokens": 64}, len(prompt_ids), 64, 64)
    [(ids2, _, reason2)] = eos_only.generate_batch([prompt_ids], params)
    assert ids2 == script and reason2 == "stop"
    assert last_boxed(tok.decode(ids2, skip_special_tokens=True)) == "2"

    # a request's stop_token_ids (verl's sampling params) stop the EOS-only generator too
    params = normalize_sampling_params({"temperature": 0.0, "max_tokens": 64, "stop_token_ids": [IM_END]},
                                       len(prompt_ids), 64, 64)
    [(ids3, _, _)] = eos_only.generate_batch([prompt_ids], params)
    assert ids3 == ids


def test_processed_log_probs_hand_computed():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    # T = 1, top-p 0.7: softmax = [0.644, 0.237, 0.087, 0.032]; the nucleus is {0, 1}
    lp = processed_log_probs(logits, 1.0, -1, 0.7)
    assert lp[0, 0].item() == pytest.approx(-math.log(1 + math.exp(-1)), abs=1e-6)  # -0.313262
    assert lp[0, 1].item() == pytest.approx(-1 - math.log(1 + math.exp(-1)), abs=1e-6)  # -1.313262
    assert torch.isinf(lp[0, 2:]).all()
    # T = 0.5, top-k 2: logits / T = [4, 2, 0, -2], kept {0, 1}: log(e^4 / (e^4 + e^2)) = -0.126928
    lp = processed_log_probs(logits, 0.5, 2, 1.0)
    assert lp[0, 0].item() == pytest.approx(-math.log(1 + math.exp(-2)), abs=1e-6)
    # nothing cut: log_softmax(logits / T)
    assert torch.allclose(processed_log_probs(logits, 0.7), torch.log_softmax(logits / 0.7, -1))


@pytest.mark.parametrize("seeded", [False, True])
def test_generator_records_processed_log_probs(base_model_dir, tok, seeded):
    """Forced logits [2, 1, 0] on tokens a, b, c (all others -1e9), T = 1, top-p 0.7: every drawn
    token is a or b; processed: -0.313262 / -1.313262; raw: 2 - log(e^2 + e + 1) = -0.407606 / -1.407606."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_model_dir), dtype=torch.float32).eval()
    a, b, c = 100, 200, 300
    forced = torch.full((model.config.vocab_size,), -1e9)
    forced[a], forced[b], forced[c] = 2.0, 1.0, 0.0
    _force(model, 0, logits=forced)
    prompts = [tok.encode("hello", add_special_tokens=False)] * 4
    params = normalize_sampling_params({"temperature": 1.0, "top_p": 0.7, "max_tokens": 6, "logprobs": True}, 1, 8, 8)
    seeds = [1, 2, 3, 4] if seeded else None
    norm = math.log(math.exp(2) + math.exp(1) + 1)
    expected = {
        "processed_logprobs": {a: -math.log(1 + math.exp(-1)), b: -1 - math.log(1 + math.exp(-1))},
        "raw_logprobs": {a: 2 - norm, b: 1 - norm},
    }
    for mode, want in expected.items():
        gen = HFGenerator(model, [ENDOFTEXT], tok.pad_token_id, logprobs_mode=mode)
        torch.manual_seed(0)
        seen = set()
        for ids, lps, reason in gen.generate_batch(prompts, params, seeds):
            assert reason == "length" and len(ids) == len(lps) == 6
            for t, lp in zip(ids, lps):
                assert t in want, (mode, t)
                assert lp == pytest.approx(want[t], abs=1e-5), (mode, t)
                seen.add(t)
        assert seen == {a, b}, (mode, seen)
    with pytest.raises(ValueError, match="logprobs_mode"):
        HFGenerator(model, [ENDOFTEXT], 0, logprobs_mode="raw_logits")


def test_training_rollouts_get_turn_stop_ids(tok):
    """verl_patches.seeding's agent-loop wrap adds the turn-end stop ids to every request's sampling params."""
    import asyncio
    from types import SimpleNamespace

    from verl_patches import seeding

    calls = []

    async def original(self, sampling_params, trajectory, **kwargs):
        calls.append(sampling_params)

    wrapped = seeding._seeding(original)

    def worker(custom):
        return SimpleNamespace(tokenizer=tok, rollout_config={"seed": 0, "custom": custom},
                               model_config=SimpleNamespace(generation_config=SimpleNamespace(eos_token_id=ENDOFTEXT)))

    asyncio.run(wrapped(worker({}), {"temperature": 1.0, "stop_token_ids": [5]}, None, uid="u", session_id=0))
    assert calls[-1]["stop_token_ids"] == [5, ENDOFTEXT, IM_END] and "seed" in calls[-1]
    asyncio.run(wrapped(worker({"stop_at_turn_end": False}), {"temperature": 1.0}, None, uid="u", session_id=0))
    assert "stop_token_ids" not in calls[-1]
    # a worker without a tokenizer (nothing to derive): unchanged
    assert seeding.stop_params({"t": 1}, {}, []) == {"t": 1}
