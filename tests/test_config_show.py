"""`mel config show`: the resolved config with help, [P]/[C], ranges and origins; `--plain` round-trips to the same
config hash; `extends:` falls back to configs/; `mel --version`; `--debug` after the subcommand."""

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from mel_core import config as C

REPO = Path(__file__).resolve().parent.parent
MEL = [sys.executable, "-m", "mel_app.cli"]
TAG = {C.PAPER: "[P]", C.CHOICE: "[C]"}


def mel(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEL, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def show(*args: str) -> str:
    done = mel("config", "show", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_show_prints_each_field_with_its_value_help_source_and_range():
    lines = show("configs/tiny.yaml").splitlines()
    i = lines.index("  group_size: 8  # set by configs/tiny.yaml")  # equal to the default: named, no "*"
    assert lines[i - 1] == "  # [P] Rollouts per prompt (G). (range: >= 2)"
    assert "  # [C] Compute dtype: what forward passes" in "\n".join(lines)
    assert any(line.startswith("  # [C] Generation engine:") for line in lines)
    text = "\n".join(lines)
    assert "(range: one of hf | vllm)" in text.replace("\n  # ", " ")
    assert "  name: tiny-arithmetic  # * default mel; set by configs/tiny.yaml" in lines
    # every leaf field's help starts with its [P]/[C] tag, as its metadata says
    flat = " ".join(line.strip().lstrip("#").strip() for line in lines if line.lstrip().startswith("#"))
    for key, source, help_ in C.describe():
        assert f"{TAG[source]} {' '.join(help_.split()[:6])}" in flat, key


def test_show_names_overrides_and_the_files_comment():
    lines = show("configs/smollm2-times-table.yaml", "run.steps=3").splitlines()
    assert lines[1] == "# resolved: defaults <- configs/base.yaml <- configs/smollm2-times-table.yaml <- 'run.steps=3'"
    assert "  steps: 3  # * default 4; set by override 'run.steps=3'" in lines
    i = lines.index("  temperature: 0.7  # * default 1.0; set by configs/smollm2-times-table.yaml:")
    assert lines[i - 1] == "  # [P] Rollout sampling temperature. (range: > 0)"  # the paper fixes the default, 1.0
    assert lines[i + 1].startswith("  #   [C] at the paper's 1.0 this 135M model's samples")  # the file's reason
    assert "  advantage: grpo  # set by configs/base.yaml: [P]" in lines
    assert f"# config hash: {C.config_hash(C.load('configs/smollm2-times-table.yaml', ['run.steps=3']))} " in lines[2]


@pytest.mark.parametrize("config", ["configs/tiny.yaml", "configs/smollm2-times-table.yaml"])
def test_plain_round_trip_keeps_the_config_hash(config, tmp_path):
    """`mel config show X --plain > f.yaml; mel run --config f.yaml` trains the same config (mel run loads its
    --config with C.load). The annotated output is YAML too and loads the same."""
    overrides = ["sampling.temperature=0.9", "eval.datasets=[synthetic]"]
    for args in ([], overrides):
        want = C.load(config, args)
        for plain in (True, False):
            f = tmp_path / ("plain.yaml" if plain else "shown.yaml")
            f.write_text(show(config, *args, *(["--plain"] if plain else [])))
            got = C.load(f)
            assert C.config_hash(got) == C.config_hash(want)
            assert C.to_dict(got) == C.to_dict(want)
            if plain:
                assert not [line for line in f.read_text().splitlines()[1:] if "#" in line]  # values only


def test_a_bad_value_is_one_line_naming_the_key_and_where_exit_2(tmp_path):
    done = mel("config", "show", "configs/tiny.yaml", "sampling.group_size=1")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert "sampling.group_size" in done.stderr and "override 'sampling.group_size=1'" in done.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: tiny.yaml\nsampling:\n  top_p: 2\n")
    done = mel("config", "show", str(bad))
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "sampling.top_p" in done.stderr and str(bad) in done.stderr and "<= 1" in done.stderr


def test_extends_falls_back_to_the_configs_directory(tmp_path):
    mine = tmp_path / "mine.yaml"
    mine.write_text("extends: tiny.yaml   # not beside this file: configs/tiny.yaml\nrun:\n  name: mine\n")
    cfg = C.load(mine)
    assert cfg.run.name == "mine" and cfg.prompts.dir == "configs/prompts/tiny" and cfg.sampling.group_size == 8
    assert C.to_dict(cfg) == C.to_dict(C.load("configs/tiny.yaml", ["run.name=mine"]))
    lines = show(str(mine)).splitlines()
    assert lines[1] == f"# resolved: defaults <- configs/base.yaml <- configs/tiny.yaml <- {mine}"
    # beside the including file first: a local tiny.yaml wins over configs/tiny.yaml
    (tmp_path / "tiny.yaml").write_text("run:\n  steps: 9\n")
    assert C.load(mine).run.steps == 9 and C.load(mine).prompts.dir == C.PromptsConfig().dir
    missing = tmp_path / "orphan.yaml"
    missing.write_text("extends: no-such-parent.yaml\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(missing)
    msg = str(e.value)
    assert "\n" not in msg and str(missing) in msg
    assert str(tmp_path / "no-such-parent.yaml") in msg and str(C.CONFIGS_DIR / "no-such-parent.yaml") in msg


def test_version_prints_the_installed_distributions_version():
    done = mel("--version")
    assert done.returncode == 0 and done.stdout.strip() == f"mel {version('mel')}"


def test_debug_is_accepted_after_the_subcommand_too():
    for argv in (["config", "show", "configs/tiny.yaml", "sampling.group_size=1", "--debug"],
                 ["--debug", "config", "show", "configs/tiny.yaml", "sampling.group_size=1"],
                 ["run", "--config", "configs/no-such-config.yaml", "--debug"]):
        done = mel(*argv)
        assert "unrecognized arguments" not in done.stderr, argv
        assert "Traceback" in done.stderr and "ConfigError" in done.stderr, argv
    done = mel("run", "--config", "configs/no-such-config.yaml")  # without it: the one line and its hint
    assert done.returncode == 2 and "Traceback" not in done.stderr and "--debug" in done.stderr
