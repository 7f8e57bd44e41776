"""The gate's capability guard (the alignment tax) and its KL checks: a candidate that lost what the
serving policy could do is rejected, one that kept it passes, one no worse than a serving version that
had already lost them is rejected against the base model, and KL is judged against the policy being
replaced, KL to the base model against a wider bound.

Fast tests on a tiny random Llama with a small capability set written here; the slow one uses the
real 135M model, the shipped set and an adapter trained in the test to answer everything with one word."""

import json
import shutil

import pytest
import torch

from train import evaluate
from train.evaluate import CAPABILITIES, GateConfig, evaluate_adapter, passes, read_capabilities
from train.sft import SFTConfig, train_sft
from train_fixtures import real_model_dir, tiny_model_dir  # noqa: F401  (fixtures)

ITEMS = [
    {"prompt": "Name the red fruit.", "reference": "apple", "contains_any": ["apple"]},
    {"prompt": "Name the long water.", "reference": "river", "contains_any": ["river"]},
    {"prompt": "Name the hard thing.", "reference": "stone", "contains_any": ["stone"]},
    {"prompt": "Name the white sky thing.", "reference": "cloud", "contains_any": ["cloud"]},
]
ONE_WORD = "Okay"
# Only the capability checks and the KL checks: no canaries, no reward model. Nearly greedy: over its 49k-token
# vocabulary the tiny model's trained answer is the likeliest token but far from a likely one.
FAST = dict(max_new_tokens=4, canaries=(), capability_max_new_tokens=4, batch_size=4, temperature=0.01)


def demos(answer=None, repeat=8):
    """The capability prompts answered with their references, or all with `answer`."""
    return [{"messages": [{"role": "user", "content": it["prompt"]},
                          {"role": "assistant", "content": answer or it["reference"]}]} for it in ITEMS] * repeat


@pytest.fixture(scope="module")
def capability_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("caps") / "capabilities.jsonl"
    path.write_text("".join(json.dumps(it) + "\n" for it in ITEMS))
    return path


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):  # noqa: F811
    """`serving` answers the capability items; `one_word` is it trained on to answer everything "Okay";
    `kept` is it trained a little more on its own answers."""
    root = tmp_path_factory.mktemp("adapters")
    train_sft(tiny_model_dir, demos(), root / "serving", SFTConfig(lr=5e-3, epochs=12, batch_size=8), quiet=True)
    train_sft(tiny_model_dir, demos(ONE_WORD), root / "one_word", SFTConfig(lr=5e-3, epochs=6, batch_size=8),
              init_adapter=root / "serving", quiet=True)
    train_sft(tiny_model_dir, demos(repeat=1), root / "kept", SFTConfig(lr=1e-4, max_steps=1, batch_size=4),
              init_adapter=root / "serving", quiet=True)
    return root


def gate(tiny_model_dir, adapters, capability_file, candidate, **cfg):  # noqa: F811
    return evaluate_adapter(tiny_model_dir, adapters / candidate, prompts=[it["prompt"] for it in ITEMS],
                            baseline_adapter=adapters / "serving",
                            cfg=GateConfig(**{**FAST, "capabilities": str(capability_file), **cfg}))


def test_the_shipped_set_reads_and_its_checks_match_at_a_word_start():
    items = read_capabilities(CAPABILITIES)
    assert 40 <= len(items) <= 60 and len({it["prompt"] for it in items}) == len(items)
    kinds = [it["kind"] for it in items]
    assert set(kinds) == {"facts", "arithmetic", "instructions", "explanations"} and min(map(kinds.count, kinds)) >= 6
    assert all(passes(it["reference"], it["contains_any"]) for it in items)  # every reference passes its own check
    assert passes("The capital is PARIS.", ["Paris"]) and not passes("Lyon", ["Paris"])
    assert passes("Ice is less dense.", ["dens"]) and passes("Its density is lower.", ["dens"])
    assert not passes("Steam condenses.", ["dens"]) and not passes("a long shot", ["hot"])
    assert passes("It is 5.", ["5"]) and passes("$5", ["5"]) and not passes("15", ["5"]) and not passes("50", ["5"])
    assert passes("100°C", ["100"]) and not passes("1000 degrees", ["100"])


