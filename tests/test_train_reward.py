"""The reward model's grouped loss, warm start, label smoothing and accuracy interval (fast, tiny Llama)."""

import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.reward import (FEATURES_FILE, STATS_FILE, GroupBatches, RewardConfig, RewardModel, pairwise_loss, read_pairs,
                          train_reward_model, wilson_interval)
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401  (fixtures)

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "candle"]


def ranking(word: str, k: int = 4) -> list[dict]:
    """A user's ranking of k answers to one prompt as its C(k,2) pairs, best answer first."""
    answers = [f"{word} is " + "good " * (k - i) for i in range(k)]
    return [{"prompt": [{"role": "user", "content": f"Tell me about {word}."}], "chosen": answers[i], "rejected": answers[j],
             "meta": {"group": f"rank-{word}", "rank_gap": j - i}} for i in range(k) for j in range(i + 1, k)]


def lone(word: str) -> dict:
    return {"prompt": [{"role": "user", "content": f"What is {word}?"}], "chosen": f"{word} is good", "rejected": f"{word} bad"}


def test_records_without_a_group_are_their_own_group(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ranking("apple") + [lone("river"), lone("stone")]))
    for source in (path, ranking("apple") + [lone("river"), lone("stone")]):
        pairs = read_pairs(source)
        groups = [p["group"] for p in pairs]
        assert len(set(groups[:6])) == 1 and len(set(groups)) == 3


def test_a_step_takes_whole_groups_each_weighing_the_same():
    records = [p for w in WORDS[:3] for p in ranking(w)] + [lone(w) for w in WORDS[3:]]  # 3 rankings of 6 pairs, 5 lone pairs
    pairs = read_pairs(records)
    batches = GroupBatches(pairs, lambda prompt, text: [len(text)], batch_size=3)
    assert batches.per_epoch == 3
    steps = list(batches.epoch(torch.Generator().manual_seed(0)))
    assert sorted(i for s in steps for i in s["pairs"]) == list(range(len(pairs)))  # each pair once per epoch
    for s in steps:
        weight = dict(zip(s["pairs"], s["weight"].tolist()))
        groups = {pairs[i]["group"] for i in s["pairs"]}
        for g in groups:
            members = [i for i, p in enumerate(pairs) if p["group"] == g]
            assert set(members) <= set(s["pairs"])  # the whole group is in this step
            assert sum(weight[i] for i in members) == pytest.approx(1 / len(groups))  # and weighs as one element
        ranked = [g for g in groups if g.startswith("group:")]
        assert len(s["rows"]) == 4 * len(ranked) + 2 * (len(groups) - len(ranked))  # each answer scored once
        for c, r, i in zip(s["chosen"].tolist(), s["rejected"].tolist(), s["pairs"]):
            assert s["rows"][c] == [len(pairs[i]["chosen"])] and s["rows"][r] == [len(pairs[i]["rejected"])]


def test_label_smoothing_expects_some_votes_to_be_wrong():
    d = torch.tensor([-4.0, 0.0, 1.0, 10.0])
    one = torch.tensor([1.0])
    plain = [pairwise_loss(x.view(1), torch.zeros(1), 0.0, one, 0.0, 0.0) for x in d]
    smooth = [pairwise_loss(x.view(1), torch.zeros(1), 0.0, one, 0.1, 0.0) for x in d]
    assert torch.allclose(torch.stack(plain), -torch.nn.functional.logsigmoid(d))
    assert float(smooth[1]) == pytest.approx(float(plain[1]))  # at d = 0 both sides cost the same
    assert float(smooth[3]) > float(plain[3]) + 0.8  # a confident margin is no longer free: 0.1 x 10
    assert float(smooth[0]) < float(plain[0])  # and a "wrong" pair costs less
    # the loss is smallest where sigmoid(d) = 0.9, the share of votes taken to be right
    x = torch.linspace(0, 5, 501, requires_grad=False)
    losses = torch.stack([pairwise_loss(v.view(1), torch.zeros(1), 0.0, one, 0.1, 0.0) for v in x])
    assert float(x[losses.argmin()]) == pytest.approx(torch.logit(torch.tensor(0.9)).item(), abs=0.01)


def test_the_loss_weighs_each_pair_as_told():
    r_c, r_r = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0])
    loss = pairwise_loss(r_c, r_r, 0.5, torch.tensor([0.25, 0.75]), 0.0, 0.0)
    logsig = torch.nn.functional.logsigmoid
    assert float(loss) == pytest.approx(-(0.25 * float(logsig(torch.tensor(0.5))) + 0.75 * float(logsig(torch.tensor(2.5)))))


@pytest.mark.parametrize("right, n, lo, hi", [(8, 10, 0.4902, 0.9433), (0, 10, 0.0, 0.2775), (50, 100, 0.4038, 0.5962),
                                              (20, 20, 0.8389, 1.0)])
def test_wilson_interval_on_known_counts(right, n, lo, hi):
    assert wilson_interval(right, n) == pytest.approx((lo, hi), abs=1e-4)
    assert wilson_interval(0, 0) is None


