"""Omniglot: real images from the shared zips (242 characters) and mocked TFDS."""

import importlib
import random

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km
from keras_meta import testing

omniglot_module = importlib.import_module("keras_meta.data.omniglot")

@pytest.fixture(scope="session")
def omniglot_dir(tmp_path_factory):
    """Both shared zips unzipped once into one folder (Greek and Latin twice)."""
    return testing.omniglot_folder(tmp_path_factory.getbasetemp() / "omniglot_both")


def test_maml_split_scaled_to_the_242_local_characters(omniglot_dir):
    parts = {s: km.data.omniglot(s, data_dir=omniglot_dir) for s in ("train", "validation", "test")}
    counts = {s: p.num_classes for s, p in parts.items()}
    assert counts == {"train": 164, "validation": 15, "test": 63}  # 1100:100:423 of 242
    names = {s: set(p.class_names) for s, p in parts.items()}
    assert not (names["train"] & names["validation"] or names["train"] & names["test"]
                or names["validation"] & names["test"])
    everything = set.union(*names.values())
    assert len(everything) == 242  # Greek and Latin, in both zips, count once
    assert all(n.count("/") == 1 and "/character" in n for n in everything)
    # cbfinn/maml: random.seed(1) shuffle of the (sorted) characters, then cut
    order = sorted(everything)
    random.Random(1).shuffle(order)
    assert list(parts["train"].class_names) == order[:164]
    assert list(parts["test"].class_names) == order[179:]
    train = parts["train"]
    assert train.metadata["split_counts"] == {"train": 164, "validation": 15, "test": 63}
    assert train.metadata["class_split"] == "maml" and train.metadata["split_seed"] == 1
    assert train.metadata["available_characters"] == 242
    assert train.metadata["root"] == str(omniglot_dir)
    # 20 drawers per character, 28x28, strokes 1 on 0
    np.testing.assert_array_equal(train.examples_per_class, 20)
    assert train.x.shape == (164 * 20, 28, 28, 1)
    assert train.x.max() == 1.0 and train.x.min() == 0.0 and train.x.mean() < 0.25


def test_imaml_split_custom_splits_and_seeds(omniglot_dir):
    train = km.data.omniglot("train", class_split="imaml", data_dir=omniglot_dir)
    test = km.data.omniglot("test", class_split="imaml", data_dir=omniglot_dir)
    assert (train.num_classes, test.num_classes) == (179, 63)  # 1200:423 of 242
    order = sorted(set(train.class_names) | set(test.class_names))
    random.Random(123).shuffle(order)
    assert list(train.class_names) == order[:179]
    counts = km.data.omniglot("test", class_split={"train": 200, "test": 42},
                              data_dir=omniglot_dir)
    assert counts.num_classes == 42 and counts.metadata["split_seed"] == 0
    fractions = km.data.omniglot("val", class_split={"train": 0.5, "val": 0.2},
                                 data_dir=omniglot_dir, seed=3)
    assert fractions.num_classes == 48  # 0.2 x 242 = 48.4
    default = km.data.omniglot("train", data_dir=omniglot_dir)
    assert km.data.omniglot("train", data_dir=omniglot_dir, seed=1).class_names == \
        default.class_names
    assert km.data.omniglot("train", data_dir=omniglot_dir, seed=2).class_names != \
        default.class_names


def test_rotations_and_episodes_on_real_images(omniglot_dir):
    test = km.data.omniglot("test", data_dir=omniglot_dir, rotations=(0, 90, 180, 270))
    assert test.num_classes == 4 * 63 and test.class_names[63].endswith("@90")
    batch = next(iter(km.data.episodes(test, 5, 1, 15, 4, seed=0, return_classes=True)))
    assert batch["support_x"].shape == (4, 5, 28, 28, 1)
    assert batch["query_x"].shape == (4, 75, 28, 28, 1)
    # a rotated support image is the rotation of one of its character's images
    plain = km.data.omniglot("test", data_dir=omniglot_dir)
    image = batch["support_x"][0, 0].numpy()
    virtual = int(batch["classes"][0, batch["support_y"][0, 0]])
    base, turns = virtual % 63, virtual // 63
    candidates = np.rot90(plain.x[plain.y == base], turns, axes=(1, 2))
    assert np.any(np.all(candidates == image, axis=(1, 2, 3)))


