"""``r1jax sample`` and ``r1jax eval`` end to end on a tiny random MLA/MoE checkpoint with a character tokenizer,
plus the trace selection and the atomic writer."""

import json

import numpy as np
import pytest

import configs
from r1jax import checkpoint, cli
from r1jax.commands import trace_records, write_jsonl_atomic
from r1jax.model import Transformer
from r1jax.sft import pack_examples, tokenize_trace

CHARS = "0123456789 abcdefghijklmnopqrstuvwxyz.,?:<>/#=+-*()"
CHAT = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
PROBLEMS = [
    {"prompt": "what is 3 + 4?", "answer": "7", "task": "gsm8k"},
    {"prompt": "what is 2 * 5?", "answer": "10", "task": "gsm8k"},
    {"prompt": "what is 9 - 1?", "answer": "8", "task": "gsm8k"},
]


def char_tokenizer_files() -> dict[str, str]:
    """A character-level tokenizer (lower-cased, <unk> 0, <eos> 1) that fits the tiny model's 64-token vocabulary."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(CHARS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<eos>"])
    config = {"eos_token": "<eos>", "chat_template": CHAT}
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": json.dumps(config)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    random = Transformer.random(configs.tiny_model(), seed=3)
    model = Transformer(random.cfg, random.param_dict(), tokenizer_files=char_tokenizer_files())
    checkpoint.save(model, str(root / "ckpt"))
    (root / "data.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    return root


COMMON = ["--max-new-tokens", "8", "--temperature", "1.0", "--top-p", "1.0", "--batch-size", "2", "--split", "x"]


def test_sample_all_then_sft_ready(run, capsys):
    out = run / "traces.jsonl"
    argv = ["sample", str(run / "ckpt"), "--data", str(run / "data.jsonl"), "--samples", "2", "--keep", "all"]
    assert cli.main([*argv, "--out", str(out), "--template", "chat", *COMMON]) == 0
    assert "6 of 6 samples" in capsys.readouterr().err
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(recs) == 6 and [r["answer"] for r in recs] == ["7", "7", "10", "10", "8", "8"]
    for r in recs:
        assert set(r) == {"prompt", "completion", "reward", "answer", "correct", "task", "messages"}
        assert r["prompt"].startswith("<user>what is") and r["prompt"].endswith("<a>")
        assert r["messages"][-1] == {"role": "assistant", "content": r["completion"]}
        assert 0.0 <= r["reward"] <= 2.0 and r["correct"] == (r["reward"] == 2.0)
    assert not list(run.glob(".traces.jsonl.*"))  # no temporary file left behind
    # the traces feed SFT directly
    files = char_tokenizer_files()
    from r1jax.data.tokenizer import Tokenizer

    tok = Tokenizer(files["tokenizer.json"], json.loads(files["tokenizer_config.json"]))
    pairs = [tokenize_trace(r["prompt"], r["completion"], tok.encode, eos_id=tok.eos_id) for r in recs]
    batch = pack_examples(pairs, seq_len=64)
    assert batch["loss_mask"].sum() == sum(len(c) for _, c in pairs)


def test_keep_correct_and_eval(run, capsys):
    out = run / "kept.jsonl"
    argv = ["sample", str(run / "ckpt"), "--data", str(run / "data.jsonl"), "--samples", "2", "--keep", "correct"]
    assert cli.main([*argv, "--out", str(out), "--rewards", "accuracy", *COMMON]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(r["correct"] and r["reward"] == 1.0 for r in recs)  # a random model is rarely right: maybe none
    assert "messages" not in (recs[0] if recs else {})
    capsys.readouterr()
    argv = ["eval", str(run / "ckpt"), "--data", str(run / "data.jsonl"), "--k", "2", "--limit", "2", *COMMON]
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["n_problems"] == 2 and metrics["k"] == 2
    assert {"pass@1", "maj@2", "pass@2", "length_mean", "truncated_frac"} <= set(metrics)
    assert 0.0 <= metrics["pass@1"] <= metrics["pass@2"] <= 1.0
    assert 1 <= metrics["length_mean"] <= 8
    report = run / "report"
    assert cli.main([*argv, "--out", str(report)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == metrics  # same seed, same numbers
    saved = json.loads((report / "eval.json").read_text())
    assert saved["pass@1"] == metrics["pass@1"] and saved["temperature"] == 1.0
    md = (report / "eval.md").read_text()
    assert f"| pass@1 | mean correctness over the k samples | {100 * metrics['pass@1']:.1f}% |" in md
    assert "2 problems, k = 2 samples each." in md and "| maj@2 |" in md


def test_bad_input_is_one_line(run, capsys):
    missing = ["sample", str(run / "ckpt"), "--data", str(run / "nope.jsonl"), "--out", str(run / "o.jsonl")]
    assert cli.main(missing) == 2
    assert "nope.jsonl" in capsys.readouterr().err
    bad_reward = ["sample", str(run / "ckpt"), "--data", "x", "--out", str(run / "o.jsonl"), "--rewards", "nah"]
    assert cli.main(bad_reward) == 2
    assert "unknown reward" in capsys.readouterr().err


def test_trace_selection_and_atomic_write(tmp_path):
    examples = [{"answer": "7", "task": "gsm8k", "prompt": "q"}]
    samples = [{"prompt": "P", "think_prefilled": True, "completions": ["a", "b", "c"]}]
    totals = [np.asarray([2.0, 1.0, 2.0], np.float32)]
    kept = list(trace_records(examples, samples, totals, best=2.0, keep="correct", chat=True))
    assert [r["completion"] for r in kept] == ["a", "c"]
    assert kept[0]["messages"] == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>\na"}]
    assert len(list(trace_records(examples, samples, totals, best=2.0, keep="all", chat=False))) == 3
    path = tmp_path / "t.jsonl"
    path.write_text("old\n")

    def failing():
        yield {"x": 1}
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(str(path), failing())
    assert path.read_text() == "old\n" and len(list(tmp_path.iterdir())) == 1
    assert write_jsonl_atomic(str(path), [{"x": 1}, {"y": "é"}]) == 2
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"x": 1}, {"y": "é"}]
