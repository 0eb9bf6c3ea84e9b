"""Sources: arrays, image folders (synthetic and real Omniglot), TFDS (mocked)."""


import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import testing


@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory):
    """The shared Omniglot zips, unzipped once per session."""
    return testing.omniglot_folder(tmp_path_factory.getbasetemp() / "omniglot_sources")


def _write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(np.asarray(array, np.uint8)).numpy())


@pytest.fixture
def rgb_folder(tmp_path):
    """Flat class folders of 6x8 RGB PNGs; pixel values known exactly."""
    root = tmp_path / "flat"
    for c, name in enumerate(["cat", "dog", "emu"]):
        for i in range(4):
            image = np.zeros((6, 8, 3), np.uint8)
            image[..., c] = 255  # a pure red, green or blue image
            image[0, 0] = [i * 50] * 3
            _write_png(root / name / f"{i}.png", image)
    (root / "dog" / "notes.txt").write_text("not an image")
    return root


# ----------------------------------------------------------------------
# from_arrays and Source


def test_from_arrays_remaps_labels_and_names_classes():
    x = np.arange(12, dtype="float32").reshape(6, 2)
    source = km.data.from_arrays(x, [[7], [3], [7], [100], [3], [3]])
    assert source.class_names == ("3", "7", "100")
    np.testing.assert_array_equal(source.y, [1, 0, 1, 2, 0, 0])
    np.testing.assert_array_equal(source.examples_per_class, [3, 2, 1])
    assert source.y.dtype == np.int32 and source.example_shape == (2,)
    named = km.data.from_arrays(x, [7, 3, 7, 100, 3, 3], class_names={3: "three", 7: "seven"})
    assert named.class_names == ("three", "seven", "100")
    listed = km.data.from_arrays(x, [7, 3, 7, 100, 3, 3], class_names=["a", "b", "c"])
    assert listed.class_names == ("a", "b", "c")
    # the caller's array stays writable; the source's does not
    assert x.flags.writeable and not source.x.flags.writeable


def test_from_arrays_any_shape():
    source = km.data.from_arrays(np.zeros((10, 3, 4, 5, 2)), np.arange(10) % 2)
    assert source.example_shape == (3, 4, 5, 2) and len(source) == 10
    assert "10 examples of shape (3, 4, 5, 2)" in repr(source)


@pytest.mark.parametrize("x, y, match", [
    (np.zeros((5, 2)), np.arange(4), r"`x` and `y` must have the same length \(one label "
                                     r"per example\)\. Received: len\(x\)=5, len\(y\)=4"),
    (np.zeros((3, 2)), np.array([0.0, 1.5, 2.0]), r"`y` must hold integer class labels\. "
                                                  r"Received: y with dtype float64 "
                                                  r"\(first value 0\.0\)"),
    (np.zeros((3, 2)), np.array(["a", "b", "c"]), r"`y` must hold integer class labels"),
    (np.zeros((3, 2)), np.zeros((3, 2), int), r"`y` must be one integer label per example, "
                                              r"shape \[num_examples\]\. Received: y with "
                                              r"shape \(3, 2\)"),
    (np.zeros((0, 2)), np.zeros((0,), int), r"Source 'arrays' is empty"),
    (np.float32(1.0), np.zeros((1,), int), r"`x` must be an array"),
])
def test_from_arrays_errors(x, y, match):
    with pytest.raises(ValueError, match=match):
        km.data.from_arrays(x, y)


def test_from_arrays_class_names_must_match():
    with pytest.raises(ValueError, match=r"`class_names` must name the 2 distinct labels\. "
                                         r"Received: 3 names"):
        km.data.from_arrays(np.zeros((4, 1)), [0, 1, 0, 1], class_names=["a", "b", "c"])


