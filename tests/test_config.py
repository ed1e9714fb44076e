import pytest

from mel_core import config as C


def test_tiny_config_loads_with_extends():
    cfg = C.load("configs/tiny.yaml")
    assert cfg.model.name_or_path == "tiny"
    assert cfg.sampling.group_size == 8  # from base.yaml
    assert cfg.prompts.dir == "configs/prompts/tiny"  # tiny.yaml overrides base.yaml


def test_overrides_apply_and_are_typed():
    cfg = C.load("configs/tiny.yaml", ["run.steps=3", "loss.nll_coef=0.5"])
    assert cfg.run.steps == 3 and cfg.loss.nll_coef == 0.5


def test_typo_in_file_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sampling:\n  group_sise: 4\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(bad)
    assert "group_sise" in str(e.value) and str(bad) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("extends: " + str(C.Path("configs/base.yaml").resolve()) + "\noptim:\n  lr: fast\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(bad)
    assert "optim.lr" in str(e.value) and str(bad) in str(e.value)


def test_override_typo_is_named():
    with pytest.raises(C.ConfigError) as e:
        C.load("configs/tiny.yaml", ["loss.nll_coeff=2"])
    assert "nll_coeff" in str(e.value) and "override" in str(e.value)


def test_cross_field_validation():
    with pytest.raises(C.ConfigError, match="sampling.group_size"):
        C.load("configs/tiny.yaml", ["sampling.group_size=1"])
    with pytest.raises(C.ConfigError, match="loss.advantage"):
        C.load("configs/tiny.yaml", ["loss.advantage=nope"])
    with pytest.raises(C.ConfigError, match="model.engine"):
        C.load("configs/tiny.yaml", ["model.engine=sglang"])
    with pytest.raises(C.ConfigError, match="model.device"):
        C.load("configs/tiny.yaml", ["model.device=tpu"])
    with pytest.raises(C.ConfigError, match="orchestration.runner"):
        C.load("configs/tiny.yaml", ["orchestration.runner=dask"])
    with pytest.raises(C.ConfigError, match="orchestration.runner"):  # Ray workers run the HF engine only
        C.load("configs/tiny.yaml", ["orchestration.runner=ray", "model.engine=vllm"])


def test_every_field_documented_with_source():
    rows = C.describe()
    assert len(rows) > 40
    for key, source, help_ in rows:
        assert help_, f"{key} has no doc"
        assert source in (C.PAPER, C.CHOICE), key


def test_round_trip_and_hash_stability():
    cfg = C.load("configs/tiny.yaml")
    again = C.from_dict(C.to_dict(cfg))
    assert C.config_hash(cfg) == C.config_hash(again)
    longer = C.load("configs/tiny.yaml", ["run.steps=50"])
    assert C.config_hash(longer) == C.config_hash(cfg)  # extending a campaign keeps its identity
    other = C.load("configs/tiny.yaml", ["optim.lr=0.5"])
    assert C.config_hash(other) != C.config_hash(cfg)
    # where a run lives, how it is evaluated or retried does not change what it trains
    for neutral in ("run.root_dir=/elsewhere", "eval.k=4", "orchestration.default.retries=5", "run.torch_threads=1",
                    "run.async_save=false", "model.engine=vllm", "model.vllm.kv_cache_gib=2", "model.device=cpu",
                    "orchestration.runner=ray", "orchestration.ray.address=auto"):
        assert C.config_hash(C.load("configs/tiny.yaml", [neutral])) == C.config_hash(cfg), neutral
    assert C.config_hash(C.load("configs/tiny.yaml", ["experience.analysis_mode=two_pass"])) != C.config_hash(cfg)


def test_master_dtype_joins_the_identity_only_where_it_changes_training():
    """Weights kept in the compute dtype is how every config trained before model.master_dtype: such a config hashes
    as it did (float32 configs keep their run ids). bfloat16 compute over float32 master weights trains otherwise:
    a new identity. A stored config from before (a whole to_dict without the key) kept its weights in model.dtype,
    and still does."""
    fp32 = C.load("configs/tiny.yaml")
    assert (fp32.model.dtype, fp32.model.master_dtype) == ("float32", "float32")
    mixed = C.load("configs/tiny.yaml", ["model.dtype=bfloat16"])
    pure = C.load("configs/tiny.yaml", ["model.dtype=bfloat16", "model.master_dtype=bfloat16"])
    assert mixed.model.master_dtype == "float32" and C.config_hash(mixed) != C.config_hash(pure)
    for cfg in (fp32, pure):
        stored = C.to_dict(cfg)
        del stored["model"]["master_dtype"]
        again = C.from_dict(stored)
        assert again.model.master_dtype == cfg.model.dtype and C.config_hash(again) == C.config_hash(cfg)
        assert C.load(base=stored).model.master_dtype == cfg.model.dtype
    with pytest.raises(C.ConfigError, match="model.master_dtype"):  # autocast only narrows
        C.load("configs/tiny.yaml", ["model.master_dtype=bfloat16"])


def test_the_vocabulary_names_exactly_what_is_implemented():
    """config.py validates against mel_core.vocabulary alone; each implementation covers its names exactly."""
    from mel_core import vocabulary as V
    from mel_core.algorithm import losses
    from mel_core.problems import worlds
    from mel_core.problems.worlds import rules
    from mel_core.step.stages import STAGE_VERSIONS

    assert set(losses.ADVANTAGES) == set(V.ADVANTAGES)
    assert set(losses.POLICY_LOSSES) == set(V.POLICY_LOSSES)
    assert [worlds.get(name).name for name in V.WORLDS] == list(V.WORLDS)
    assert set(V.RULES_EXCEPTION_RULES) <= set(rules.ERROR_TYPES)
    assert set(STAGE_VERSIONS) == set(V.ALL_STAGES)


def test_config_imports_only_its_leaves():
    """The config is a leaf: loading it imports no module of what it configures (no torch, no parser, no world)."""
    import subprocess
    import sys

    code = ("import sys, mel_core.config; "
            "print(sorted(m for m in sys.modules if m.startswith('mel_core.') or m == 'torch'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert eval(out) == ["mel_core.config", "mel_core.errors", "mel_core.vocabulary"]