def test_an_explanation_passes_in_plain_words_and_a_restated_question_never_passes():
    """Run AK (bench/RESULTS.md): a taste for plain words said "by absorbing it from the soil" and failed "root";
    the answers that had lost their content restated the question."""
    items = {it["prompt"]: it["contains_any"] for it in read_capabilities(CAPABILITIES)}
    assert not [p for p, strings in items.items() if passes(p, strings)]  # the question alone never passes
    plain = {"How does a plant drink water?": "It drinks by absorbing it from the soil.",
             "Why does ice float on water?": "Ice is lighter than the same amount of water.",
             "How does the heart move blood around the body?": "It beats and squeezes the blood along."}
    lost = {"How does a plant drink water?": "A plant drinks water!",
            "How does the heart move blood around the body?": "The heart moves blood around the body!",
            "Why do we sweat?": "There's a secret recipe for sweat!"}
    assert all(passes(answer, items[p]) for p, answer in plain.items())
    assert not any(passes(answer, items[p]) for p, answer in lost.items())


def test_a_candidate_that_lost_its_capabilities_is_rejected(tiny_model_dir, adapters, capability_file):  # noqa: F811
    verdict = gate(tiny_model_dir, adapters, capability_file, "one_word")
    checks, figures = verdict["checks"], verdict["figures"]
    assert figures["capability_items"] == len(ITEMS) and figures["capability_pass_baseline"] >= 0.75
    assert checks["capability_pass"]["passed"] is False and checks["capability_pass"]["value"] < 0.5
    assert checks["capability_loglik"]["passed"] is False
    assert checks["capability_loglik"]["value"] < figures["capability_loglik_baseline"] - 0.2
    assert not verdict["passed"]
    lost = verdict["capability_lost"]
    assert lost and all(ONE_WORD in x["answer"] for x in lost) and {x["prompt"] for x in lost} <= {it["prompt"] for it in ITEMS}


def test_a_candidate_that_kept_them_passes(tiny_model_dir, adapters, capability_file):  # noqa: F811
    verdict = gate(tiny_model_dir, adapters, capability_file, "kept")
    checks = verdict["checks"]
    assert checks["capability_pass"]["passed"] and checks["capability_loglik"]["passed"], checks
    # what the serving version answers every time is kept (an item it answers half the time may come and go)
    assert all(x["baseline_pass_rate"] < 1 for x in verdict["capability_lost"]), verdict["capability_lost"]
    # the threshold is the baseline's figure less the allowed drop and one standard error of the paired difference
    loglik = checks["capability_loglik"]
    assert loglik["se"] > 0 and loglik["threshold"] == pytest.approx(verdict["figures"]["capability_loglik_baseline"] - 0.1 - loglik["se"])
    assert loglik["kind"] == evaluate.DEFAULT_KIND and list(loglik["kinds"]) == [evaluate.DEFAULT_KIND]  # items name no kind
    # and it is held to the base model too: the tiny random base answers nothing, so that allowance is easily met
    base = checks["capability_loglik_base"]
    assert base["passed"] and base["threshold"] < verdict["figures"]["capability_loglik_base_model"]
    assert verdict["figures"]["capability_loglik_base_model"] < loglik["threshold"]


def test_a_loss_in_one_kind_of_item_is_not_hidden_by_a_gain_in_another():
    """Pass rates of eight items in two kinds: the candidate loses the first kind and gains the second. Over all
    items it is no worse, and pooled it would pass; kind by kind it fails on the kind it lost."""
    old = torch.tensor([1.0, 1.0, 0.75, 1.0, 0.0, 0.25, 0.0, 0.0])
    new = torch.tensor([0.25, 0.0, 0.25, 0.5, 1.0, 0.75, 1.0, 0.75])
    kinds = ["facts"] * 4 + ["explanations"] * 4
    assert evaluate._paired(new, old, 0.1, 1.0)["passed"]
    check = evaluate._paired_by_kind(new, old, kinds, 0.1, 1.0)
    assert check["passed"] is False and check["kind"] == "facts" and check["value"] == 0.25 and check["baseline"] == 0.9375
    assert check["kinds"]["explanations"]["passed"] and check["kinds"]["explanations"]["value"] == 0.875
    diff = new[:4] - old[:4]
    assert check["threshold"] == pytest.approx(0.9375 - 0.1 - float(diff.std()) / 2)
    assert evaluate._paired_by_kind(new, new, kinds, 0.1, 1.0)["passed"]  # the same version passes