def test_subset_and_seeded_disjoint_splits():
    source = km.data.from_arrays(np.arange(40.0)[:, None], np.arange(40) // 2)
    assert source.num_classes == 20
    train, validation, test = source.split((12, 3, 5), seed=1, names=["tr", "va", "te"])
    names = [set(s.class_names) for s in (train, validation, test)]
    assert [len(n) for n in names] == [12, 3, 5]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert set.union(*names) == set(source.class_names)
    # the cbfinn/iMAML convention: random.Random(seed).shuffle of the class list
    import random

    order = list(source.class_names)
    random.Random(1).shuffle(order)
    assert list(train.class_names) == order[:12] and list(test.class_names) == order[15:]
    assert train.metadata["split"] == "tr" and train.metadata["split_seed"] == 1
    assert train.name == "arrays/tr"
    # examples follow their class
    for part in (train, test):
        for value, label in zip(part.x[:, 0], part.y):
            assert str(int(value) // 2) == part.class_names[label]
    # deterministic for a seed, different for another
    again = source.split((12, 3, 5), seed=1)[0]
    assert again.class_names == train.class_names
    assert source.split((12, 3, 5), seed=2)[0].class_names != train.class_names
    # fractions
    counts = [s.num_classes for s in source.split((0.5, 0.25, 0.25), seed=0)]
    assert counts == [10, 5, 5]
    assert [s.num_classes for s in source.split((0.7, 0.3))] == [14, 6]


def test_split_and_subset_errors():
    source = km.data.from_arrays(np.zeros((10, 1)), np.arange(10), name="ten")
    with pytest.raises(ValueError, match=r"asks for 8 \+ 4 = 12 classes, but source 'ten' "
                                         r"has only 10\. Pass fewer classes, or fractions"):
        source.split((8, 4))
    with pytest.raises(ValueError, match=r"fractions must sum to at most 1\. Received: "
                                         r"\(0\.8, 0\.4\) \(sum 1\.2\)"):
        source.split((0.8, 0.4))
    with pytest.raises(ValueError, match=r"non-negative counts \(ints\) or fractions"):
        source.split((5, -1))
    with pytest.raises(ValueError, match=r"Source 'ten' has no class 'x'"):
        source.subset(["x"])
    with pytest.raises(ValueError, match=r"Class index 10 is out of range for source 'ten' "
                                         r"with 10 classes"):
        source.subset([10])
    with pytest.raises(ValueError, match=r"`classes` must not repeat a class"):
        source.subset([1, 1])


def test_rotations_need_square_images_and_valid_angles():
    source = km.data.from_arrays(np.zeros((4, 3, 5)), [0, 0, 1, 1], name="wide")
    with pytest.raises(ValueError, match=r"Rotations need square images.*Source 'wide' has "
                                         r"examples of shape \(3, 5\)"):
        source.with_rotations()
    square = km.data.from_arrays(np.zeros((4, 3, 3)), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"`rotations` must be distinct angles among "
                                         r"\(0, 90, 180, 270\)\. Received: rotations=\(0, 45\)"):
        square.with_rotations((0, 45))
    rotated = square.with_rotations((0, 90))
    assert rotated.num_classes == 4 and rotated.class_names == ("0@0", "1@0", "0@90", "1@90")
    assert rotated.subset(["1"]).class_names == ("1@0", "1@90")


# ----------------------------------------------------------------------
# from_directory


def test_from_directory_rgb_exact_values(rgb_folder):
    source = km.data.from_directory(rgb_folder, image_size=None, color_mode="rgb")
    assert source.class_names == ("cat", "dog", "emu")
    assert source.x.shape == (12, 6, 8, 3) and source.x.dtype == np.float32
    np.testing.assert_array_equal(source.examples_per_class, [4, 4, 4])
    for image, label in zip(source.x, source.y):
        np.testing.assert_array_equal(image[1:, :, label], 1.0)  # its colour channel
        others = [c for c in range(3) if c != label]
        np.testing.assert_array_equal(image[1:, :, others], 0.0)
    corners = sorted(source.x[source.y == 0][:, 0, 0, 1])
    np.testing.assert_allclose(corners, np.arange(4) * 50 / 255, rtol=1e-6)
    assert source.metadata == {"source": "directory", "root": str(rgb_folder)}
    assert source.name == "flat"


def test_from_directory_grayscale_resize_invert(rgb_folder):
    gray = km.data.from_directory(rgb_folder, image_size=(3, 4))
    assert gray.x.shape == (12, 3, 4, 1)
    assert np.all((gray.x >= 0) & (gray.x <= 1))
    inverted = km.data.from_directory(rgb_folder, image_size=(3, 4), invert=True)
    np.testing.assert_allclose(inverted.x, 1.0 - gray.x, atol=1e-6)
    area = km.data.from_directory(rgb_folder, image_size=(3, 4), interpolation="area")
    # an area resize of a constant red image is its grey value, 0.2989
    red = area.x[area.y == 0][:, 1:, :, 0]
    np.testing.assert_allclose(red, 0.2989, atol=0.01)


def test_from_directory_class_folders_at_any_depth(tmp_path):
    for path in ["a/x/1.png", "a/x/2.PNG", "a/y/deep/1.png", "b/1.jpg"]:
        image = np.full((4, 4, 1), 255, np.uint8)
        if path.endswith(".jpg"):
            (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / path).write_bytes(tf.io.encode_jpeg(image).numpy())
        else:
            _write_png(tmp_path / path, image)
    source = km.data.from_directory(tmp_path, image_size=(2, 2))
    assert source.class_names == ("a/x", "a/y/deep", "b")
    np.testing.assert_array_equal(source.examples_per_class, [2, 1, 1])
    np.testing.assert_allclose(source.x, 1.0, atol=1e-2)


def test_from_directory_omniglot_layout(omniglot_dir):
    source = km.data.from_directory(omniglot_dir / "images_background_small1", invert=True)
    assert source.num_classes == 136 and len(source) == 2720
    assert source.class_names[0] == "Balinese/character01"
    assert all(n.count("/") == 1 for n in source.class_names)
    np.testing.assert_array_equal(source.examples_per_class, 20)
    assert source.x.shape == (2720, 28, 28, 1)
    # strokes are 1 on a background of 0 after inversion
    assert source.x.min() == 0.0 and source.x.max() == 1.0
    assert 0.03 < source.x.mean() < 0.25
    assert np.mean(source.x[:, 0, :, 0] < 0.05) > 0.95  # empty border rows


def test_from_directory_missing_and_empty(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"Image folder not found: `root`="
                                                rf"'{missing}' does not exist"):
        km.data.from_directory(missing)
    empty = tmp_path / "empty"
    (empty / "class_a").mkdir(parents=True)
    (empty / "class_b" / "readme.txt").parent.mkdir()
    (empty / "class_b" / "readme.txt").write_text("hi")
    with pytest.raises(ValueError, match=rf"No image files \(\.png, .*\) found in any folder "
                                         rf"under `root`='{empty}'"):
        km.data.from_directory(empty)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(NotADirectoryError, match=r"`root` must be a folder of class folders"):
        km.data.from_directory(a_file)


def test_from_directory_images_directly_in_root(tmp_path):
    _write_png(tmp_path / "1.png", np.zeros((2, 2, 1)))
    with pytest.raises(ValueError, match=r"Image files lie directly in `root`=.*expects one "
                                         r"sub-folder per class.*Found e\.g\. '1\.png'"):
        km.data.from_directory(tmp_path)


def test_from_directory_unreadable_images_are_named(rgb_folder):
    bad = rgb_folder / "emu" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    (rgb_folder / "cat" / "empty.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"Could not read or decode 2 image file\(s\) of "
                                         r"source 'flat':\n  '.*cat/empty\.jpg': an empty "
                                         r"file \(0 bytes\)\n  '.*emu/broken\.png': not a "
                                         r"valid image \(Unknown image file format\. One of "
                                         r"JPEG, .*PNG, GIF, BMP.* required\.\)\nRemove them"):
        km.data.from_directory(rgb_folder)


def test_from_directory_sizes_must_agree_without_resize(rgb_folder):
    _write_png(rgb_folder / "emu" / "big.png", np.zeros((9, 9, 3)))
    with pytest.raises(ValueError, match=r"Images of source 'flat' differ in size: .* is "
                                         r"\(6, 8, 1\), '.*emu/big\.png' is \(9, 9, 1\)\. Pass "
                                         r"`image_size=\(height, width\)`"):
        km.data.from_directory(rgb_folder, image_size=None)


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": (28,)}, r"`image_size` must be \(height, width\) with positive ints, a "
                            r"positive int for a square, or None\. Received: "
                            r"image_size=\(28,\)"),
    ({"image_size": (0, 5)}, r"`image_size` must be"),
    ({"color_mode": "rgba"}, r"`color_mode` must be one of \['grayscale', 'rgb'\]\. "
                             r"Received: color_mode='rgba'"),
])
def test_from_directory_argument_errors(rgb_folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.data.from_directory(rgb_folder, **kwargs)


def test_from_files_needs_files_per_class(tmp_path):
    with pytest.raises(ValueError, match=r"Class 'b' of source 'files' has no image files"):
        km.data.from_files([[str(tmp_path / "a.png")], []], ["a", "b"])
    with pytest.raises(ValueError, match=r"`files` must hold one list of files per class\. "
                                         r"Received: 1 lists for 2 class names"):
        km.data.from_files([[]], ["a", "b"])


# ----------------------------------------------------------------------
# from_tfds (mocked: no network)


def test_from_tfds_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=60):
        source = km.data.from_tfds("mnist", "train", image_size=(14, 14), invert=True)
    assert source.x.shape == (60, 14, 14, 1) and source.x.dtype == np.float32
    assert np.all((source.x >= 0) & (source.x <= 1))
    assert set(source.class_names) <= {str(i) for i in range(10)}
    assert source.metadata["tfds_name"] == "mnist" and source.name == "mnist/train"
    with tfds.testing.mock_data(num_examples=20):
        rgb = km.data.from_tfds("mnist", "test", color_mode="rgb")
    assert rgb.x.shape == (20, 28, 28, 3)
    np.testing.assert_array_equal(rgb.x[..., 0], rgb.x[..., 2])