def test_omniglot_errors(omniglot_dir, tmp_path):
    with pytest.raises(ValueError, match=r"`split` must be one of \['train', 'test'\]\. "
                                         r"Received: split='validation'"):
        km.data.omniglot("validation", class_split="imaml", data_dir=omniglot_dir)
    with pytest.raises(ValueError, match=r"`class_split` must be one of \['maml', 'imaml'\]\. "
                                         r"Received: class_split='vinyals'"):
        km.data.omniglot("train", class_split="vinyals", data_dir=omniglot_dir)
    with pytest.raises(ValueError, match=r"`class_split` must be one of \['maml', 'imaml'\] or "
                                         r"a dict"):
        km.data.omniglot("train", class_split=(1100, 100, 423), data_dir=omniglot_dir)
    with pytest.raises(ValueError, match=r"asks for 1100 \+ 100 \+ 423 = 1623 classes, but "
                                         r"source 'omniglot' has only 242"):
        km.data.omniglot("train", class_split={"train": 1100, "validation": 100, "test": 423},
                         data_dir=omniglot_dir)
    with pytest.raises(ValueError, match=r"Split 'validation' of class_split=.* holds no "
                                         r"characters"):
        km.data.omniglot("validation", class_split={"train": 242, "validation": 0},
                         data_dir=omniglot_dir)
    with pytest.raises(FileNotFoundError, match=r"Omniglot folder not found: `data_dir`=.*nope"):
        km.data.omniglot("train", data_dir=tmp_path / "nope")
    with pytest.raises(ValueError, match=r"No Omniglot images \(\.png\) found under "
                                         r"`data_dir`="):
        km.data.omniglot("train", data_dir=tmp_path)
    # n_way larger than a split's characters names the split
    test = km.data.omniglot("test", data_dir=omniglot_dir)
    with pytest.raises(ValueError, match=r"source 'omniglot/test', which has 63\. "
                                         r"Received: n_way=64"):
        km.data.episodes(test, 64, 1, 1, 2)
    with pytest.raises(ValueError, match=r"class '.*/character\d\d' has 20"):
        km.data.episodes(test, 5, 5, 16, 2)


def _mock_omniglot(characters=40, drawers=20):
    """A TFDS `_as_dataset` replacement: `characters` x `drawers` images."""

    def as_dataset(builder, split, *args, **kwargs):
        assert split == "train+test"
        # TFDS names characters "<alphabet>_<index within alphabet from 0>"
        builder.info.features["label"].names = [
            f"Alphabet_of_the_Magi_{i}" if i % 2 else f"Greek_{i}" for i in range(1623)
        ]

        def examples():
            for c in range(characters):
                for d in range(drawers):
                    image = np.full((105, 105, 3), 255, np.uint8)
                    image[c : c + 20, d : d + 20] = 0  # a black stroke
                    yield {"image": image, "alphabet": c % 2, "alphabet_char_id": c,
                           "label": c}

        return tf.data.Dataset.from_generator(examples, output_signature={
            "image": tf.TensorSpec((105, 105, 3), tf.uint8),
            "alphabet": tf.TensorSpec((), tf.int64),
            "alphabet_char_id": tf.TensorSpec((), tf.int64),
            "label": tf.TensorSpec((), tf.int64),
        })

    return as_dataset


