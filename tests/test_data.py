"""deeplabq.data on tiny real files in each dataset's on-disk layout (written under tmp_path with PIL)."""

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from deeplabq.data import (
    DatasetError,
    FileReader,
    cached_pipeline,
    check_files,
    input_pipeline,
    iterate,
    open_split,
    postprocess_labels,
    preprocess_for_eval,
    reader_names,
    register_reader,
    unregister_reader,
)
from deeplabq.errors import UserError

from .conftest import compose_config, make_bad_folder_dataset, only_run, tiny_folder_overrides

CONF_DIR = Path(__file__).parents[1] / "conf"


def dataset_cfg(*overrides):
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF_DIR)):
        return compose("train", overrides=list(overrides)).dataset


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def save(array, path: Path, mode=None, palette=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(array, mode) if mode else Image.fromarray(array)
    if palette is not None:
        img.putpalette(palette)
    img.save(path)
    return path


def block_label(h, w, values):
    """Vertical stripes of the given ids, so every value is present and survives resizing."""
    columns = np.array(values)[np.arange(w) * len(values) // w]
    return np.broadcast_to(columns, (h, w)).astype(np.uint8)


def make_camvid(root: Path, split="train", n=3, hw=(8, 10), labels=(0, 3, 10, 11)):
    for i in range(n):
        save(random_image(*hw, seed=i), root / split / f"img{i}.png")
        save(block_label(*hw, labels), root / f"{split}annot" / f"img{i}.png")
    return root


def camvid_cfg(root, *overrides):
    return dataset_cfg("dataset=camvid", f"dataset.root={root}", *overrides)


# ------------------------------------------------------------------------------------------- readers


def test_camvid_pairs_sorted_and_values_kept(tmp_path):
    make_camvid(tmp_path)
    data = open_split(camvid_cfg(tmp_path), "train")
    assert len(data) == 3 and data.image_ids == ["img0", "img1", "img2"]
    image, label = data.load(1)
    np.testing.assert_array_equal(image, random_image(8, 10, seed=1))
    np.testing.assert_array_equal(label, block_label(8, 10, (0, 3, 10, 11)))
    assert image.dtype == np.uint8 and label.dtype == np.uint8
    assert str(tmp_path / "train" / "img1.png") in data.describe(1)
    assert data.class_names[3] == "road" and data.ignore_label == 11


def test_pascal_voc_palette_indices_read_as_ids(tmp_path):
    ids = ["2007_000032", "2007_000039"]
    list_file = tmp_path / "ImageSets" / "Segmentation" / "train.txt"
    list_file.parent.mkdir(parents=True)
    list_file.write_text("\n".join(ids) + "\n")
    indices = np.full((12, 16), 255, np.uint8)  # VOC's 255 object border / void
    indices[2:10, 2:8], indices[2:10, 8:14] = 15, 0
    palette = [0, 0, 0] * 256
    palette[15 * 3 : 15 * 3 + 3], palette[255 * 3 : 255 * 3 + 3] = [192, 128, 128], [224, 224, 192]
    for i in ids:
        save(random_image(12, 16), tmp_path / "JPEGImages" / f"{i}.jpg")
        save(indices, tmp_path / "SegmentationClass" / f"{i}.png", mode="P", palette=palette)

    data = open_split(dataset_cfg("dataset=pascal_voc_seg", f"dataset.root={tmp_path}"), "train")
    assert data.image_ids == ids
    image, label = data.load(0)
    assert image.shape == (12, 16, 3)
    np.testing.assert_array_equal(label, indices)
    assert data.class_names[15] == "person"


@pytest.mark.parametrize(("name", "expected"), [("ade20k", [0, 5, 31, 32, 150]), ("ade20k_32", [0, 5, 31, 0, 0])])
def test_ade20k_labels_and_32_class_variant(tmp_path, name, expected):
    raw = block_label(6, 10, [0, 5, 31, 32, 150])
    for stem in ("ADE_val_00000001", "ADE_val_00000002"):
        save(random_image(6, 10), tmp_path / "images" / "validation" / f"{stem}.jpg")
        save(raw, tmp_path / "annotations" / "validation" / f"{stem}.png")
    data = open_split(dataset_cfg(f"dataset={name}", f"dataset.root={tmp_path}"), "validation")
    assert data.image_ids == ["ADE_val_00000001", "ADE_val_00000002"]
    np.testing.assert_array_equal(data.load(1)[1], block_label(6, 10, expected))


def test_cityscapes_label_ids_mapped_to_train_ids(tmp_path):
    raw = block_label(4, 14, [7, 8, 26, 33, 0, 1, 34])
    for city, frame in (("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")):
        save(random_image(4, 14), tmp_path / "leftImg8bit" / "val" / city / f"{frame}_leftImg8bit.png")
        save(raw, tmp_path / "gtFine" / "val" / city / f"{frame}_gtFine_labelIds.png")
    data = open_split(dataset_cfg("dataset=cityscapes", f"dataset.root={tmp_path}"), "val")
    assert data.image_ids == ["aachen_000000_000019", "bremen_000001_000019"]
    np.testing.assert_array_equal(data.load(0)[1], block_label(4, 14, [0, 1, 13, 18, 255, 255, 255]))


def dataset_yamls() -> dict[str, Path]:
    """``name`` of each conf/dataset/*.yaml -> its file."""
    return {str(OmegaConf.load(p)["name"]): p for p in sorted((CONF_DIR / "dataset").glob("*.yaml"))}


@pytest.mark.parametrize("name", sorted(set(reader_names()) | set(dataset_yamls())))
def test_each_reader_has_its_dataset_yaml_and_each_yaml_a_reader(name):
    yamls = dataset_yamls()
    assert name in yamls, f"reader {name!r} has no conf/dataset/{name}.yaml"
    assert name in reader_names(), f"{yamls[name]} is dataset.name={name!r}, which no reader is registered under"
    assert yamls[name].stem == name


def test_unknown_name_lists_the_registered_readers():
    with pytest.raises(DatasetError, match=r"dataset\.name='nope' has no reader; known: ") as err:
        open_split(dataset_cfg("dataset.name=nope"), "train")
    assert str(err.value).endswith(", ".join(reader_names()))


@pytest.fixture
def tiny_reader():
    """A reader registered by the test: CamVid's layout, raw label 10 mapped to the ignore label by its LUT."""

    @register_reader("tiny_test")
    class Tiny(FileReader):
        def files(self, root, split, dataset_cfg):
            images = sorted((root / split).glob("*.png"))
            return [p.stem for p in images], images, [root / f"{split}annot" / p.name for p in images]

        def label_lut(self, dataset_cfg, ignore_label):
            lut = np.arange(256, dtype=np.uint8)
            lut[10] = ignore_label
            return lut

    try:
        yield Tiny
    finally:
        unregister_reader("tiny_test")


def test_registered_reader_is_found_by_open_split(tmp_path, tiny_reader):
    make_camvid(tmp_path, n=2)
    cfg = camvid_cfg(tmp_path, "dataset.name=tiny_test")
    data = open_split(cfg, "train")
    assert data.name == "tiny_test" and data.image_ids == ["img0", "img1"]
    np.testing.assert_array_equal(data.load(0)[1], block_label(8, 10, (0, 3, 11, 11)))
    with pytest.raises(ValueError, match="'tiny_test' is registered twice"):
        register_reader("tiny_test")(tiny_reader)
    unregister_reader("tiny_test")
    try:
        with pytest.raises(DatasetError, match="'tiny_test' has no reader"):
            open_split(cfg, "train")
    finally:
        register_reader("tiny_test")(tiny_reader)  # the fixture unregisters it


def make_folder(root: Path, classes=("sky", "ground", "thing")):
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    save(random_image(6, 8), root / "images" / "train" / "x.jpg")
    save(random_image(6, 8, seed=1), root / "images" / "train" / "y.png")
    for stem in ("x", "y"):
        save(block_label(6, 8, [0, 2, 255]), root / "labels" / "train" / f"{stem}.png")
    return root


def test_folder_reads_class_names_from_classes_txt(tmp_path):
    make_folder(tmp_path)
    data = open_split(dataset_cfg("dataset=folder", f"dataset.root={tmp_path}", "dataset.num_classes=3"), "train")
    assert data.class_names == ["sky", "ground", "thing"] and data.image_ids == ["x", "y"]
    np.testing.assert_array_equal(data.load(1)[1], block_label(6, 8, [0, 2, 255]))


def test_synthetic_is_deterministic_and_has_several_classes():
    cfg = dataset_cfg("dataset.image_size=[112,144]", "dataset.splits={train:96,val:24}")
    a, b = open_split(cfg, "train"), open_split(cfg, "train")
    assert len(a) == 96 and len(open_split(cfg, "val")) == 24
    b.load(7)  # loading other indices first must not change an example
    for i in (5, 0):
        np.testing.assert_array_equal(a.load(i)[0], b.load(i)[0])
        np.testing.assert_array_equal(a.load(i)[1], b.load(i)[1])
    assert not np.array_equal(a.load(5)[0], a.load(6)[0])
    assert not np.array_equal(a.load(0)[0], open_split(cfg, "val").load(0)[0])
    image, label = a.load(0)
    assert image.shape == (112, 144, 3) and image.dtype == np.uint8 and label.shape == (112, 144)
    present = [set(np.unique(a.load(i)[1]).tolist()) for i in range(8)]
    assert all(len(p) >= 3 for p in present)
    assert set().union(*present) == {0, 1, 2, 3, 4}


# ------------------------------------------------------------------------------------------ pipelines


def test_training_pipeline_shapes_dtypes_and_label_values():
    cfg = dataset_cfg("dataset.image_size=[80,96]", "dataset.crop_size=[97,97]", "dataset.splits.train=12")
    data = open_split(cfg, "train")
    batches = list(input_pipeline(data, cfg, training=True, batch_size=4, seed=3).take(3))
    for images, labels in batches:
        assert images.shape == (4, 97, 97, 3) and images.dtype == tf.float32
        assert labels.shape == (4, 97, 97) and labels.dtype == tf.int32
        assert 0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 255
        assert set(np.unique(labels.numpy())) <= {0, 1, 2, 3, 4, 255}
    assert 255 in np.unique(batches[0][1].numpy())  # 80x96 scenes at scale <= 1 are padded to 97x97
    again = next(iter(input_pipeline(data, cfg, training=True, batch_size=4, seed=3)))
    np.testing.assert_array_equal(again[0].numpy(), batches[0][0].numpy())  # seeded: reproducible


def test_training_pads_with_mean_pixel_and_ignore_label(tmp_path):
    make_camvid(tmp_path, n=1)
    cfg = camvid_cfg(
        tmp_path, "dataset.crop_size=[16,20]", "dataset.min_scale_factor=1.0",
        "dataset.max_scale_factor=1.0", "dataset.flip=false",
    )
    images, labels = next(iter(input_pipeline(open_split(cfg, "train"), cfg, training=True, batch_size=2)))
    image, label = images[1].numpy(), labels[1].numpy()
    np.testing.assert_array_equal(image[:8, :10], random_image(8, 10, seed=0).astype(np.float32))
    np.testing.assert_array_equal(label[:8, :10], block_label(8, 10, (0, 3, 10, 11)))
    assert (image[8:] == 127.5).all() and (image[:, 10:] == 127.5).all()
    assert (label[8:] == 11).all() and (label[:, 10:] == 11).all()


def test_eval_pipeline_is_unaugmented_padded_and_keeps_last_batch(tmp_path):
    make_camvid(tmp_path, split="val")
    cfg = camvid_cfg(tmp_path, "dataset.crop_size=[16,20]")
    data = open_split(cfg, "val")
    batches = list(input_pipeline(data, cfg, training=False, batch_size=2))
    assert [b[0].shape[0] for b in batches] == [2, 1]
    images = np.concatenate([b[0].numpy() for b in batches])
    labels = np.concatenate([b[1].numpy() for b in batches])
    for i in range(3):
        np.testing.assert_array_equal(images[i, :8, :10], random_image(8, 10, seed=i))
        np.testing.assert_array_equal(labels[i, :8, :10], block_label(8, 10, (0, 3, 10, 11)))
    assert (images[:, 8:] == 127.5).all() and (labels[:, :, 10:] == 11).all()
    # the numpy evaluator path gives exactly the pipeline's input
    padded, padded_label, valid_hw = preprocess_for_eval(*data.load(2), cfg)
    assert valid_hw == (8, 10) and padded.dtype == np.float32
    np.testing.assert_array_equal(padded, images[2])
    np.testing.assert_array_equal(padded_label, labels[2])

    cached = list(cached_pipeline(data, cfg, training=False, batch_size=2, num_batches=2).take(4))
    np.testing.assert_array_equal(cached[0][0].numpy(), batches[0][0].numpy())
    np.testing.assert_array_equal(cached[2][1].numpy(), batches[0][1].numpy())  # repeats from the cache


def test_preprocess_resizes_like_deeplab_and_postprocess_restores_size(tmp_path):
    cfg = dataset_cfg(
        "dataset=ade20k_32", f"dataset.root={tmp_path}", "dataset.crop_size=[33,33]",
        "dataset.min_resize_value=33", "dataset.max_resize_value=33", "dataset.resize_factor=8",
    )
    label = block_label(20, 30, [1, 2, 3, 4, 5])
    image, padded_label, valid_hw = preprocess_for_eval(random_image(20, 30), label, cfg)
    assert image.shape == (33, 33, 3) and padded_label.shape == (33, 33)
    assert valid_hw == (25, 33)  # long side 33, short side rounded up to 8k+1
    assert (image[25:] == 127.5).all() and (padded_label[25:] == 0).all()
    restored = postprocess_labels(padded_label, valid_hw, (20, 30))
    assert restored.shape == (20, 30)
    assert (restored == label).mean() > 0.95

    # deeplab's own numbers for a 375x500 VOC image at 512/512, factor 16: long side capped at 497
    cfg_512 = dataset_cfg("dataset=ade20k_32", f"dataset.root={tmp_path}")
    assert preprocess_for_eval(np.zeros((375, 500, 3), np.uint8), None, cfg_512)[2] == (385, 497)


def test_postprocess_without_resize_is_exact():
    label = block_label(7, 9, [0, 4, 2])
    padded = np.pad(label, ((0, 5), (0, 3)), constant_values=255)
    np.testing.assert_array_equal(postprocess_labels(padded, (7, 9), (7, 9)), label)


def test_eval_image_larger_than_crop_names_crop_size(tmp_path):
    make_camvid(tmp_path, split="val", n=1, hw=(30, 40))
    cfg = camvid_cfg(tmp_path, "dataset.crop_size=[16,20]")
    with pytest.raises(DatasetError, match=r"dataset\.crop_size"):
        preprocess_for_eval(random_image(30, 40), None, cfg)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"img0\.png.*dataset\.crop_size"):
        list(input_pipeline(open_split(cfg, "val"), cfg, training=False, batch_size=1))


# ---------------------------------------------------------------------------------------- bad input


def test_missing_root_names_path_and_key(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(DatasetError, match="dataset.root") as err:
        open_split(camvid_cfg(missing), "train")
    assert str(missing) in str(err.value)


def test_empty_split_names_directory(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no .*png files") as err:
        open_split(camvid_cfg(tmp_path), "train")
    assert str(tmp_path / "train") in str(err.value)


def test_missing_voc_split_file_and_missing_label_are_named(tmp_path):
    with pytest.raises(DatasetError, match=r"ImageSets/Segmentation/val\.txt"):
        open_split(dataset_cfg("dataset=pascal_voc_seg", f"dataset.root={tmp_path}"), "val")
    make_camvid(tmp_path, n=2)
    (tmp_path / "trainannot" / "img1.png").unlink()
    with pytest.raises(DatasetError, match=r"1 of 2 .*trainannot/img1\.png"):
        open_split(camvid_cfg(tmp_path), "train")


def test_corrupt_image_names_file_also_through_pipeline(tmp_path):
    make_camvid(tmp_path, n=2)
    (tmp_path / "train" / "img1.png").write_bytes(b"\x89PNG but not really" + bytes(range(200)))
    cfg = camvid_cfg(tmp_path)
    data = open_split(cfg, "train")
    with pytest.raises(DatasetError, match=r"cannot read image .*train/img1\.png"):
        data.load(1)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"DatasetError: cannot read image .*img1\.png"):
        list(input_pipeline(data, cfg, training=True, batch_size=2, repeat=False))
    # iterate(), what training and evaluation read batches with, gives back the reader's own error, one line
    with pytest.raises(DatasetError) as error:
        list(iterate(input_pipeline(data, cfg, training=True, batch_size=2, repeat=False)))
    assert str(error.value).startswith("cannot read image ") and "img1.png" in str(error.value)
    assert "\n" not in str(error.value) and error.value.__cause__ is None and error.value.__suppress_context__


def test_iterate_keeps_errors_that_are_not_the_readers(tmp_path):
    """An op error without a DatasetError inside is a bug: it propagates as TensorFlow raised it."""
    import numpy as np

    def broken(index):
        raise ZeroDivisionError("not a reader error")

    dataset = tf.data.Dataset.range(2).map(lambda i: tf.numpy_function(broken, [i], tf.int64))
    with pytest.raises(tf.errors.UnknownError, match="ZeroDivisionError: not a reader error"):
        list(iterate(dataset))
    assert [int(x) for x in iterate(tf.data.Dataset.from_tensor_slices(np.arange(3)))] == [0, 1, 2]  # and it ends


def test_image_label_size_mismatch_names_both_files(tmp_path):
    make_camvid(tmp_path, n=1)
    save(block_label(9, 10, [0]), tmp_path / "trainannot" / "img0.png")
    with pytest.raises(DatasetError, match=r"train/img0\.png is 8x10 .*trainannot/img0\.png is 9x10"):
        open_split(camvid_cfg(tmp_path), "train").load(0)


def test_out_of_range_label_names_file_and_value(tmp_path):
    make_camvid(tmp_path, n=1, labels=(0, 11, 12))  # 11 is CamVid's void, 12 is no class
    with pytest.raises(DatasetError, match=r"trainannot/img0\.png has values \[12\]"):
        open_split(camvid_cfg(tmp_path), "train").load(0)


def test_rgb_label_is_rejected(tmp_path):
    make_camvid(tmp_path, n=1)
    save(random_image(8, 10), tmp_path / "trainannot" / "img0.png")
    with pytest.raises(DatasetError, match=r"img0\.png has mode RGB"):
        open_split(camvid_cfg(tmp_path), "train").load(0)


def test_classes_txt_mismatch_names_both(tmp_path):
    make_folder(tmp_path, classes=("a", "b"))
    cfg = dataset_cfg("dataset=folder", f"dataset.root={tmp_path}", "dataset.num_classes=3")
    with pytest.raises(DatasetError, match=r"classes\.txt lists 2 class names but dataset\.num_classes is 3"):
        open_split(cfg, "train")


def test_unset_folder_root_names_key():
    with pytest.raises(DatasetError, match=r"dataset\.root must be set"):
        open_split(dataset_cfg("dataset=folder", "dataset.num_classes=3"), "train")


# ------------------------------------------------------------------------------ checking every file upfront


def test_check_files_names_every_bad_file_in_one_error(tmp_path):
    bad = make_bad_folder_dataset(tmp_path)
    cfg = dataset_cfg("dataset=folder", f"dataset.root={tmp_path}", "dataset.num_classes=3")
    train, val = open_split(cfg, "train"), open_split(cfg, "val")
    check_files(train)  # the good split passes
    with pytest.raises(DatasetError) as err:
        check_files(train, val, val)  # a split given twice is checked once
    assert isinstance(err.value, UserError) and isinstance(err.value, ValueError)
    first, *rest = str(err.value).splitlines()
    # files in the split's (sorted) order: out_of_range, truncated, wrong_size
    assert first.startswith(f"3 bad files in folder val: first: {bad['out_of_range']}: label has values [7] "
                            "outside 0..2 that are not the ignore label 255"), first
    assert len(rest) == 2
    assert rest[0].startswith(f"  {bad['truncated']}: cannot be decoded as an image: "), rest[0]
    assert rest[1] == (f"  {bad['wrong_size']}: label is 20x32 but its image {tmp_path}/images/val/wrong_size.jpg "
                       "is 24x32 (height x width)")


def test_check_files_lists_twenty_files_then_counts_the_rest(tmp_path):
    make_camvid(tmp_path, n=23, labels=(0, 12))  # 12 is no CamVid class
    make_camvid(tmp_path, split="val", n=1)
    cfg = camvid_cfg(tmp_path)
    message = str(pytest.raises(DatasetError, check_files, open_split(cfg, "train"), open_split(cfg, "val")).value)
    lines = message.splitlines()
    assert lines[0].startswith(f"23 bad files in camvid train: first: {tmp_path}/trainannot/img0.png: label has "
                               "values [12]")
    assert len(lines) == 21 and lines[-1] == "  ... and 3 more"
    check_files(open_split(dataset_cfg(), "train"))  # synthetic: no files, nothing to check


def test_train_stops_before_step_one_on_a_bad_eval_file(tmp_path, mlflow_store):
    from deeplabq.tasks.train import train

    bad = make_bad_folder_dataset(tmp_path / "data")
    cfg = compose_config(tmp_path, tiny_folder_overrides(tmp_path / "data"))
    with pytest.raises(DatasetError, match=r"^3 bad files in folder val: first: "):
        train(cfg, tmp_path / "run")
    run = only_run(tmp_path, status="FAILED")
    assert all(str(path) in run.data.tags["deeplabq.error"] for path in bad.values())
    assert "loss" not in run.data.metrics and not (tmp_path / "run" / "checkpoints").exists()
