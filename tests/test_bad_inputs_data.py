"""Every bad input of keras_meta.data gives an error that names the argument or
the file, what was expected, and what was received (never a raw TF, NumPy or PIL
traceback). One case per bad input; each message is matched.

The image folders are generated in `tmp_path`: three classes of two 4x4 PNGs.
"""

import importlib
import math
import os

import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km

omniglot_module = importlib.import_module("keras_meta.data.omniglot")


def _png(path, value=0, size=(4, 4)):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tf.io.encode_png(np.full(size + (1,), value, np.uint8)).numpy())


def _ids(value):
    """Test ids `name=value` for the dicts of keyword arguments."""
    if isinstance(value, dict):
        return "-".join(f"{k}={v!r}" for k, v in value.items())
    return None


@pytest.fixture
def folder(tmp_path):
    """root/{a,b,c}/{0,1}.png, valid."""
    root = tmp_path / "data"
    for c, name in enumerate("abc"):
        for i in range(2):
            _png(root / name / f"{i}.png", 40 * c + i)
    return root


# ----------------------------------------------------------------------
# from_directory: the folder


def test_root_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Image folder not found: `root`='.*/nope' "
                                                r"does not exist\."):
        km.data.from_directory(tmp_path / "nope")


def test_root_is_a_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=r"`root` must be a folder of class folders\. "
                                                 r"Received: '.*/x\.png'"):
        km.data.from_directory(tmp_path / "x.png")


def test_empty_root(tmp_path):
    with pytest.raises(ValueError, match=r"No image files \(\.png, \.jpg, \.jpeg, \.bmp, "
                                         r"\.gif\) found in any folder under `root`='.*': "
                                         r"from_directory expects one sub-folder of images "
                                         r"per class, at any depth\.$"):
        km.data.from_directory(tmp_path)


def test_class_folders_without_images_name_the_other_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.txt").write_text("hi")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "labels.csv").write_text("x")
    (tmp_path / "c").mkdir()  # an empty class folder
    with pytest.raises(ValueError, match=r"No image files .* at any depth\. Found 2 other "
                                         r"file\(s\): 'a/notes\.txt', 'b/labels\.csv'\.$"):
        km.data.from_directory(tmp_path)


def test_only_hidden_folders_hold_images(tmp_path):
    _png(tmp_path / ".ipynb_checkpoints" / "0.png")
    _png(tmp_path / "a" / ".thumbs" / "0.png")
    with pytest.raises(ValueError, match=r"No image files .* Found 2 hidden folder\(s\) or "
                                         r"file\(s\), which are skipped: '\.ipynb_checkpoints', "
                                         r"'a/\.thumbs'\.$"):
        km.data.from_directory(tmp_path)


def test_images_directly_in_root(folder):
    _png(folder / "stray.png")
    with pytest.raises(ValueError, match=r"Image files lie directly in `root`='.*/data'; "
                                         r"from_directory expects one sub-folder per class "
                                         r"\(e\.g\. root/cat/1\.png\)\. Found e\.g\. "
                                         r"'stray\.png'"):
        km.data.from_directory(folder)


def test_symlink_cycle(folder):
    (folder / "b" / "loop").symlink_to("..", target_is_directory=True)
    with pytest.raises(ValueError, match=r"Symbolic link '.*/data/b/loop' points to "
                                         r"'.*/data', a folder that contains the link: "
                                         r"following it would count the same images again "
                                         r"and again\. Remove the link"):
        km.data.from_directory(folder)


def test_two_links_to_one_folder(folder):
    (folder / "d").symlink_to(folder / "a", target_is_directory=True)
    with pytest.raises(ValueError, match=r"Image file '.*/data/a/0\.png' is reached twice, as "
                                         r"'.*/data/a/0\.png' and as '.*/data/d/0\.png', "
                                         r"through a symbolic link: each image must be "
                                         r"counted once, in one class\."):
        km.data.from_directory(folder)


