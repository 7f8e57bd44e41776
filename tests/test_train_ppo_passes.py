"""The faster passes compute what the plain ones do: log-probs without the full log-softmax, minibatches
without their shared padding, the LM head on contiguous hidden states, sampling by inverse CDF with the
policy's figures taken from the sampling pass, adapters in bf16 while sampling."""

import pytest
import torch

import hardware
from train import common
from train.ppo import (PPOConfig, Sampler, ValueHead, forward, generate, load_policy, response_logprobs, tight, token_logprobs,
                       truncate_at_eos)
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401  (fixtures)

PROMPTS = [[{"role": "user", "content": text}] for text in ("Hi.", "Tell me a long story about a cat and a dog.", "Why?", "Name a fruit.")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_the_full_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1000) * 4).to(dtype)
    tokens = torch.randint(0, 1000, (3, 5))
    logp = token_logprobs(logits, tokens, 0.7)
    full = torch.log_softmax(logits.float() / 0.7, -1)
    assert torch.allclose(logp, full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), atol=1e-5)


@pytest.fixture(scope="module")
def policy(tiny_model_dir):  # noqa: F811
    """A float32 tiny policy with a non-zero adapter, its value head and tokenizer."""
    model = load_policy(tiny_model_dir, PPOConfig(), device=torch.device("cpu"), dtype=hardware.choose("float32").torch_dtype)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    head = ValueHead(model.get_base_model().config.hidden_size)
    torch.nn.init.normal_(head.linear.weight, 0, 0.1)
    return model.eval(), head, common.load_tokenizer(tiny_model_dir)


def test_a_minibatch_without_its_shared_padding_gives_the_same_logprobs_and_values(policy):
    model, head, tok = policy
    torch.manual_seed(0)
    batch = generate(model, tok, PROMPTS, 12, 1.0)
    # Rows 0 and 2 (the short prompts) end early: both sides of them are padding the other rows need.
    P, responses = batch["prompt_len"], batch["responses"].clone()
    responses[0, 3] = responses[2, 5] = tok.eos_token_id
    responses, mask, _ = truncate_at_eos(responses, tok.eos_token_id, tok.pad_token_id)
    batch.update(responses=responses, mask=mask, seq=torch.cat([batch["seq"][:, :P], responses], 1))
    rows = torch.tensor([0, 2])
    seq, attn, prompt_len, responses, width = tight(batch, rows)
    assert width == 6 and prompt_len < P
    with torch.no_grad():
        full = forward(model, head, batch["seq"][rows], batch["attn"][rows], batch["prompt_len"], batch["responses"][rows], 0.7)
        cut = forward(model, head, seq, attn, prompt_len, responses, 0.7)
    mask = batch["mask"][rows, :width].bool()
    for a, b in zip(full[:2], cut[:2]):
        assert torch.allclose(a[:, :width][mask], b[mask], atol=1e-4)


def test_the_policy_pass_matches_the_full_log_softmax_and_sampling_matches_plain_generate(policy):
    model, head, tok = policy
    with torch.no_grad():
        batch = generate(model, tok, PROMPTS, 12, 0.0)
        args = (batch["seq"], batch["attn"], batch["prompt_len"])
        logp, values, stop = forward(model, head, *args, batch["responses"], 0.7, tok.eos_token_id)
        full, hidden = response_logprobs(model, *args, 0.7)
        assert torch.allclose(logp, full.gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1), atol=1e-5)
        assert torch.allclose(stop, full[..., tok.eos_token_id], atol=1e-5)
        assert torch.allclose(values, head(hidden))
        # The contiguity hook changes no token: greedy answers are those of transformers' own generate.
        ids, attn = batch["seq"][:, : batch["prompt_len"]], batch["attn"][:, : batch["prompt_len"]]
        plain = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(plain[:, batch["prompt_len"]:], batch["seq"][:, batch["prompt_len"]:])


def test_the_sampler_draws_from_the_tempered_distribution_and_keeps_its_figures():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(20_000, 1)
    sampler = Sampler(0.7)
    out = sampler(None, logits)
    tokens = out.argmax(-1)
    assert torch.equal(out.gather(-1, tokens[:, None]), torch.zeros(len(tokens), 1))  # the drawn token is the only one left
    assert torch.isinf(out).sum() == out.numel() - len(out)
    expected = torch.softmax(logits[0] / 0.7, -1)
    freq = torch.bincount(tokens, minlength=5) / len(tokens)
    assert freq[4] == 0  # never a token of probability 0
    assert torch.allclose(freq, expected, atol=0.015), (freq, expected)  # 4-5 standard errors at 20k draws
    assert torch.allclose(sampler.logprobs[0], expected.log()[tokens], atol=1e-6)
    assert torch.allclose(sampler.entropy[0], -(expected[:4] * expected[:4].log()).sum(), atol=1e-6)


def test_the_sampling_pass_gives_the_policy_passs_logprobs_values_and_entropy(policy):
    """In float32 what generate() records while sampling is what a separate pass of the policy computes."""
    model, head, tok = policy
    torch.manual_seed(1)
    with torch.no_grad():
        batch = generate(model, tok, PROMPTS, 12, 0.7)
        args = (batch["seq"], batch["attn"], batch["prompt_len"])
        logp, values, _ = forward(model, head, *args, batch["responses"], 0.7)
        full, _ = response_logprobs(model, *args, 0.7)
        entropy = -(full.exp() * full).sum(-1)
        mask = batch["mask"].bool()
        assert batch["hidden"].shape[:2] == batch["responses"].shape
        assert torch.allclose(batch["logprobs"][mask], logp[mask], atol=1e-4)
        assert torch.allclose(head(batch["hidden"])[mask], values[mask], atol=1e-4)
        assert torch.allclose(batch["entropy"][mask], entropy[mask], atol=1e-3)


def test_sampling_a_bf16_policy_leaves_its_float32_adapter_as_it_was(tiny_model_dir):  # noqa: F811
    model = load_policy(tiny_model_dir, PPOConfig(), device=torch.device("cpu"), dtype=torch.bfloat16)
    lora = {name: p for name, p in model.named_parameters() if "lora_" in name}
    with torch.no_grad():
        for p in lora.values():
            p.normal_(0, 0.05)
    before = {name: p.detach().clone() for name, p in lora.items()}
    assert {p.dtype for p in before.values()} == {torch.float32}  # peft's own choice on a bf16 model
    generate(model, common.load_tokenizer(tiny_model_dir), PROMPTS, 6, 0.7)
    assert all(p.dtype == torch.float32 and torch.equal(p, before[name]) for name, p in model.named_parameters() if name in lora)
