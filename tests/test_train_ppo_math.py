"""PPO's arithmetic on plain tensors: GAE, whitening, per-token rewards, EOS handling, KL control."""

import math

import pytest
import torch

from train.ppo import AdaptiveKL, PPOConfig, gae, grouped_scores, stop_kl, token_rewards, truncate_at_eos, whiten


def reference_gae(rewards, values, gamma, lam):
    """Textbook GAE over one finished sequence (value after the end = 0)."""
    T = len(rewards)
    adv = [0.0] * T
    for t in range(T):
        total = 0.0
        for k in range(t, T):
            next_v = values[k + 1] if k + 1 < T else 0.0
            delta = rewards[k] + gamma * next_v - values[k]
            total += (gamma * lam) ** (k - t) * delta
        adv[t] = total
    return adv


def test_gae_matches_the_textbook_and_ignores_padding():
    torch.manual_seed(0)
    rewards, values = torch.randn(2, 6), torch.randn(2, 6)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]], dtype=torch.float)
    adv, ret = gae(rewards, values, mask, 1.0, 0.95)
    for row, n in ((0, 6), (1, 3)):
        want = reference_gae(rewards[row, :n].tolist(), values[row, :n].tolist(), 1.0, 0.95)
        assert torch.allclose(adv[row, :n], torch.tensor(want), atol=1e-5)
        assert torch.allclose(ret[row, :n], adv[row, :n] + values[row, :n])
    assert adv[1, 3:].abs().sum() == 0 and ret[1, 3:].abs().sum() == 0


def test_whiten_normalises_only_real_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 6.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.float)
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert abs(real.mean()) < 1e-5 and abs(real.std(unbiased=False) - 1) < 1e-3 and w[:, 3].abs().sum() == 0


def test_score_lands_on_the_last_token_and_kl_is_penalised_everywhere():
    kl = torch.ones(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float)
    r = token_rewards(torch.tensor([2.0, -1.0]), kl, mask, kl_coef=0.1)
    assert torch.allclose(r, torch.tensor([[-0.1, -0.1, -0.1, 1.9], [-0.1, -1.1, 0.0, 0.0]]))


def test_grouped_scores_take_each_answer_against_the_other_answers_to_its_prompt():
    scores = torch.tensor([3.0, 1.0, 2.0, 10.0, 10.0, 13.0])  # two prompts, three answers each
    out = grouped_scores(scores, 3)
    leave_one_out = [s - (sum(g) - s) / 2 for g in ([3.0, 1.0, 2.0], [10.0, 10.0, 13.0]) for s in g]
    assert torch.allclose(out, torch.tensor(leave_one_out))
    assert torch.allclose(out[3:], grouped_scores(scores[3:] - 9.0, 3))  # how easy a prompt is drops out
    assert torch.equal(grouped_scores(scores, 1), scores)


def test_stop_kl_prices_only_positions_where_the_policy_is_less_ready_to_end_than_the_reference():
    ref = torch.tensor([[0.5, 0.1, 0.01]]).log()
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    assert stop_kl(ref, ref, mask).item() == 0
    assert stop_kl(torch.tensor([[0.9, 0.5, 0.2]]).log(), ref, mask).item() == 0  # ending sooner costs nothing
    later = torch.tensor([[0.25, 0.1, 0.001]])
    expected = sum(r * math.log(r / q) + (1 - r) * math.log((1 - r) / (1 - q)) for r, q in ((0.5, 0.25), (0.01, 0.001)))
    assert stop_kl(later.log(), ref, mask).item() == pytest.approx(expected, rel=1e-4)
    assert stop_kl(later.log(), ref, torch.tensor([[0.0, 1.0, 1.0]])).item() < expected  # padding costs nothing
    with pytest.raises(ValueError, match="stop_floor"):
        PPOConfig(stop_floor=-1)


def test_samples_per_prompt_must_divide_the_batch():
    assert PPOConfig(batch_size=8, samples_per_prompt=4).samples_per_prompt == 4
    for bad in (0, 3):
        with pytest.raises(ValueError, match="samples_per_prompt"):
            PPOConfig(batch_size=8, samples_per_prompt=bad)


def test_truncate_at_eos():
    eos, pad = 2, 0
    resp = torch.tensor([[5, 6, 2, 7, 2], [5, 6, 7, 8, 9], [2, 3, 4, 5, 6]])
    out, mask, ended = truncate_at_eos(resp, eos, pad)
    assert out.tolist() == [[5, 6, 2, 0, 0], [5, 6, 7, 8, 9], [2, 0, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_adaptive_kl_moves_towards_target_and_fixed_stays():
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    ctl.update(kl=5.0, n=10)
    assert ctl.coef > 0.1
    high = ctl.coef
    ctl.update(kl=0.1, n=10)
    assert ctl.coef < high
    fixed = AdaptiveKL(0.1, target=None, horizon=100)
    fixed.update(kl=50.0, n=10)
    assert fixed.coef == 0.1