def test_sizes_differ_without_resize(folder):
    _png(folder / "c" / "big.png", size=(6, 6))
    with pytest.raises(ValueError, match=r"Images of source 'data' differ in size: '.*/a/0\.png'"
                                         r" is \(4, 4, 1\), '.*/c/big\.png' is \(6, 6, 1\)\. "
                                         r"Pass `image_size=\(height, width\)`"):
        km.data.from_directory(folder, image_size=None)


# ----------------------------------------------------------------------
# from_directory: the files (each named with the reason)


def test_corrupt_png(folder):
    good = (folder / "a" / "0.png").read_bytes()
    (folder / "b" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"Could not read or decode 1 image file\(s\) of source "
                                         r"'data':\n  '.*/b/cut\.png': not a valid image \("
                                         r".+\)\nRemove them or fix them\.$"):
        km.data.from_directory(folder)


def test_empty_image_file(folder):
    (folder / "a" / "2.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match=r"'.*/a/2\.jpg': an empty file \(0 bytes\)"):
        km.data.from_directory(folder)


def test_text_file_with_an_image_extension(folder):
    (folder / "c" / "readme.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"'.*/c/readme\.png': not a valid image \(Unknown image "
                                         r"file format\. One of JPEG, .*PNG, GIF, BMP.* "
                                         r"required\.\)"):
        km.data.from_directory(folder)


def test_broken_symlink_image(folder):
    (folder / "a" / "gone.png").symlink_to(folder / "nowhere.png")
    with pytest.raises(ValueError, match=r"'.*/a/gone\.png': a broken symbolic link \(to "
                                         r"'.*/nowhere\.png'\)"):
        km.data.from_directory(folder)


def test_many_bad_files_are_counted(folder):
    for i in range(7):
        (folder / "a" / f"bad{i}.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"(?s)Could not read or decode 7 image file\(s\).*\n  and "
                                         r"2 more\nRemove them"):
        km.data.from_directory(folder)


# ----------------------------------------------------------------------
# from_directory / from_files: the options (checked before any decoding)

IMAGE_SIZE = (r"`image_size` must be \(height, width\) with positive ints, a positive int "
              r"for a square, or None\. Received: image_size=")


@pytest.mark.parametrize("kwargs, match", [
    ({"image_size": 0}, IMAGE_SIZE + r"0$"),
    ({"image_size": -1}, IMAGE_SIZE + r"-1$"),
    ({"image_size": (28,)}, IMAGE_SIZE + r"\(28,\)$"),
    ({"image_size": "28"}, IMAGE_SIZE + r"'28'$"),
    ({"image_size": (28.0, 28)}, IMAGE_SIZE + r"\(28\.0, 28\)$"),
    ({"image_size": True}, IMAGE_SIZE + r"True$"),
    ({"image_size": (28, 0)}, IMAGE_SIZE + r"\(28, 0\)$"),
    ({"color_mode": "rgba"}, r"`color_mode` must be one of \['grayscale', 'rgb'\]\. "
                             r"Received: color_mode='rgba'"),
    ({"color_mode": None}, r"`color_mode` must be one of \['grayscale', 'rgb'\]\. "
                           r"Received: color_mode=None"),
    ({"interpolation": "cubic"}, r"`interpolation` must be one of \['bilinear', 'nearest', "
                                 r"'bicubic', 'area', 'lanczos3', 'lanczos5', 'gaussian', "
                                 r"'mitchellcubic'\]\. Received: interpolation='cubic'"),
    ({"invert": "yes"}, r"`invert` must be True or False\. Received: invert='yes'"),
    ({"extensions": []}, r"`extensions` must be a file name ending such as '\.png' or a "
                         r"sequence of them\. Received: extensions=\(\)"),
    ({"extensions": [".png", 3]}, r"`extensions` must be .* Received: extensions=\('\.png', "
                                  r"3\)"),
    ({"extensions": 3}, r"`extensions` must be .* Received: extensions=None"),
    ({"verbose": "yes"}, r"`verbose` must be 'auto', 0, 1, 2, True or False\. Received: "
                         r"verbose='yes'"),
    ({"verbose": 3}, r"`verbose` must be 'auto', 0, 1, 2, True or False\. Received: "
                     r"verbose=3"),
], ids=_ids)
def test_from_directory_options(folder, kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.data.from_directory(folder, **kwargs)


def test_options_are_checked_before_the_walk(tmp_path):
    # an empty folder: the argument error comes first, not "no image files"
    with pytest.raises(ValueError, match=r"`color_mode` must be one of"):
        km.data.from_directory(tmp_path, color_mode="RGB")


def test_extensions_as_one_string_and_without_the_dot(folder):
    (folder / "a" / "2.jpg").write_bytes(tf.io.encode_jpeg(np.zeros((4, 4, 1), np.uint8)).numpy())
    assert len(km.data.from_directory(folder, extensions="png")) == 6
    assert len(km.data.from_directory(folder, extensions=".PNG")) == 6
    assert len(km.data.from_directory(folder)) == 7


# ----------------------------------------------------------------------
# from_files


def test_from_files_flat_list_of_paths(folder):
    with pytest.raises(ValueError, match=r"`files` must be a list per class of image paths \(a "
                                         r"list of lists\)\. Received: files\[0\]='.*/a/0\.png' "
                                         r"for class 'a'"):
        km.data.from_files([str(folder / "a" / "0.png"), str(folder / "b" / "0.png")],
                           ["a", "b"])


def test_from_files_a_string(folder):
    with pytest.raises(ValueError, match=r"`files` must be a list per class of image paths\. "
                                         r"Received: files='.*/a/0\.png'"):
        km.data.from_files(str(folder / "a" / "0.png"), ["a"])


def test_from_files_class_names_a_string(folder):
    with pytest.raises(ValueError, match=r"`class_names` must be a list of class names, one per "
                                         r"list of `files`\. Received: class_names='ab'"):
        km.data.from_files([[folder / "a" / "0.png"], [folder / "b" / "0.png"]], "ab")


def test_from_files_count_mismatch(folder):
    with pytest.raises(ValueError, match=r"`files` must hold one list of files per class\. "
                                         r"Received: 1 lists for 2 class names"):
        km.data.from_files([[folder / "a" / "0.png"]], ["a", "b"])


def test_from_files_empty_class(folder):
    with pytest.raises(ValueError, match=r"Class 'b' of source 'files' has no image files\."):
        km.data.from_files([[folder / "a" / "0.png"], []], ["a", "b"])


def test_from_files_missing_file(folder):
    with pytest.raises(ValueError, match=r"Could not read or decode 1 image file\(s\) of source "
                                         r"'files':\n  '.*/a/nope\.png': no such file\n"):
        km.data.from_files([[folder / "a" / "0.png", folder / "a" / "nope.png"]], ["a"])


def test_from_files_repeated_class_names(folder):
    files = [[folder / name / "0.png"] for name in "abc"]
    with pytest.raises(ValueError, match=r"`class_names` must be unique\. Received: \['a'\] "
                                         r"more than once among 3 names"):
        km.data.from_files(files, ["a", "b", "a"])


# ----------------------------------------------------------------------
# from_arrays and Source


@pytest.mark.parametrize("x, y, kwargs, match", [
    ([np.zeros(2), np.zeros(3)], [0, 1], {},
     r"`x` must be an array \[num_examples, \.\.\.\] of examples that share one shape\. "
     r"Received: list that NumPy cannot stack"),
    (np.float32(1.0), [0], {}, r"`x` must be an array \[num_examples, \.\.\.\]\. Received: a "
                               r"scalar"),
    (np.zeros((5, 2)), np.arange(4), {}, r"`x` and `y` must have the same length \(one label per "
                                         r"example\)\. Received: len\(x\)=5, len\(y\)=4"),
    (np.zeros((3, 2)), [0.0, 1.5, 2.0], {}, r"`y` must hold integer class labels\. Received: y "
                                            r"with dtype float64 \(first value 0\.0\)"),
    (np.zeros((3, 2)), np.zeros((3, 2), int), {}, r"`y` must be one integer label per example, "
                                                  r"shape \[num_examples\]\. Received: y with "
                                                  r"shape \(3, 2\)"),
    (np.zeros((0, 2)), np.zeros(0, int), {}, r"Source 'arrays' is empty: `x` and `y` hold no "
                                             r"examples\."),
    (np.zeros((4, 1)), [0, 1, 0, 1], {"class_names": ["a"]},
     r"`class_names` must name the 2 distinct labels\. Received: 1 names"),
    (np.zeros((4, 1)), [0, 1, 0, 1], {"class_names": ["a", "a"]},
     r"`class_names` must be unique\. Received: \['a'\] more than once among 2 names"),
], ids=["ragged-x", "scalar-x", "length-mismatch", "float-labels", "2d-labels", "empty",
        "too-few-names", "repeated-names"])
def test_from_arrays(x, y, kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.data.from_arrays(x, y, **kwargs)


@pytest.fixture
def ten():
    return km.data.from_arrays(np.zeros((20, 3, 3)), np.arange(20) % 10, name="ten")


@pytest.mark.parametrize("call, match", [
    (lambda s: s.split((8, 4)), r"The class split asks for 8 \+ 4 = 12 classes, but source 'ten' "
                                r"has only 10\. Pass fewer classes, or fractions such as "
                                r"\(0\.667, 0\.333\)\."),
    (lambda s: s.split((0.8, 0.4)), r"Class split fractions must sum to at most 1\. Received: "
                                    r"\(0\.8, 0\.4\) \(sum 1\.2\)"),
    (lambda s: s.split(("5", 5)), r"Class split sizes must be non-negative counts \(ints\) or "
                                  r"fractions \(floats\)\. Received: \('5', 5\)"),
    (lambda s: s.subset(["11"]), r"Source 'ten' has no class '11'\."),
    (lambda s: s.subset([10]), r"Class index 10 is out of range for source 'ten' with 10 "
                               r"classes\."),
    (lambda s: s.with_rotations((0, 45)), r"`rotations` must be distinct angles among \(0, 90, "
                                          r"180, 270\)\. Received: rotations=\(0, 45\)"),
], ids=["split-too-many", "split-fractions", "split-sizes", "subset-name", "subset-index",
        "rotation-angle"])
def test_source(ten, call, match):
    with pytest.raises(ValueError, match=match):
        call(ten)


def test_rotations_need_square_images():
    wide = km.data.from_arrays(np.zeros((4, 3, 5)), [0, 0, 1, 1], name="wide")
    with pytest.raises(ValueError, match=r"Rotations need square images, `\[examples, height, "
                                         r"width, \.\.\.\]` with height == width\. Source 'wide' "
                                         r"has examples of shape \(3, 5\)"):
        wide.with_rotations()


# ----------------------------------------------------------------------
# episodes


@pytest.fixture
def three():
    """3 classes of 4 examples."""
    return km.data.from_arrays(np.zeros((12, 2, 2)), np.arange(12) % 3, name="three")


@pytest.mark.parametrize("kwargs, match", [
    ({"n_way": 4}, r"`n_way` must be at most the number of classes of source 'three', which has "
                   r"3\. Received: n_way=4"),
    ({"k_shot": 2, "q_query": 3}, r"Every class needs at least k_shot \+ q_query = 5 examples "
                                  r"\(k_shot=2, q_query=3\) to draw disjoint support and query "
                                  r"sets\. In source 'three', class '0' has 4, '1' has 4, '2' "
                                  r"has 4\. Lower k_shot or q_query"),
    ({"n_way": 0}, r"`n_way` must be a positive integer\. Received: n_way=0"),
    ({"k_shot": 1.5}, r"`k_shot` must be a positive integer\. Received: k_shot=1\.5"),
    ({"q_query": -1}, r"`q_query` must be a positive integer\. Received: q_query=-1"),
    ({"meta_batch_size": True}, r"`meta_batch_size` must be a positive integer\. Received: "
                                r"meta_batch_size=True"),
    ({"num_tasks": 0}, r"`num_tasks` must be a positive integer\. Received: num_tasks=0"),
    ({"seed": -1}, r"`seed` must be a non-negative integer or None\. Received: seed=-1"),
    ({"start_step": -1}, r"`start_step` must be a non-negative int or a scalar integer "
                         r"tf\.Variable\. Received: start_step=-1"),
], ids=_ids)
def test_episodes(three, kwargs, match):
    arguments = {"n_way": 2, "k_shot": 1, "q_query": 1, "meta_batch_size": 2, "seed": 0}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        km.data.episodes(three, **arguments)


def test_episodes_n_way_counts_rotations(three):
    rotated = km.data.from_arrays(np.zeros((12, 2, 2)), np.arange(12) % 3,
                                  name="three").with_rotations((0, 90))
    with pytest.raises(ValueError, match=r"which has 6 \(3 classes x 2 rotations\)\. Received: "
                                         r"n_way=7"):
        km.data.episodes(rotated, 7, 1, 1, 2)


def test_episodes_source_of_the_wrong_type():
    with pytest.raises(TypeError, match=r"`source` must be a keras_meta\.data\.Source \(from "
                                        r"from_arrays, from_directory, from_tfds or omniglot\) or "
                                        r"a tuple \(x, y\)\. Received: list"):
        km.data.episodes([np.zeros((4, 2)), np.arange(4)], 2, 1, 1, 2)


# ----------------------------------------------------------------------
# sinusoid


@pytest.mark.parametrize("kwargs, match", [
    ({"k_shot": 0}, r"`k_shot` must be a positive integer\. Received: k_shot=0"),
    ({"meta_batch_size": 2.0}, r"`meta_batch_size` must be a positive integer\. Received: "
                               r"meta_batch_size=2\.0"),
    ({"amplitude_range": (5.0, 1.0)}, r"`amplitude_range` must be a pair \(low, high\) of finite numbers with low "
                                      r"<= high\. Received: amplitude_range=\(5\.0, 1\.0\)"),
    ({"input_range": (-5, 0, 5)}, r"`input_range` must be a pair \(low, high\) of finite numbers with low <= "
                                  r"high\. Received: input_range=\(-5, 0, 5\)"),
    ({"phase_range": (math.pi, 0)}, r"`phase_range` must be a pair \(low, high\)"),
    ({"dtype": "int32"}, r"`dtype` must be a floating dtype\. Received: dtype=int32"),
    ({"seed": -3}, r"`seed` must be a non-negative integer or None\. Received: seed=-3"),
    ({"start_step": "0"}, r"`start_step` must be a non-negative int or a scalar integer "
                          r"tf\.Variable\. Received: start_step='0'"),
], ids=_ids)
def test_sinusoid(kwargs, match):
    with pytest.raises(ValueError, match=match):
        km.data.sinusoid(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(amplitude_range=5), dict(phase_range=("a", "b"))])
def test_sinusoid_range_that_is_not_a_pair_of_numbers(kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"`{name}` must be a pair \(low, high\) of finite numbers"):
        km.data.sinusoid(**kwargs)


def test_episodes_return_classes_string(tmp_path):
    source = km.data.from_arrays(np.zeros((6, 2, 2, 1), "float32"), np.repeat(np.arange(3), 2))
    with pytest.raises(ValueError, match=r"`return_classes` must be True or False\. Received: return_classes='yes'"):
        km.data.episodes(source, n_way=2, k_shot=1, q_query=1, meta_batch_size=1, return_classes="yes")


# ----------------------------------------------------------------------
# omniglot (a local folder; arguments checked before any data is loaded)


@pytest.fixture
def no_cache():
    omniglot_module._all_characters.cache_clear()
    yield
    omniglot_module._all_characters.cache_clear()


@pytest.mark.parametrize("kwargs, match", [
    ({"split": "val"}, r"`split` must be one of \['train', 'validation', 'test'\]\. Received: "
                       r"split='val'"),
    ({"class_split": "vinyals"}, r"`class_split` must be one of \['maml', 'imaml'\]\. "
                                r"Received: class_split='vinyals'"),
    ({"class_split": {}}, r"`class_split` must be one of \['maml', 'imaml'\] or a dict of class "
                          r"counts or fractions\. Received: class_split=\{\}"),
    ({"seed": -1}, r"`seed` must be a non-negative integer or None\. Received: seed=-1"),
    ({"image_size": 0}, IMAGE_SIZE + r"0$"),
    ({"verbose": "loud"}, r"`verbose` must be 'auto', 0, 1, 2, True or False\. Received: "
                          r"verbose='loud'"),
], ids=_ids)
def test_omniglot_arguments(tmp_path, no_cache, kwargs, match):
    arguments = {"split": "train", "data_dir": tmp_path / "nowhere"}
    arguments.update(kwargs)
    with pytest.raises(ValueError, match=match):
        km.data.omniglot(**arguments)


def test_omniglot_data_dir_missing(tmp_path, no_cache):
    with pytest.raises(FileNotFoundError, match=r"Omniglot folder not found: `data_dir`="
                                                r"'.*/nowhere' is not a folder\."):
        km.data.omniglot("train", data_dir=tmp_path / "nowhere")


def test_omniglot_data_dir_without_pngs(tmp_path, no_cache):
    path = tmp_path / "Greek" / "character01" / "1.jpg"
    path.parent.mkdir(parents=True)
    path.write_bytes(tf.io.encode_jpeg(np.zeros((4, 4, 1), np.uint8)).numpy())
    with pytest.raises(ValueError, match=r"No Omniglot images \(\.png\) found under `data_dir`="
                                         r"'.*'; expected <alphabet>/<character>/\*\.png "
                                         r"folders\. Found 1 other file\(s\): "
                                         r"'Greek/character01/1\.jpg'\."):
        km.data.omniglot("train", data_dir=tmp_path)


def test_omniglot_rotations(tmp_path, no_cache):
    for c in range(1, 11):
        _png(tmp_path / "Greek" / f"character{c:02d}" / "1.png")
    with pytest.raises(ValueError, match=r"`rotations` must be distinct angles among \(0, 90, "
                                         r"180, 270\)\. Received: rotations=\(0, 0\)"):
        km.data.omniglot("train", data_dir=tmp_path, rotations=(0, 0), verbose=0)


# ----------------------------------------------------------------------
# from_tfds: options checked before TFDS is asked for anything


@pytest.mark.parametrize("kwargs, match", [
    ({"color_mode": "cmyk"}, r"`color_mode` must be one of \['grayscale', 'rgb'\]\. "
                             r"Received: color_mode='cmyk'"),
    ({"image_size": (28,)}, IMAGE_SIZE + r"\(28,\)$"),
    ({"interpolation": "linear"}, r"`interpolation` must be one of \['bilinear', .*\]\. "
                                  r"Received: interpolation='linear'"),
    ({"invert": 1}, r"`invert` must be True or False\. Received: invert=1"),
], ids=_ids)
def test_from_tfds_options(tmp_path, kwargs, match):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match=match):
        km.data.from_tfds("mnist", "train", data_dir=os.fspath(tmp_path), download=False,
                          **kwargs)