@pytest.fixture(scope="module")
def grouped_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-grouped")
    records = [p for w in WORDS[:6] for p in ranking(w)]
    cfg = RewardConfig(lr=1e-2, epochs=4, batch_size=2, stats_answers=8)
    metrics = train_reward_model(tiny_model_dir, records, out, cfg, eval_records=[p for w in WORDS[6:] for p in ranking(w)], quiet=True)
    return out, metrics, records, cfg


def test_grouped_training_reports_accuracy_with_its_interval(grouped_run):
    out, metrics, records, _ = grouped_run
    assert metrics["train_groups"] == 6 and metrics["train_pairs"] == 36 and metrics["steps"] == 12  # 3 steps x 4 epochs
    assert metrics["eval_pairs"] == 12
    right = round(metrics["accuracy"] * 12)
    assert metrics["accuracy_ci95"] == pytest.approx(list(wilson_interval(right, 12)), abs=1e-4)
    assert json.loads((out / STATS_FILE).read_text())["metrics"]["accuracy_ci95"] == metrics["accuracy_ci95"]
    # the normalisation stats come from whole groups until 8 distinct answers: two rankings, not all six
    assert metrics["stats_pairs"] == 12 and metrics["train_accuracy"] > 0.5


def test_warm_start_continues_the_earlier_model(grouped_run, tiny_model_dir, tmp_path):
    out, first, records, cfg = grouped_run
    prompts = [p["prompt"] for p in records[:6]]
    answers = [p["chosen"] for p in records[:6]]
    original = RewardModel(out, tiny_model_dir).raw(prompts, answers)

    same = train_reward_model(tiny_model_dir, records, tmp_path / "zero", RewardConfig(max_steps=0), init_from=out, quiet=True,
                              eval_records=records[:6])
    assert same["steps"] == 0 and same["new_pairs"] == 0
    assert torch.allclose(RewardModel(tmp_path / "zero", tiny_model_dir).raw(prompts, answers), original, atol=1e-5)

    # new data: all of it trained, old rankings replayed one per new one
    more = records + ranking("piano") + ranking("candle")
    grown = train_reward_model(tiny_model_dir, more, tmp_path / "grown", RewardConfig(lr=1e-2, epochs=1, batch_size=2, replay=1.0),
                               init_from=out, quiet=True, eval_records=records[:6])
    assert grown["new_pairs"] == 12 and grown["replayed_pairs"] == 12 and grown["steps"] == 2  # 4 groups in steps of 2
    assert grown["init_from"] == str(out)
    assert not torch.allclose(RewardModel(tmp_path / "grown", tiny_model_dir).raw(prompts, answers), original, atol=1e-5)
    seen = json.loads((tmp_path / "grown" / "trained_pairs.json").read_text())
    assert len(seen) == len(more)



def test_a_probe_reads_only_the_answers_its_predecessor_did_not(tiny_model_dir, tmp_path):
    """A probe-only reward model saves the states it read; the next one, warm-started, reads only the
    new answers and ends where one trained from scratch on everything ends — also from a copy of the
    base model elsewhere (a moved data dir), but not from a base model with other weights."""
    cfg = RewardConfig(epochs=0)
    first, more = ranking("apple") + ranking("river"), ranking("stone") + [lone("cloud")]
    held = ranking("tiger")
    before = train_reward_model(tiny_model_dir, first, tmp_path / "first", cfg, eval_records=held, quiet=True)
    assert before["probe_answers"] == before["probe_answers_read"] == 8 and (tmp_path / "first" / FEATURES_FILE).is_file()
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved" / "model")
    warm = train_reward_model(moved, first + more, tmp_path / "warm", cfg, init_from=tmp_path / "first",
                              eval_records=held, quiet=True)
    assert warm["probe_answers"] == 14 and warm["probe_answers_read"] == 6  # the new ranking's 4 and the lone pair's 2
    scratch = train_reward_model(tiny_model_dir, first + more, tmp_path / "scratch", cfg, eval_records=held, quiet=True)
    assert scratch["probe_answers_read"] == 14
    prompts, answers = [p["prompt"] for p in held], [p["chosen"] for p in held]
    assert torch.allclose(RewardModel(tmp_path / "warm", tiny_model_dir).raw(prompts, answers),
                          RewardModel(tmp_path / "scratch", tiny_model_dir).raw(prompts, answers), atol=1e-4)
    # LoRA steps change the states: such a model saves none, and its successor reads everything
    stepped = train_reward_model(tiny_model_dir, first + more, tmp_path / "stepped", RewardConfig(max_steps=1),
                                 init_from=tmp_path / "first", eval_records=held, quiet=True)
    assert stepped["steps"] == 1 and not (tmp_path / "stepped" / FEATURES_FILE).exists()
    after = train_reward_model(tiny_model_dir, first + more + ranking("piano"), tmp_path / "after", cfg,
                               init_from=tmp_path / "stepped", eval_records=held, quiet=True)
    assert after["probe_answers_read"] == 18
    other = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        other.get_input_embeddings().weight[0, 0] += 1.0
    other.save_pretrained(tmp_path / "other")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "other")
    elsewhere = train_reward_model(tmp_path / "other", first + more, tmp_path / "elsewhere", cfg,
                                   init_from=tmp_path / "first", eval_records=held, quiet=True)
    assert elsewhere["probe_answers_read"] == 14