def test_from_tfds_errors():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=4):
        with pytest.raises(ValueError, match=r"TFDS 'mnist' has no feature 'pixels'\. Its "
                                             r"features: \['image', 'label'\]"):
            km.data.from_tfds("mnist", "train", image_key="pixels")
        with pytest.raises(ValueError, match=r"Feature `label_key`='image' of TFDS 'mnist' "
                                             r"must hold one integer class label per "
                                             r"example\. Received: dtype uint8, shape "
                                             r"\(28, 28, 1\)"):
            km.data.from_tfds("mnist", "train", label_key="image")


# ----------------------------------------------------------------------
# from_directory: hidden entries, links, int sizes, GIFs, progress


def _gray_folder(root, classes=("a", "b", "c"), per_class=3, size=(5, 5)):
    """Constant grayscale PNGs: class c, image i has the value 40 * c + i."""
    for c, name in enumerate(classes):
        for i in range(per_class):
            _write_png(root / name / f"{i}.png", np.full(size + (1,), 40 * c + i))
    return root


def _values(source):
    """{class name: sorted pixel values x 255} of a source of constant images."""
    return {
        name: sorted(np.round(source.x[source.y == c][:, 0, 0, 0] * 255).astype(int).tolist())
        for c, name in enumerate(source.class_names)
    }


