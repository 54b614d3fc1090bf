"""Data: TFDS builders (array_record, no TensorFlow), validation errors, prompt templates, the resumable iterator."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from r1jax.config import DataConfig, RewardConfig
from r1jax.data.builders import ArithmeticConfig, CountdownConfig, generate_arithmetic, generate_countdown
from r1jax.data.builders.generated import split_of
from r1jax.data.datasets import DataError, batches, default_gsm8k_dir, load_dataset
from r1jax.data.templates import R1_ZERO, build_prompt
from r1jax.data.tokenizer import Tokenizer
from r1jax.rewards import countdown_reward, gsm8k_accuracy

R1_ZERO_TEXT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it. The assistant "
    "first thinks about the reasoning process in the mind and then provides the user with the answer. The reasoning "
    "process and answer are enclosed within <think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think> <answer> answer here </answer>. User: {prompt}. Assistant:"
)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    import tensorflow_datasets as tfds

    tfds.display_progress_bar(False)
    return str(tmp_path_factory.mktemp("tfds"))


def tiny_tokenizer(chat_template: str | None = None) -> Tokenizer:
    """Word-level tokenizer: one token per whitespace-separated word (enough to count prompt lengths)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    tok = HFTokenizer(models.WordLevel({"[UNK]": 0, "<eos>": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    config = {"eos_token": "<eos>", "chat_template": chat_template}
    return Tokenizer(tok.to_str(), config)


def write_lines(path, lines: list[bytes | str | dict]) -> str:
    with open(path, "wb") as f:
        for line in lines:
            if isinstance(line, dict):
                line = json.dumps(line)
            f.write((line.encode() if isinstance(line, str) else line) + b"\n")
    return str(path)


# ------------------------------------------------------------------------------------------------------ builders


def test_gsm8k_tfds_array_record(data_dir):
    src = default_gsm8k_dir()
    if not (src / "train.jsonl").is_file():
        pytest.skip(f"GSM8K not found at {src}")
    had_tf = "tensorflow" in sys.modules
    train = load_dataset("gsm8k", "train", data_dir=data_dir)
    test = load_dataset("gsm8k", "test", data_dir=data_dir)
    assert (len(train), len(test)) == (7473, 1319)
    first = json.loads((src / "train.jsonl").open().readline())
    ex = train[0]
    assert ex == {"prompt": first["question"], "answer": "72", "task": "gsm8k", "solution": first["answer"]}
    assert test[-1]["task"] == "gsm8k" and "####" in test[-1]["solution"]
    # Every final answer is a plain number the numeric reward accepts for itself.
    cfg = RewardConfig()
    for e in train[:200]:
        assert gsm8k_accuracy(f"<answer>{e['answer']}</answer>", e, cfg) == 1.0, e["answer"]
    assert all("," not in train[i]["answer"] for i in range(0, len(train), 7))
    # Stored as array_record, read back without TensorFlow; TFDS split slices work.
    files = [p.name for p in (Path(data_dir) / "r1jax_gsm8k").rglob("*.array_record-*")]
    assert sorted(files) == [
        "r1jax_gsm8k-test.array_record-00000-of-00001",
        "r1jax_gsm8k-train.array_record-00000-of-00001",
    ]
    assert had_tf or "tensorflow" not in sys.modules
    assert len(load_dataset("gsm8k", "test[:10]", data_dir=data_dir)) == 10


def test_gsm8k_missing_source(tmp_path, data_dir):
    with pytest.raises(DataError, match="GSM8K not found.*R1JAX_GSM8K_DIR"):
        load_dataset("gsm8k", "train", data_dir=data_dir, source=tmp_path / "nowhere")


def test_countdown_deterministic_solvable_disjoint(data_dir):
    cfg = CountdownConfig.make(seed=0, train_size=600, test_size=100)
    a, b = generate_countdown(cfg), generate_countdown(CountdownConfig.make(seed=0, train_size=600, test_size=100))
    assert a == b
    assert (len(a["train"]), len(a["test"])) == (600, 100)
    reward = RewardConfig()  # TinyZero rules: every number exactly once
    for split in ("train", "test"):
        for ex in a[split]:
            assert 3 <= len(ex["numbers"]) <= 4 and all(1 <= n <= 100 for n in ex["numbers"])
            assert 1 <= ex["target"] <= 100 and ex["task"] == "countdown"
            assert f"[{', '.join(map(str, ex['numbers']))}]" in ex["prompt"] and str(ex["target"]) in ex["prompt"]
            completion = f"<think>...</think> <answer>{ex['solution']}</answer>"
            assert countdown_reward(completion, ex, reward) == 1.0, ex
            assert split_of("countdown", (tuple(sorted(ex["numbers"])), ex["target"])) == split

    def keys(examples):
        return {(tuple(sorted(e["numbers"])), e["target"]) for e in examples}

    assert not keys(a["train"]) & keys(a["test"])
    assert len(keys(a["train"])) == 600  # no duplicates
    other = generate_countdown(CountdownConfig.make(seed=1, train_size=600, test_size=100))
    assert other != a and not keys(other["train"]) & keys(a["test"])  # test problems never train, whatever the seed

    # Through TFDS: the prepared splits read back exactly as generated, with plain Python values.
    small = {"train_size": 40, "test_size": 10}
    got = load_dataset("countdown", "train", data_dir=data_dir, seed=3, **small)
    want = generate_countdown(CountdownConfig.make(seed=3, **small))["train"]
    assert [got[i] for i in range(len(got))] == want
    assert type(got[0]["numbers"][0]) is int and type(got[0]["target"]) is int


def test_arithmetic_deterministic_correct_disjoint(data_dir):
    cfg = ArithmeticConfig.make(seed=0, train_size=300, test_size=50, ops="+-*")
    a = generate_arithmetic(cfg)
    assert a == generate_arithmetic(ArithmeticConfig.make(seed=0, train_size=300, test_size=50, ops="+-*"))
    reward = RewardConfig()
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for ex in a["train"] + a["test"]:
        x, op, y, _, value = ex["solution"].split()
        assert str(ops[op](int(x), int(y))) == value == ex["answer"]
        assert gsm8k_accuracy(f"<answer>{ex['answer']}</answer>", ex, reward) == 1.0
    assert not {e["prompt"] for e in a["train"]} & {e["prompt"] for e in a["test"]}
    got = load_dataset("arithmetic", "test", data_dir=data_dir, seed=5, train_size=20, test_size=5)
    assert len(got) == 5 and got[0]["task"] == "gsm8k"
    with pytest.raises(DataError, match="unknown options"):
        load_dataset("arithmetic", "test", data_dir=data_dir, digits=3)
    opts = DataConfig(options="min_digits=1, max_digits=1,ops=+,train_size=20,test_size=3").option_dict()
    assert opts == {"min_digits": 1, "max_digits": 1, "ops": "+", "train_size": 20, "test_size": 3}
    small = load_dataset("arithmetic", "train", data_dir=data_dir, **opts)
    assert len(small) == 20 and all(int(ex["answer"]) <= 18 and "+" in ex["prompt"] for ex in small)
    with pytest.raises(ValueError, match="key=value"):
        DataConfig(options="min_digits")


def test_math_jsonl_builder(tmp_path, data_dir):
    src = tmp_path / "math"
    src.mkdir()
    write_lines(src / "train.jsonl", [{"problem": "1+1?", "answer": "2", "solution": "\\boxed{2}"}])
    write_lines(src / "test.jsonl", [{"problem": f"{i}+{i}?", "answer": str(2 * i)} for i in range(3)])
    test = load_dataset("math", "test", data_dir=data_dir, source=src)
    assert len(test) == 3 and test[2] == {"prompt": "2+2?", "answer": "4", "task": "math", "solution": ""}
    assert load_dataset("math", "train", data_dir=data_dir, source=src)[0]["solution"] == "\\boxed{2}"
    # A single file is the split that was asked for.
    assert len(load_dataset("math", "validation", data_dir=data_dir, source=src / "test.jsonl")) == 3


# -------------------------------------------------------------------------------------------------------- errors


def test_errors_name_file_and_line(tmp_path, data_dir):
    good = {"prompt": "hi"}
    path = write_lines(tmp_path / "missing.jsonl", [good, good, {"question": "no prompt"}])
    with pytest.raises(DataError, match=r"missing\.jsonl:3: needs one of 'prompt' or 'messages'"):
        load_dataset(path, "train")
    path = write_lines(tmp_path / "bytes.jsonl", [good, b'{"prompt": "caf\xe9"}'])
    with pytest.raises(DataError, match=r"bytes\.jsonl:2: not valid UTF-8"):
        load_dataset(path, "train")
    path = write_lines(tmp_path / "broken.jsonl", [good, "{not json"])
    with pytest.raises(DataError, match=r"broken\.jsonl:2: invalid JSON"):
        load_dataset(path, "train")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no examples \(empty split 'train'\)"):
        load_dataset(str(tmp_path / "empty.jsonl"), "train")
    with pytest.raises(DataError, match="no such file"):
        load_dataset(str(tmp_path / "absent.jsonl"), "train")

    # The same checks while a TFDS builder prepares its source.
    src = tmp_path / "bad_math"
    src.mkdir()
    write_lines(src / "train.jsonl", [{"problem": "p", "answer": "1"}, {"problem": "q"}])
    with pytest.raises(DataError, match=r"bad_math/train\.jsonl:2: missing field 'answer'"):
        load_dataset("math", "train", data_dir=data_dir, source=src)
    gsm = tmp_path / "gsm"
    gsm.mkdir()
    write_lines(gsm / "train.jsonl", [{"question": "q", "answer": "no final line"}])
    (gsm / "test.jsonl").write_bytes(b"")
    with pytest.raises(DataError, match=r"gsm/train\.jsonl:1: answer has no final '#### N'"):
        load_dataset("gsm8k", "train", data_dir=data_dir, source=gsm)
    write_lines(gsm / "train.jsonl", [{"question": "q", "answer": "#### 3"}])
    with pytest.raises(DataError, match=r"gsm/test\.jsonl: no examples"):
        load_dataset("gsm8k", "train", data_dir=data_dir, source=gsm)


def test_plain_messages_jsonl_and_parquet(tmp_path):
    rows = [
        {
            "messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}],
            "answer": "4",
            "task": "gsm8k",
        },
        {"prompt": "Name a prime.", "level": 3},
    ]
    write_lines(tmp_path / "train.jsonl", rows)
    ds = load_dataset(tmp_path, "train")  # a directory with {split}.jsonl
    assert len(ds) == 2 and ds[1]["task"] == "none" and ds[1]["level"] == 3
    text, _ = build_prompt(ds[0], None, "r1_zero", None)
    assert text == R1_ZERO.format(prompt="What is 2+2?")
    chat = tiny_tokenizer("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>")
    text, prefilled = build_prompt(ds[0], chat, "chat", "Be brief.")
    assert text == "<system>Be brief.\n<user>What is 2+2?\n<assistant>" and not prefilled  # answer turn dropped
    write_lines(tmp_path / "bad.jsonl", [{"messages": "hello"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:1: 'messages' must be a list"):
        load_dataset(str(tmp_path / "bad.jsonl"))

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(
        pa.Table.from_pylist([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]),
        tmp_path / "test.parquet",
    )
    ds = load_dataset(tmp_path, "test")
    assert [e["prompt"] for e in ds] == ["a", "b"]
    pq.write_table(pa.Table.from_pylist([{"prompt": "a"}, {"answer": "2"}]), tmp_path / "holes.parquet")
    with pytest.raises(DataError, match=r"holes\.parquet:row 2: needs one of 'prompt'"):
        load_dataset(str(tmp_path / "holes.parquet"))


# ----------------------------------------------------------------------------------------------------- templates


def test_r1_zero_template_text():
    assert R1_ZERO == R1_ZERO_TEXT
    text, prefilled = build_prompt({"prompt": "What is 1+1?"}, None, "r1_zero", None)
    assert text == R1_ZERO_TEXT.replace("{prompt}", "What is 1+1?") and not prefilled
    text, _ = build_prompt({"prompt": "x {y}"}, None, "Q: {prompt}\nA:", None)
    assert text == "Q: x {y}\nA:"  # braces in the prompt are not format fields
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt({"prompt": "x"}, None, "nope", None)


def test_think_prefill_detection():
    # R1-Distill style: the generation prompt opens the reasoning block.
    distill = (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}{% endif %}"
        "{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<｜Assistant｜><think>\n{% endif %}"
    )
    text, prefilled = build_prompt({"prompt": "2+2?"}, tiny_tokenizer(distill), "chat", "sys")
    assert text == "sys<｜User｜>2+2?<｜Assistant｜><think>\n" and prefilled
    plain = "{% for m in messages %}<｜User｜>{{ m['content'] }}{% endfor %}<｜Assistant｜>"
    assert build_prompt({"prompt": "2+2?"}, tiny_tokenizer(plain), "chat", None) == (
        "<｜User｜>2+2?<｜Assistant｜>",
        False,
    )


# ------------------------------------------------------------------------------------------------------ iterator


def _toy(n: int) -> list[dict]:
    return [{"prompt": " ".join(["w"] * (1 + i % 9)), "task": "none", "id": i} for i in range(n)]


def test_batches_resume_is_deterministic():
    ds = _toy(37)
    run = batches(ds, 8, seed=3)
    assert run.steps_per_epoch == 4
    full = [[e["index"] for e in next(run)] for _ in range(13)]
    for epoch in range(3):  # each epoch: distinct examples, a fresh order
        seen = sum(full[epoch * 4 : epoch * 4 + 4], [])
        assert len(set(seen)) == 32
    assert full[0:4] != full[4:8]
    resumed = batches(ds, 8, seed=3, start_step=6)
    assert resumed.state == (1, 16)
    assert [[e["index"] for e in next(resumed)] for _ in range(7)] == full[6:13]
    assert run.state == (3, 8) and resumed.state == run.state
    assert [[e["index"] for e in next(batches(ds, 8, seed=4))]] != full[:1]
    assert next(batches(ds, 8, seed=3))[0]["id"] == full[0][0]


def test_batches_multiprocess_shards_disjoint_and_covering():
    ds = _toy(50)
    procs = [batches(ds, 12, seed=1, process_index=p, process_count=4) for p in range(4)]
    ref = batches(ds, 12, seed=1)
    for step in range(10):
        parts = [[e["index"] for e in next(it)] for it in procs]
        assert all(len(p) == 3 for p in parts)
        flat = sum(parts, [])
        assert len(set(flat)) == 12
        assert sorted(flat) == sorted(ref.global_indices(step).tolist())
    with pytest.raises(ValueError, match="multiple of 4"):
        batches(ds, 10, process_index=0, process_count=4)


def test_batches_skip_long_prompts_and_render():
    ds = _toy(40)  # prompts of 1..9 words
    tok = tiny_tokenizer()
    it = batches(ds, 4, seed=0, tokenizer=tok, template="plain", max_prompt_tokens=5)
    assert it.skipped == sum(1 + i % 9 > 5 for i in range(40)) and it.skipped == len(it.skipped_indices)
    for _ in range(2 * it.steps_per_epoch):
        for ex in next(it):
            assert len(ex["prompt_ids"]) <= 5 and ex["prompt_text"] == ex["prompt"] and ex["think_prefilled"] is False
    with pytest.raises(DataError, match="usable examples"):
        batches(ds, 40, tokenizer=tok, template="plain", max_prompt_tokens=5)
    np.testing.assert_array_equal(np.sort(np.concatenate([it.kept, it.skipped_indices])), np.arange(40))