def test_omniglot_from_tfds_mocked():
    tfds = pytest.importorskip("tensorflow_datasets")
    omniglot_module._all_characters.cache_clear()
    try:
        with tfds.testing.mock_data(as_dataset_fn=_mock_omniglot()):
            train = km.data.omniglot("train")
            test = km.data.omniglot("test", rotations=(0, 180))
    finally:
        omniglot_module._all_characters.cache_clear()
    assert train.metadata["source"] == "tfds" and train.metadata["tfds_split"] == "train+test"
    assert train.metadata["split_counts"] == {"train": 27, "validation": 3, "test": 10}
    assert train.x.shape == (27 * 20, 28, 28, 1)
    # names as in a local copy: "<alphabet>/characterNN", counted from 01
    assert "Greek/character01" in train.class_names + test.base_class_names
    assert "Alphabet_of_the_Magi/character40" in train.class_names + test.base_class_names
    assert test.num_classes == 20
    # inverted: the stroke is 1, the background 0
    assert train.x.max() == 1.0 and np.median(train.x) < 1e-6


@pytest.mark.large
def test_maml_learns_on_real_omniglot(omniglot_dir):
    """5-way 1-shot MAML on the local characters learns to adapt (~1.5 min)."""
    keras.utils.set_random_seed(0)
    train = km.data.omniglot("train", data_dir=omniglot_dir, rotations=(0, 90, 180, 270))
    test = km.data.omniglot("test", data_dir=omniglot_dir)
    learner = km.MAML(km.models.conv4(5, seed=0), inner_learning_rate=0.4, inner_steps=1,
                      eval_inner_steps=3, task_execution="sequential")
    learner.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    episode = next(iter(km.data.episodes(test, 5, 1, 15, 100, seed=1)))

    def accuracy():
        results = learner.evaluate_tasks(episode, steps=[3])
        return np.mean(results["predictions"][:, -1].argmax(-1) == episode["query_y"].numpy())

    before = accuracy()
    learner.fit(km.data.episodes(train, 5, 1, 5, 8, seed=0), steps_per_epoch=200, verbose=0)
    after = accuracy()
    # chance is 0.2; measured: 0.355 before meta-training, 0.568 after
    assert after > 0.45 and after > before + 0.1, (before, after)


def test_local_folder_skips_hidden_entries_and_takes_an_int_size(tmp_path):
    """A small generated copy: hidden folders are no characters, image_size=n works."""
    root = tmp_path / "omniglot" / "images_background"
    for alphabet in ("Greek", "Latin"):
        for character in range(1, 6):
            for drawer in range(1, 4):
                path = root / alphabet / f"character{character:02d}" / f"{drawer}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                image = np.full((10, 10, 1), 255, np.uint8)
                image[character, :drawer] = 0  # a short black stroke
                path.write_bytes(tf.io.encode_png(image).numpy())
    checkpoint = root / "Greek" / "character01" / ".ipynb_checkpoints" / "1-checkpoint.png"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes((root / "Greek" / "character01" / "1.png").read_bytes())
    (root / ".DS_Store").write_bytes(b"\x00")
    (root / "Latin" / "._character01").write_bytes(b"\x00")
    omniglot_module._all_characters.cache_clear()
    parts = [km.data.omniglot(s, class_split={"train": 6, "test": 4}, data_dir=root.parent,
                              image_size=5, verbose=0) for s in ("train", "test")]
    names = set(parts[0].class_names) | set(parts[1].class_names)
    assert names == {f"{a}/character{c:02d}" for a in ("Greek", "Latin") for c in range(1, 6)}
    for part in parts:
        np.testing.assert_array_equal(part.examples_per_class, 3)
        assert part.x.shape[1:] == (5, 5, 1)
    # a link cycle in the folder is refused, naming the link
    (root / "Latin" / "loop").symlink_to("..", target_is_directory=True)
    omniglot_module._all_characters.cache_clear()
    with pytest.raises(ValueError, match=r"Symbolic link '.*/Latin/loop' points to "
                                         r"'.*/images_background', a folder that contains "
                                         r"the link"):
        km.data.omniglot("train", data_dir=root.parent)
    omniglot_module._all_characters.cache_clear()