def test_from_directory_skips_hidden_folders_and_files(tmp_path):
    root = _gray_folder(tmp_path / "data")
    # a notebook's checkpoints inside a class, a hidden class, macOS debris
    _write_png(root / "a" / ".ipynb_checkpoints" / "0-checkpoint.png", np.zeros((5, 5, 1)))
    _write_png(root / ".hidden_class" / "0.png", np.zeros((5, 5, 1)))
    _write_png(root / "b" / "._0.png", np.zeros((5, 5, 1)))
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "c" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    source = km.data.from_directory(root, image_size=None)
    assert source.class_names == ("a", "b", "c")
    assert _values(source) == {"a": [0, 1, 2], "b": [40, 41, 42], "c": [80, 81, 82]}


def test_from_directory_follows_links_and_counts_each_image_once(tmp_path):
    root = _gray_folder(tmp_path / "data", classes=("a", "b"))
    elsewhere = _gray_folder(tmp_path / "elsewhere", classes=("x", "y", "z"))
    (root / "linked").symlink_to(elsewhere / "z", target_is_directory=True)
    (root / "b" / "extra.png").symlink_to(elsewhere / "x" / "2.png")
    source = km.data.from_directory(root, image_size=None)
    assert source.class_names == ("a", "b", "linked")
    assert _values(source) == {"a": [0, 1, 2], "b": [2, 40, 41, 42], "linked": [80, 81, 82]}
    # a cycle (`ln -s .. loop`) is refused instead of walked 40 levels deep
    # into classes "a/loop/a", "a/loop/a/loop/a", ... with repeated images
    (root / "a" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(ValueError, match=r"Symbolic link '.*/data/a/loop' points to "
                                         r"'.*/data', a folder that contains the link"):
        km.data.from_directory(root, image_size=None)
    (root / "a" / "loop").unlink()
    assert km.data.from_directory(root, image_size=None).class_names == source.class_names
    # the root itself may be a link
    (tmp_path / "alias").symlink_to(root, target_is_directory=True)
    assert _values(km.data.from_directory(tmp_path / "alias", image_size=None)) == \
        _values(source)


def test_from_directory_int_image_size(rgb_folder):
    square = km.data.from_directory(rgb_folder, image_size=4)
    pair = km.data.from_directory(rgb_folder, image_size=(4, 4))
    assert square.x.shape == (12, 4, 4, 1)
    np.testing.assert_array_equal(square.x, pair.x)
    assert km.data.from_directory(rgb_folder, image_size=np.int64(3)).example_shape == (3, 3, 1)


def _pil():
    return pytest.importorskip("PIL.Image")


def test_from_directory_gifs_in_grayscale_and_rgb(tmp_path):
    Image = _pil()
    gray = (np.arange(48, dtype=np.uint8).reshape(6, 8) * 5).astype(np.uint8)
    color = np.stack([gray, gray // 2, 255 - gray], axis=-1)
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        # two frames: only the first is kept
        Image.fromarray(gray, "L").save(
            tmp_path / name / "0_gray.gif", save_all=True,
            append_images=[Image.fromarray(255 - gray, "L")],
        )
        Image.fromarray(color, "RGB").save(tmp_path / name / "1_color.gif")
        _write_png(tmp_path / name / "2_color.png", color)
    source = km.data.from_directory(tmp_path, image_size=None)
    assert source.x.shape == (6, 6, 8, 1)
    np.testing.assert_allclose(source.x[0, ..., 0], gray / 255, atol=1e-6)
    # an RGB GIF in grayscale: the luma of its pixels, as for the same PNG
    luma = color @ np.array([0.2989, 0.5870, 0.1140])
    np.testing.assert_allclose(source.x[1, ..., 0], luma / 255, atol=1 / 255 + 1e-6)
    np.testing.assert_allclose(source.x[1], source.x[2], atol=1 / 255 + 1e-6)
    rgb = km.data.from_directory(tmp_path, image_size=None, color_mode="rgb")
    assert rgb.x.shape == (6, 6, 8, 3)
    np.testing.assert_allclose(rgb.x[0], np.repeat(gray[..., None], 3, -1) / 255, atol=1e-6)
    np.testing.assert_allclose(rgb.x[1], color / 255, atol=1e-6)
    np.testing.assert_array_equal(rgb.x[1], rgb.x[2])
    resized = km.data.from_directory(tmp_path, image_size=3, color_mode="rgb")
    assert resized.x.shape == (6, 3, 3, 3)


def test_from_directory_progress_bar(rgb_folder, capsys, monkeypatch):
    km.data.from_directory(rgb_folder, verbose=1)
    shown = capsys.readouterr().out
    assert "Decoding 12 images of 3 classes (source 'flat')" in shown
    assert shown.count("12/12") == 1  # one final line
    # "auto": quiet for small folders and when the output is not a terminal
    sources = __import__("keras_meta.data.sources", fromlist=["sources"])
    km.data.from_directory(rgb_folder)
    km.data.from_directory(rgb_folder, verbose=0)
    monkeypatch.setattr(sources, "PROGRESS_MIN_IMAGES", 10)
    km.data.from_directory(rgb_folder)  # pytest's captured output is no terminal
    assert capsys.readouterr().out == ""
    monkeypatch.setattr(sources, "_interactive_output", lambda: True)
    km.data.from_directory(rgb_folder, image_size=None)
    assert capsys.readouterr().out.count("12/12") == 1
    monkeypatch.setattr(sources, "PROGRESS_MIN_IMAGES", 13)
    km.data.from_directory(rgb_folder)
    assert capsys.readouterr().out == ""


def test_from_tfds_int_image_size_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=8):
        source = km.data.from_tfds("mnist", "train", image_size=7)
    assert source.x.shape == (8, 7, 7, 1)
