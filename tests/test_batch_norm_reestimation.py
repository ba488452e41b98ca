"""init.reestimate_batch_norm: batch-norm statistics re-estimated on train batches, the function kept."""

import numpy as np
import pytest
import tf_keras as keras

from deeplabq.config import ConfigError
from deeplabq.model import DeepLabSpec, build_deeplab
from deeplabq.quant_modes import validate_config
from deeplabq.training import reestimate_batch_norm_statistics

from .conftest import compose_config


def _folded_like(model, rng):
    """BN layers as in a checkpoint with folded batch norm (moving 0/1, beta = bias), random gamma."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.moving_mean.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.beta.assign(rng.normal(0.0, 0.5, n).astype(np.float32))
            layer.moving_mean.assign(np.zeros(n, np.float32))
            layer.moving_variance.assign(np.ones(n, np.float32))


@pytest.fixture(scope="module")
def tiny():
    rng = np.random.default_rng(0)
    model = build_deeplab(DeepLabSpec(num_classes=3, crop_size=(33, 33), depth_multiplier=0.35, aspp_channels=16,
                                      dropout_rate=0.0))
    _folded_like(model, rng)
    images = [rng.uniform(0, 255, (4, 33, 33, 3)).astype(np.float32) for _ in range(3)]
    return model, images


def test_output_is_kept_and_statistics_are_the_measured_ones(tiny):
    model, images = tiny
    held_out = np.random.default_rng(1).uniform(0, 255, (2, 33, 33, 3)).astype(np.float32)
    before = model(held_out, training=False).numpy()
    conv1_input = keras.Model(model.input, model.get_layer("bn_Conv1").input)(np.concatenate(images[:2]))
    assert reestimate_batch_norm_statistics(model, iter(images), 2) == 54
    after = model(held_out, training=False).numpy()
    np.testing.assert_allclose(after, before, atol=1e-3 * np.abs(before).max())
    bn = model.get_layer("bn_Conv1")
    x = conv1_input.numpy().reshape(-1, conv1_input.shape[-1])
    np.testing.assert_allclose(bn.moving_mean.numpy(), x.mean(0), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(bn.moving_variance.numpy(), x.var(0), rtol=1e-3, atol=1e-4)
    assert not np.allclose(bn.moving_variance.numpy(), 1.0)


def test_batch_statistics_training_starts_from_the_same_function(tiny):
    """Estimated on one batch, a training-mode pass over that batch (batch statistics) equals inference."""
    model, images = tiny
    reestimate_batch_norm_statistics(model, iter([(images[2], None)]), 1)  # (images, labels) batches work too
    inference = model(images[2], training=False).numpy()
    batch_stats = model(images[2], training=True).numpy()
    np.testing.assert_allclose(batch_stats, inference, atol=2e-3 * np.abs(inference).max())


@pytest.mark.parametrize(("overrides", "message"), [
    (["init.reestimate_batch_norm=-1"], "init.reestimate_batch_norm must be"),
    (["init.reestimate_batch_norm=8"], "needs init.source other than scratch"),
])
def test_bad_reestimate_values_are_refused(tmp_path, overrides, message):
    cfg = compose_config(tmp_path, overrides)
    with pytest.raises(ConfigError, match=message):
        validate_config(cfg)


def test_runs_reestimate_after_loading_a_deeplab_checkpoint(tmp_path, tiny_overrides):
    """A run that starts from init re-estimates, and says so in the run's init tag. Both modes that start
    from init (float, delayed QAT) do it through the same ``quant_modes.common.initialize``."""
    from deeplabq.checkpoints import save_deeplab_tf1_checkpoint
    from deeplabq.model import spec_from_config
    from deeplabq.tasks.train import train

    from .conftest import only_run

    overrides = [*tiny_overrides, "quant=float", "train.steps=4", "train.checkpoint_every_steps=4"]
    source = build_deeplab(spec_from_config(compose_config(tmp_path, overrides)))
    _folded_like(source, np.random.default_rng(2))
    prefix = save_deeplab_tf1_checkpoint(source, tmp_path / "zoo" / "model.ckpt")
    cfg = compose_config(tmp_path, [*overrides, "init.source=deeplab_checkpoint", f"init.path={prefix}",
                                    "init.reestimate_batch_norm=2"])
    train(cfg, tmp_path / "run")
    tag = only_run(tmp_path, status="FINISHED").data.tags["deeplabq.init"]
    assert tag.startswith("deeplab_checkpoint:") and "re-estimated on 2 train batches" in tag, tag
