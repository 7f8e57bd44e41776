"""`loopchat export`, `feedback stats` and `users delete` against a running gateway's data dir
(the real app in front of the fake engine).

Completions are written straight into the gateway's database (so each conversation can have a
liked and a disliked answer); every piece of feedback goes through the HTTP API."""

from __future__ import annotations

import contextlib
import json

import httpx

from feedback_fixtures import add_completion

FIELDS = {"pairs": {"prompt", "chosen", "rejected"}, "unpaired": {"prompt", "completion", "label"},
          "sft": {"messages"}}


def rate_conversations(gateway, user: str, first: int, last: int, tag: str) -> None:
    """For each conversation: one liked and one disliked answer, the disliked one corrected."""
    with httpx.Client(base_url=gateway.url, headers={"X-Loopchat-User": user}) as http:
        for i in range(first, last):
            prompt = f"{user} question {i}"
            good = add_completion(gateway.store, f"{user}-{tag}-{i}-good", user=user, prompt=prompt,
                                  answers=(f"good {tag}",))
            bad = add_completion(gateway.store, f"{user}-{tag}-{i}-bad", user=user, prompt=prompt,
                                 answers=(f"bad {tag}",))
            for body in ({"completion_id": good, "rating": 1},
                         {"completion_id": bad, "rating": -1, "correction": f"fixed {tag}"}):
                r = http.post("/v1/feedback", json=body)
                assert r.status_code == 200, r.text


def export(gateway, tmp_path, kind: str, split: str) -> list[dict]:
    out = tmp_path / f"{kind}-{split}.jsonl"
    result = gateway.cli("export", "--kind", kind, "--split", split, "-o", str(out))
    assert result.returncode == 0, result.stderr
    lines = out.read_text().splitlines()
    assert result.stdout.startswith(f"wrote {len(lines)} {kind} lines")
    return [json.loads(line) for line in lines]


def conversations(records: list[dict]) -> set[str]:
    return {r["meta"]["conversation"] for r in records}


def test_exports_are_trl_records_and_keep_their_split(fake_gateway, model_dir, tmp_path):
    from transformers import AutoTokenizer
    from trl.data_utils import apply_chat_template, is_conversational

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rate_conversations(fake_gateway, "exporter", 0, 40, "v1")
    first = {(kind, split): export(fake_gateway, tmp_path, kind, split)
             for kind in FIELDS for split in ("train", "heldout")}
    for (kind, split), records in first.items():
        for record in records:
            assert set(record) - {"source", "meta"} == FIELDS[kind]
            assert is_conversational(record)
            assert apply_chat_template(record, tokenizer)  # TRL turns it into text without complaint
    for kind in FIELDS:
        assert not conversations(first[kind, "train"]) & conversations(first[kind, "heldout"])
    assert conversations(first["pairs", "heldout"]) and conversations(first["pairs", "train"])
    assert all(isinstance(r["label"], bool) for r in first["unpaired", "train"])
    assert all(r["messages"][-1]["role"] == "assistant" for r in first["sft", "train"])

    rate_conversations(fake_gateway, "exporter", 20, 60, "v2")  # new answers to old and new questions
    for kind in FIELDS:
        train, heldout = export(fake_gateway, tmp_path, kind, "train"), export(fake_gateway, tmp_path, kind, "heldout")
        assert len(train) > len(first[kind, "train"])
        assert conversations(train) >= conversations(first[kind, "train"])
        assert conversations(heldout) >= conversations(first[kind, "heldout"])
        assert not conversations(train) & conversations(heldout)


def test_export_errors_are_one_line(fake_gateway, tmp_path):
    result = fake_gateway.cli("export", "--kind", "pairs", "-o", str(tmp_path / "missing" / "out.jsonl"))
    assert result.returncode == 1 and result.stderr.strip().count("\n") == 0
    assert result.stderr.startswith("Error: cannot write")
    result = fake_gateway.cli("export", "--kind", "triples", "-o", str(tmp_path / "x.jsonl"))
    assert result.returncode == 2 and not (tmp_path / "x.jsonl").exists()


def test_feedback_stats_command(fake_gateway):
    rate_conversations(fake_gateway, "counter", 0, 2, "s")
    result = fake_gateway.cli("feedback", "stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["day", "thumbs_up", "thumbs_down", "correction", "comparison", "vote"]
    assert any(line.startswith("total") for line in lines)
    assert any(line.startswith("pairs: ") and "thumbs" in line and "correction" in line for line in lines)


def test_users_delete_removes_a_users_data_after_confirmation(fake_gateway):
    rate_conversations(fake_gateway, "leaver", 0, 2, "d")
    rate_conversations(fake_gateway, "stayer", 0, 1, "d")

    def rows(user: str) -> int:
        with contextlib.closing(fake_gateway.db()) as db:
            return db.execute("SELECT (SELECT count(*) FROM completions WHERE user = ?) + "
                              "(SELECT count(*) FROM feedback WHERE user = ?)", [user, user]).fetchone()[0]

    assert (rows("leaver"), rows("stayer")) == (8, 4)
    no = fake_gateway.cli("users", "delete", "leaver", input="n\n")
    assert no.returncode == 1 and "Aborted" in no.stderr and rows("leaver") == 8
    yes = fake_gateway.cli("users", "delete", "leaver", "--yes")
    assert yes.returncode == 0, yes.stderr
    assert yes.stdout.strip() == ("deleted user leaver: 11 rows "
                                  "(2 corrections, 4 feedback, 4 completions, 1 users)")
    assert (rows("leaver"), rows("stayer")) == (0, 4)
    r = httpx.get(fake_gateway.url + "/v1/feedback", headers={"X-Loopchat-User": "leaver"})
    assert r.json()["data"] == []
    again = fake_gateway.cli("users", "delete", "leaver", "--yes")
    assert again.returncode == 1 and again.stderr.strip() == "Error: no user named 'leaver'"
