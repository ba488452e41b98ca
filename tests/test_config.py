"""Every option of every config group composes, and impossible values are refused by name."""

import pytest
from hydra import compose, initialize_config_dir

from deeplabq.config import ConfigError
from deeplabq.model import spec_from_config
from deeplabq.quant_modes import validate_config

from .conftest import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def default_choices(primary: str) -> dict[str, str]:
    """The option each group of ``conf/<primary>.yaml`` composes when none is given."""
    from omegaconf import OmegaConf

    entries = OmegaConf.to_container(OmegaConf.load(CONF_DIR / f"{primary}.yaml"))["defaults"]
    return {k: v for entry in entries if isinstance(entry, dict) for k, v in entry.items()}


# Every option a primary config does not compose by default (the defaults themselves: test_default_config_is_valid
# and every other test); the train group belongs to train.py only.
COMPOSE_CASES = [(primary, group, option) for primary in ("train", "evaluate", "convert")
                 for group, default in default_choices(primary).items() if group in GROUPS
                 for option in options(group) if option != default]


@pytest.mark.parametrize(("primary", "group", "option"), COMPOSE_CASES)
def test_every_group_option_composes(tmp_path, primary, group, option):
    extra = ["dataset.root=/data/x", "dataset.num_classes=3"] if (group, option) == ("dataset", "folder") else []
    cfg = compose_config(tmp_path, [f"{group}={option}", *extra], config_name=primary)
    # Every value resolves (no dangling interpolation) and the model spec can be built.
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)
    spec_from_config(cfg).validate()


def test_compose_cases_cover_every_option_and_no_default():
    for primary in ("train", "evaluate", "convert"):
        chosen = default_choices(primary)
        cases = {(g, o) for p, g, o in COMPOSE_CASES if p == primary}
        assert not any(chosen.get(g) == o for g, o in cases)
        assert all((g, o) in cases or chosen[g] == o for g in chosen if g in GROUPS for o in options(g))
    assert not any(g == "train" for p, g, _ in COMPOSE_CASES if p != "train")


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")))
def test_every_experiment_preset_composes_and_validates(tmp_path, experiment):
    overrides = [f"experiment={experiment}"]
    cfg = compose_config(tmp_path, overrides)
    if cfg.quant.mode in ("qat_finetune", "ptq"):
        with pytest.raises(ConfigError, match="quant.float_checkpoint"):
            validate_config(cfg)  # presets that start from a float model say so until given one
        overrides.append("quant.float_checkpoint=/runs/float")
    if cfg.init.source == "deeplab_checkpoint" and cfg.init.path is None:
        overrides.append("init.path=/ckpt/model.ckpt-200000")
    validate_config(compose_config(tmp_path, overrides))


SEED_FLAGS = {
    # quantize.md's fine-tune command line
    "pascal_mnv2_qat_finetune": {"train.steps": 3000, "train.learning_rate": 3e-5, "dataset.crop_size": [513, 513],
                                 "train.batch_size": 8, "backbone.output_stride": 16, "quant.delay_steps": 0,
                                 "dataset.name": "pascal_voc_seg", "quant.mode": "qat_finetune",
                                 "quant.freeze_bn_delay": None, "train.fine_tune_batch_norm": True},
    # MLPerf's train.py flags
    "ade20k32_mlperf_float": {"train.optimizer": "adam", "train.learning_rate": 5e-6, "train.batch_size": 4,
                              "dataset.crop_size": [512, 512], "head.decoder_output_stride": 4,
                              "train.fine_tune_batch_norm": False, "init.initialize_last_layer": False,
                              "dataset.num_classes": 32, "train.steps": 200000},
    "ade20k32_mlperf_qat": {"train.learning_rate": 1e-6, "quant.freeze_bn_delay": 0, "quant.delay_steps": 0,
                            "train.steps": 100000, "quant.mode": "qat_finetune"},
    "ade20k32_mlperf_ptq": {"quant.calibration_samples": 500, "export.input_type": "uint8", "quant.scheme": "int8"},
}


@pytest.mark.parametrize("experiment", sorted(SEED_FLAGS))
def test_seed_recipes_carry_the_seed_flags(tmp_path, experiment):
    from omegaconf import OmegaConf

    cfg = compose_config(tmp_path, [f"experiment={experiment}"])
    for key, value in SEED_FLAGS[experiment].items():
        got = OmegaConf.select(cfg, key)
        got = list(got) if not isinstance(got, (int, float, str, bool, type(None))) else got
        assert got == pytest.approx(value) if isinstance(value, float) else got == value, (key, got, value)


def test_quant_options_share_sweepable_keys():
    keys = None
    for option in options("quant"):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("train", overrides=[f"quant={option}"])
        option_keys = set(cfg.quant.keys())
        keys = option_keys if keys is None else keys
        assert option_keys == keys, f"quant={option} has keys {option_keys ^ keys} the others lack"


def test_worst_float_layers_need_the_error_report(tmp_path):
    cfg = compose_config(tmp_path, ["export.int8_float_worst_layers=3", "export.int8_debug_images=0"])
    with pytest.raises(ConfigError, match="export.int8_debug_images > 0"):
        validate_config(cfg)


def test_default_config_is_valid(tmp_path):
    validate_config(compose_config(tmp_path))


def test_mlflow_store_is_sqlite_at_absolute_path():
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        cfg = compose("train")
    uri = cfg.tracking.tracking_uri
    assert uri.startswith("sqlite:////"), uri  # sqlite:/// + an absolute path


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("backbone.depth_multiplier=0", "backbone.depth_multiplier"),
        ("backbone.output_stride=12", "backbone.output_stride"),
        ("dataset.crop_size=[8,8]", "dataset.crop_size"),
        ("train.steps=0", "train.steps"),
        ("train.optimizer=rmsprop", "train.optimizer"),
        ("quant.mode=int4", "quant.mode"),
        ("init.source=deeplab_checkpoint", "init.path"),
        ("export.output=probabilities", "export.output"),
        ("export.int8_debug_images=-1", "export.int8_debug_images"),
        ("export.int8_float_worst_layers=-2", "export.int8_float_worst_layers"),
    ],
)
def test_impossible_values_are_refused_by_key(tmp_path, override, key):
    cfg = compose_config(tmp_path, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["quant.delay_steps=0", "quant.freeze_bn_delay=0"], "freeze_bn_delay=0 freezes .* never trained"),
        (["quant.delay_steps=100", "quant.freeze_bn_delay=50"], "freeze_bn_delay=50 is before quant.delay_steps=100"),
        (["quant.delay_steps=100", "quant.freeze_bn_delay=300"], "freeze_bn_delay=300 is not before the end"),
    ],
)
def test_batch_norm_freezes_only_trained_statistics_in_the_quantized_model(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, ["quant=qat_delayed", "train.steps=300", *overrides])
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)
    # after some training, at or after the switch; or from the start of a fine-tune of a trained float model
    validate_config(compose_config(tmp_path, ["quant=qat_delayed", "quant.delay_steps=0", "quant.freeze_bn_delay=1"]))
    validate_config(compose_config(tmp_path, ["quant=qat_finetune", "quant.float_checkpoint=/runs/float",
                                              "quant.freeze_bn_delay=0"]))
