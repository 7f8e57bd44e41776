"""train.data: TRL's conversational formats in, plain Python out; bad lines named by file:line."""

import json

import pytest

from train.data import DataError, read_pairs, read_prompts, read_sft, read_unpaired

USER = {"role": "user", "content": "hi"}
ANSWER = [{"role": "assistant", "content": "hello"}]


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_every_format_reads_from_file_and_memory(tmp_path):
    pair = {"prompt": [USER], "chosen": ANSWER, "rejected": [{"role": "assistant", "content": "go away"}], "source": "vote", "meta": {}}
    assert read_pairs(write(tmp_path / "p.jsonl", [pair, ""])) == [{"prompt": [USER], "chosen": "hello", "rejected": "go away"}]
    assert read_pairs([pair]) == read_pairs(write(tmp_path / "p2.jsonl", [pair]))
    assert read_unpaired([{"prompt": [USER], "completion": ANSWER, "label": False}]) == [{"prompt": [USER], "completion": "hello", "label": False}]
    sft = [{"messages": [USER, *ANSWER]}, {"prompt": [USER], "completion": ANSWER, "label": True}, {"prompt": [USER], "completion": ANSWER, "label": False}]
    assert read_sft(sft) == [[USER, *ANSWER], [USER, *ANSWER]]  # liked answers are demonstrations, disliked ones are not
    prompts = write(tmp_path / "q.jsonl", [{"prompt": [USER]}, json.dumps("a json string"), "plain text line"])
    assert read_prompts(prompts) == [[USER], [{"role": "user", "content": "a json string"}], [{"role": "user", "content": "plain text line"}]]


@pytest.mark.parametrize(
    "reader, bad, message",
    [
        (read_sft, '{"messages": [', "invalid JSON"),
        (read_sft, {"messages": [USER]}, "last message must be the assistant"),
        (read_sft, {"messages": [{"role": "robot", "content": "x"}, *ANSWER]}, "messages[0]"),
        (read_sft, {"conversation": []}, "missing 'messages'"),
        (read_pairs, {"prompt": [USER], "chosen": ANSWER}, "missing 'rejected'"),
        (read_pairs, {"prompt": [USER], "chosen": ANSWER * 2, "rejected": ANSWER}, "exactly one assistant message"),
        (read_unpaired, {"prompt": [USER], "completion": ANSWER, "label": "yes"}, "'label' must be true or false"),
        (read_prompts, {"prompt": []}, "non-empty list"),
    ],
)
def test_bad_line_is_named_by_file_and_line(tmp_path, reader, bad, message):
    good = {"messages": [USER, *ANSWER]} if reader is read_sft else {"prompt": [USER], "chosen": ANSWER, "rejected": ANSWER, "completion": ANSWER, "label": True}
    path = write(tmp_path / "d.jsonl", [good, bad])
    with pytest.raises(DataError) as e:
        reader(path)
    assert str(e.value).startswith(f"{path}:2: ") and message in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_memory_records(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_sft(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="^record 2: "):
        read_prompts([{"prompt": [USER]}, 42])
