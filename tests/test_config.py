"""Every option of every config group composes, and impossible values are refused by name."""

import pytest
from hydra import compose, initialize_config_dir

from deeplabq.config import ConfigError, validate_config
from deeplabq.model import spec_from_config

from .conftest import CONF_DIR, compose_config

GROUPS = sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name not in ("hydra", "experiment"))


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


@pytest.mark.parametrize("primary", ["train", "evaluate", "convert"])
@pytest.mark.parametrize(("group", "option"), [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes(tmp_path, primary, group, option):
    if group == "train" and primary != "train":
        pytest.skip("the train group belongs to train.py only")
    extra = ["dataset.root=/data/x", "dataset.num_classes=3"] if (group, option) == ("dataset", "folder") else []
    cfg = compose_config(tmp_path, [f"{group}={option}", *extra], config_name=primary)
    # Every value resolves (no dangling interpolation) and the model spec can be built.
    from omegaconf import OmegaConf

    OmegaConf.to_container(cfg, resolve=True)
    spec_from_config(cfg).validate()


@pytest.mark.parametrize("experiment", [p.stem for p in (CONF_DIR / "experiment").glob("*.yaml")])
def test_every_experiment_preset_composes_and_validates(tmp_path, experiment):
    cfg = compose_config(tmp_path, [f"experiment={experiment}"])
    validate_config(cfg)


def test_quant_options_share_sweepable_keys():
    keys = None
    for option in options("quant"):
        with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
            cfg = compose("train", overrides=[f"quant={option}"])
        option_keys = set(cfg.quant.keys())
        keys = option_keys if keys is None else keys
        assert option_keys == keys, f"quant={option} has keys {option_keys ^ keys} the others lack"


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
    ],
)
def test_impossible_values_are_refused_by_key(tmp_path, override, key):
    cfg = compose_config(tmp_path, [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)