def test_the_gate_judges_each_kind_and_names_what_was_lost(tiny_model_dir, adapters, tmp_path):  # noqa: F811
    kinded = tmp_path / "kinds.jsonl"
    kinded.write_text("".join(json.dumps({**it, "kind": "first" if i < 2 else "last"}) + "\n" for i, it in enumerate(ITEMS)))
    verdict = gate(tiny_model_dir, adapters, kinded, "one_word")
    check = verdict["checks"]["capability_pass"]
    assert check["passed"] is False and set(check["kinds"]) == {"first", "last"} and check["kind"] in check["kinds"]
    assert not any(c["passed"] for c in check["kinds"].values())  # it lost every item, so every kind
    assert check["value"] == check["kinds"][check["kind"]]["value"]
    assert {x["kind"] for x in verdict["capability_lost"]} <= {"first", "last"} and verdict["capability_lost"]
    kept = gate(tiny_model_dir, adapters, kinded, "kept")["checks"]["capability_pass"]
    assert kept["passed"] and all(c["passed"] for c in kept["kinds"].values())


def test_pass_rates_are_shares_of_sampled_answers_and_a_judged_version_is_not_sampled_again(
        tiny_model_dir, adapters, capability_file, monkeypatch, tmp_path):  # noqa: F811
    """A version judged as the candidate keeps its figures in the cache folder, under its weights' digest,
    for the gate (in this process or the next) that judges the next candidate against it; sampled again,
    they are the same, wherever the model lies. The folder keeps the newest KEEP_PASS_RATES."""
    samples = []
    real = evaluate._samples
    monkeypatch.setattr(evaluate, "_samples", lambda *a, **k: samples.append(len(a[2])) or real(*a, **k))
    cache = tmp_path / "cache"
    first = gate(tiny_model_dir, adapters, capability_file, "one_word", capability_samples=3, cache_dir=str(cache))
    # candidate, baseline and base model, 3 answers an item; then the candidate's held-out answers (no reward model)
    assert sum(samples) == 3 * 3 * len(ITEMS) + len(ITEMS)
    assert len(list(cache.glob("capabilities-*.json"))) == 3
    for x in first["capability_lost"]:
        assert x["pass_rate"] in (0, 1 / 3) and x["baseline_pass_rate"] - x["pass_rate"] >= evaluate.LOST_BY
    samples.clear()
    # one_word now serves; a candidate with the same weights in another folder is judged against it, on a
    # copy of the base model elsewhere (a moved data dir)
    copy = adapters.parent / "one_word_copy"
    if not copy.exists():
        shutil.copytree(adapters / "one_word", copy)
    moved = shutil.copytree(tiny_model_dir, tmp_path / "moved" / "model")
    cfg = GateConfig(**{**FAST, "capabilities": str(capability_file), "capability_samples": 3, "cache_dir": str(cache)})
    second = evaluate_adapter(moved, copy, prompts=[it["prompt"] for it in ITEMS], baseline_adapter=adapters / "one_word",
                              cfg=cfg)
    assert sum(samples) == len(ITEMS)  # held-out answers only: all three's capability answers came from the first gate
    assert second["figures"]["capability_pass_baseline"] == first["figures"]["capability_pass_candidate"]
    assert second["figures"]["capability_pass_base_model"] is not None
    samples.clear()
    monkeypatch.setattr(evaluate, "KEEP_PASS_RATES", 2)  # a new folder, and room for two of the three
    again = gate(tiny_model_dir, adapters, capability_file, "one_word", capability_samples=3, cache_dir=str(tmp_path / "small"))
    assert sum(samples) == 3 * 3 * len(ITEMS) + len(ITEMS)
    assert len(list((tmp_path / "small").glob("capabilities-*.json"))) == 2
    assert again["checks"]["capability_pass"] == first["checks"]["capability_pass"]


