"""Bad input: one clear line, exit status 2, nothing half-written."""

import json
import os
import struct
import subprocess
import sys

import pytest

from r1jax.cli import main
from tests import hf_tiny


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    hf_tiny.build("qwen2", str(path))
    return path


def _copy(src, dst):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def run_cli(capsys, *argv):
    code = main(list(map(str, argv)))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_error(capsys, out, *argv, match):
    code, err = run_cli(capsys, "convert", *argv, out)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("r1jax: error:"), err
    assert match in err, err
    assert not out.exists()
    assert not [p for p in os.listdir(out.parent) if p.startswith(".r1jax")]  # no temp leftovers


def test_missing_path(tmp_path, capsys):
    _assert_error(capsys, tmp_path / "out", tmp_path / "nope", match="no such file")


def test_missing_config(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    (d / "config.json").unlink()
    _assert_error(capsys, tmp_path / "out", d, match="not a checkpoint")


def test_truncated_safetensors(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    _assert_error(capsys, tmp_path / "out", d, match="outside the file")


def test_absurd_header_size(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + data[8:])
    _assert_error(capsys, tmp_path / "out", d, match="corrupt safetensors header size")


def test_garbage_header(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    (d / "model.safetensors").write_bytes(struct.pack("<Q", 16) + b"{not json at all" + b"\0" * 64)
    _assert_error(capsys, tmp_path / "out", d, match="corrupt safetensors header")


def test_index_pointing_outside(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": "../../etc/passwd"}}))
    _assert_error(capsys, tmp_path / "out", d, match="outside the checkpoint directory")


def test_config_weight_mismatch(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["hidden_size"] = 64
    (d / "config.json").write_text(json.dumps(conf))
    _assert_error(capsys, tmp_path / "out", d, match="mismatch")


def test_missing_layer(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["num_hidden_layers"] += 1
    (d / "config.json").write_text(json.dumps(conf))
    _assert_error(capsys, tmp_path / "out", d, match="missing from the checkpoint")


def test_unknown_model_type(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    conf = json.loads((d / "config.json").read_text())
    conf["model_type"] = "gpt_oss"
    (d / "config.json").write_text(json.dumps(conf))
    _assert_error(capsys, tmp_path / "out", d, match="unknown model_type 'gpt_oss'")


def test_pickle_only_refused(good, tmp_path, capsys):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text((good / "config.json").read_text())
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    _assert_error(capsys, tmp_path / "out", d, match="never unpickles")


def test_invalid_config_json(good, tmp_path, capsys):
    d = _copy(good, tmp_path / "m")
    (d / "config.json").write_text("{")
    _assert_error(capsys, tmp_path / "out", d, match="invalid JSON")


def test_existing_output_survives_failed_convert(good, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "convert", good, out)[0] == 0
    before = sorted(os.listdir(out))
    d = _copy(good, tmp_path / "m")
    (d / "model.safetensors").write_bytes(b"\0" * 4)
    assert run_cli(capsys, "convert", d, out)[0] == 2
    assert sorted(os.listdir(out)) == before


def test_process_exit_status(tmp_path):
    """The console entry point really exits non-zero with a single line on stderr."""
    p = subprocess.run(
        [sys.executable, "-m", "r1jax", "convert", str(tmp_path / "nope"), str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [f"r1jax: error: {tmp_path / 'nope'}: no such file or directory"]
