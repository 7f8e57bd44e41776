"""The faster passes compute what the plain ones do: log-probs without the full log-softmax, minibatches
without their shared padding, the LM head on contiguous hidden states."""

import pytest
import torch

import hardware
from train import common
from train.ppo import PPOConfig, ValueHead, forward, generate, load_policy, response_logprobs, tight, token_logprobs, truncate_at_eos
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401  (fixtures)

PROMPTS = [[{"role": "user", "content": text}] for text in ("Hi.", "Tell me a long story about a cat and a dog.", "Why?", "Name a fruit.")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_logprobs_match_the_full_log_softmax(dtype):
    torch.manual_seed(0)
    logits = (torch.randn(3, 5, 1000) * 4).to(dtype)
    tokens = torch.randint(0, 1000, (3, 5))
    logp, entropy = token_logprobs(logits, tokens, 0.7, with_entropy=True)
    full = torch.log_softmax(logits.float() / 0.7, -1)
    assert torch.allclose(logp, full.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), atol=1e-5)
    assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-4)


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
        logp, values, entropy = forward(model, head, *args, batch["responses"], 0.7, with_entropy=True)
        full, hidden = response_logprobs(model, *args, 0.7)
        assert torch.allclose(logp, full.gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1), atol=1e-5)
        assert torch.allclose(entropy, -(full.exp() * full).sum(-1), atol=1e-4) and torch.allclose(values, head(hidden))
        # The contiguity hook changes no token: greedy answers are those of transformers' own generate.
        ids, attn = batch["seq"][:, : batch["prompt_len"]], batch["attn"][:, : batch["prompt_len"]]
        plain = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert torch.equal(plain[:, batch["prompt_len"]:], batch["seq"][:, batch["prompt_len"]:])