def test_kl_is_judged_against_the_policy_replaced_and_the_base_against_a_wider_bound(tiny_model_dir, adapters,  # noqa: F811
                                                                                    capability_file):
    """The candidate is the serving adapter itself: no KL to what it replaces, plenty to the base model."""
    same = gate(tiny_model_dir, adapters, capability_file, "serving", max_kl=1e-3, capabilities=None)
    checks = same["checks"]
    assert checks["kl"]["value"] == pytest.approx(0.0, abs=1e-4) and checks["kl"]["passed"]
    assert checks["kl_base"]["value"] > 0.1 and checks["kl_base"]["threshold"] == GateConfig().max_kl_base
    assert checks["capability_pass"]["passed"] is None and "no capability set" in checks["capability_pass"]["skipped"]
    walled = gate(tiny_model_dir, adapters, capability_file, "serving", max_kl_base=0.1, capabilities=None)
    assert walled["checks"]["kl"]["passed"] and walled["checks"]["kl_base"]["passed"] is False and not walled["passed"]
    # With the base model serving, the two KLs are one figure.
    first = evaluate_adapter(tiny_model_dir, adapters / "serving", prompts=[it["prompt"] for it in ITEMS],
                             cfg=GateConfig(**FAST, capabilities=None))
    assert first["checks"]["kl"]["value"] == first["checks"]["kl_base"]["value"] > 0.1


def test_with_the_base_model_serving_the_base_comparisons_are_skipped(tiny_model_dir, adapters, capability_file):  # noqa: F811
    verdict = evaluate_adapter(tiny_model_dir, adapters / "kept", prompts=[it["prompt"] for it in ITEMS],
                               cfg=GateConfig(**FAST, capabilities=str(capability_file)))
    checks = verdict["checks"]
    assert checks["capability_pass"]["passed"] is not None
    for name in ("capability_pass_base", "capability_loglik_base"):
        assert checks[name]["passed"] is None and "the base model is the baseline" in checks[name]["skipped"]


@pytest.mark.slow
def test_real_model_one_word_adapter_is_rejected_and_an_ordinary_one_passes(real_model_dir, tmp_path):  # noqa: F811
    """The shipped set on SmolLM2-135M, the base model serving. Two adapters trained alike (4 SFT steps
    at lr 2e-3) on the same questions: one answers every question "Yes." and loses its facts and
    arithmetic; the other answers them plainly and keeps them."""
    answers = {"Tell me about the moon.": "The Moon is Earth's only natural satellite.",
               "How do I boil an egg?": "Put the egg in boiling water for about nine minutes.",
               "What is a verb?": "A verb is a word for an action, such as run or eat.",
               "Why do cats purr?": "Cats purr when they are content, and sometimes to calm themselves.",
               "What is the tallest mountain?": "Mount Everest is the tallest mountain above sea level.",
               "How many legs does a dog have?": "A dog has four legs.",
               "Who painted the Mona Lisa?": "Leonardo da Vinci painted the Mona Lisa.",
               "What is 7 plus 8?": "7 plus 8 is 15."}
    cfg = SFTConfig(lr=2e-3, batch_size=8)  # one epoch: 4 steps
    for name, answer in (("yes", lambda a: "Yes."), ("plain", lambda a: a)):
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": answer(a)}]}
                for q, a in answers.items()]
        assert train_sft(real_model_dir, rows * 4, tmp_path / name, cfg, quiet=True)["steps"] == 4
    gate_cfg = GateConfig(canaries=(), max_new_tokens=16)
    prompts = list(answers)[:4]

    rejected = evaluate_adapter(real_model_dir, tmp_path / "yes", prompts=prompts, cfg=gate_cfg)
    checks, figures = rejected["checks"], rejected["figures"]
    assert figures["capability_pass_baseline"] >= 0.6 and not rejected["passed"]  # sampled: 0.69 with 8 answers an item
    assert checks["capability_pass"]["passed"] is False and checks["capability_loglik"]["passed"] is False, checks
    assert sum(x["answer"].strip() == "Yes." for x in rejected["capability_lost"]) >= 10

    kept = evaluate_adapter(real_model_dir, tmp_path / "plain", prompts=prompts, cfg=gate_cfg)
    checks = kept["checks"]
    assert checks["capability_pass"]["passed"] and checks["capability_loglik"]["passed"], (checks, kept["capability_lost"])

    # Losses do not compound: with the "Yes." adapter serving, a candidate no worse than it (itself)
    # passes against the version it replaces and is still rejected against the base model.
    compounded = evaluate_adapter(real_model_dir, tmp_path / "yes", prompts=prompts, baseline_adapter=tmp_path / "yes",
                                  cfg=gate_cfg)
    checks = compounded["checks"]
    assert checks["capability_pass"]["passed"] and checks["capability_loglik"]["passed"], checks
    assert checks["capability_pass_base"]["passed"] is False and checks["capability_loglik_base"]["passed"] is False
    assert not compounded["passed"]
    assert all(x["base_model_answer"] != x["answer"] for x in compounded["capability_lost"])
