"""``r1jax sample`` / ``r1jax eval`` take their data and sampling settings as ``--set data.*`` / ``--set sampling.*``,
parsed and checked by the same machinery as ``r1jax train --set``; their shorthand flags are the same keys."""

import json

import pytest
from test_sample_cmd import run  # noqa: F401 (the tiny random checkpoint and problems of the sample/eval tests)

from r1jax import cli
from r1jax.commands import SETTABLE, settings


def _args(command: str, *argv: str):
    out = ["--out", "o.jsonl"] if command == "sample" else []
    return cli.build_parser().parse_args([command, "MODEL", *out, *argv])


def test_defaults_of_each_command():
    s = settings("eval", _args("eval", "--data", "gsm8k"))
    assert (s.data.name, s.data.split, s.data.template) == ("gsm8k", "test", "r1_zero")
    assert (s.sampling.temperature, s.sampling.top_p, s.sampling.max_new_tokens) == (0.6, 0.95, 1024)  # R1's eval
    s = settings("sample", _args("sample", "--data", "gsm8k"))
    assert (s.data.split, s.sampling.temperature, s.sampling.top_p) == ("train", 1.0, 1.0)


def test_shorthands_are_the_set_keys():
    flags = settings("eval", _args("eval", "--data", "gsm8k", "--split", "x", "--temperature", "0.7", "--top-p", "0.9",
                                   "--max-new-tokens", "64", "--template", "chat", "--options", "a=1"))  # fmt: skip
    sets = settings("eval", _args("eval", *(f"--set={kv}" for kv in (
        "data.name=gsm8k", "data.split=x", "sampling.temperature=0.7", "sampling.top_p=0.9",
        "sampling.max_new_tokens=64", "data.template=chat", "data.options=a=1"))))  # fmt: skip
    assert flags == sets
    later = settings("eval", _args("eval", "--data", "x", "--temperature", "0.7", "--set", "sampling.temperature=0.2"))
    assert later.sampling.temperature == 0.2  # --set comes after the shorthands
    template = "Q: {prompt}\nA: "
    assert settings("sample", _args("sample", "--data", "x", "--template", template)).data.template == template
    s = settings("sample", _args("sample", "--data", "x", "--set", "sampling.top_k=5", "--set", "data.source=m.jsonl"))
    assert (s.sampling.top_k, s.data.source) == (5, "m.jsonl")


def test_eval_refuses_what_it_does_not_read():
    assert "sampling.top_k" in SETTABLE["sample"] and "sampling.top_k" not in SETTABLE["eval"]
    assert not any(k.startswith("data.seq_len") or k.startswith("data.max_prompt") for k in SETTABLE["sample"])


@pytest.mark.parametrize("command", ["sample", "eval"])
@pytest.mark.parametrize(
    "argv, match",
    [
        (["--set", "sampling.temprature=0.7"], "unknown config key 'sampling.temprature'; did you mean "
         "'sampling.temperature'?"),
        (["--set", "sampling.temperature=hot"], "sampling.temperature: 'hot' is not a valid float"),
        (["--max-new-tokens", "many"], "sampling.max_new_tokens: 'many' is not a valid int"),
        (["--set", "data.seq_len=64"], "data.seq_len: r1jax {command} does not use it"),
        (["--set", "sampling.top_p=2"], "top_p must be in (0, 1]"),
        (["--options", "nokeyvalue"], "data.options: expected key=value pairs"),
        (["--set", "sampling"], "override 'sampling' is not key=value"),
        (["--set", "data"], "override 'data' is not key=value"),
        (["--set", "data=x"], "data is a group; set one of its fields, e.g. data.name"),
    ],
)  # fmt: skip
def test_bad_settings_are_one_line(tmp_path, capsys, command, argv, match):
    """A bad key or value stops the command with one line and exit status 2 before any model is loaded (the model
    path does not exist)."""
    out = ["--out", str(tmp_path / "t.jsonl")] if command == "sample" else []
    code = cli.main([command, str(tmp_path / "no_model"), "--data", "x", *out, *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("r1jax: error:"), err
    assert match.format(command=command) in err, err


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_no_data_is_one_line(tmp_path, capsys, command):
    out = ["--out", str(tmp_path / "t.jsonl")] if command == "sample" else []
    assert cli.main([command, str(tmp_path / "no_model"), *out, "--set", "sampling.temperature=0.7"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pass --data NAME_OR_PATH (or --set data.name=...)" in err, err
    # eval refuses sampling.top_k; sample takes it and then finds no model
    assert cli.main([command, str(tmp_path / "no_model"), *out, "--data", "x", "--set", "sampling.top_k=2"]) == 2
    err = capsys.readouterr().err
    assert ("does not use it" in err) == (command == "eval"), err


def test_set_and_shorthands_give_the_same_eval(run, capsys):  # noqa: F811 (the fixture imported above)
    base = ["eval", str(run / "ckpt"), "--k", "2", "--limit", "2", "--batch-size", "2"]
    flags = ["--data", str(run / "data.jsonl"), "--split", "x", "--max-new-tokens", "8", "--temperature", "1.0"]
    sets = [f"data.name={run / 'data.jsonl'}", "data.split=x", "sampling.max_new_tokens=8", "sampling.temperature=1.0"]
    assert cli.main([*base, *flags]) == 0
    by_flags = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli.main([*base, *(f"--set={s}" for s in sets)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == by_flags
    assert by_flags["n_problems"] == 2 and by_flags["k"] == 2 and 1 <= by_flags["length_mean"] <= 8
