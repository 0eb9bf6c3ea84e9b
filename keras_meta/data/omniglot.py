"""Omniglot with the character splits of the MAML and iMAML papers."""

import functools
import os

import numpy as np

from keras_meta.data.sources import (
    DatasetDownloadError,
    _check_image_size,
    _check_verbose,
    _describe_network_error,
    _largest_remainder,
    from_files,
    from_tfds,
    network_error,
    split_counts,
    walk_image_folders,
)
from keras_meta.validation import check_choice, resolve_seed

NUM_CHARACTERS = 1623

OFFLINE_HINT = (
    "Offline, pass `data_dir=` a local folder of Omniglot images laid out as "
    "<alphabet>/<character>/<drawing>.png (at any depth, e.g. the unzipped "
    "images_background/ and images_evaluation/ folders of "
    "https://github.com/brendenlake/omniglot/tree/master/python): "
    "km.data.omniglot(\"train\", data_dir=\"path/to/omniglot\"). Or pass "
    "`tfds_data_dir=` a TFDS data folder where omniglot is already prepared."
)

# Character splits of the reference code, as class counts of the full 1623
# characters, and the seed of their `random.Random(seed).shuffle`.
CLASS_SPLITS = {
    # cbfinn/maml data_generator.py: random.seed(1), 1100 / 100 / rest.
    "maml": ({"train": 1100, "validation": 100, "test": 423}, 1),
    # aravindr93/imaml_dev: seed 123, 1200 / rest (no validation classes).
    "imaml": ({"train": 1200, "test": 423}, 123),
}


def omniglot(
    split="train",
    class_split="maml",
    seed=None,
    data_dir=None,
    image_size=(28, 28),
    rotations=None,
    tfds_data_dir=None,
    download=True,
    verbose="auto",
):
    """Omniglot characters of one class split, as a `Source` for `episodes`.

    Loads every character (from TFDS by default, which downloads the data on
    first use, or from a local folder with `data_dir`, which works offline),
    as 28x28 grayscale images in [0, 1] with strokes at 1 (inverted from the
    files' black on white), then keeps the characters of `split`. Characters
    are named `"<alphabet>/characterNN"` whichever the origin, sorted,
    shuffled with `random.Random(seed)` and cut into consecutive blocks, so
    the splits are disjoint, reproducible, and the same from TFDS and from a
    full local copy. The returned source lists its characters in
    `class_names` and the split in `metadata`.

    Class splits (`class_split`):

    - `"maml"`: 1100 train / 100 validation / 423 test characters, seed 1
      (cbfinn/maml's `random.seed(1)` shuffle).
    - `"imaml"`: 1200 train / 423 test, seed 123 (aravindr93/imaml_dev).
    - a dict of counts, e.g. `{"train": 150, "test": 92}`, which must fit in
      the characters available, or of fractions, e.g.
      `{"train": 0.7, "validation": 0.1, "test": 0.2}`.

    When fewer than 1623 characters are found (e.g. a subset of the
    alphabets), the presets keep their proportions: `"maml"` on 242
    characters gives 164 / 15 / 63. `metadata["split_counts"]` says which.

    Args:
        split: `"train"`, `"validation"` or `"test"` (a name of `class_split`).
        class_split: `"maml"`, `"imaml"` or a dict (see above).
        seed: seed of the character shuffle; default the preset's (1 for
            `"maml"`, 123 for `"imaml"`), 0 for a dict.
        data_dir: a local folder of Omniglot images
            (`.../<alphabet>/<character>/*.png` at any depth, e.g. the unzipped
            `images_background` and `images_evaluation`; characters found in
            several places count once; hidden folders such as
            `.ipynb_checkpoints` are skipped; symbolic links are followed,
            and a link cycle is refused, as in `from_directory`). `None` loads
            TFDS `omniglot` (`train+test`, 1623 characters); without network
            access that fails with a `ConnectionError` that says so.
        image_size: `(height, width)` or an int for a square (the papers:
            28).
        rotations: `None`, or angles such as `(0, 90, 180, 270)`: each rotation
            of each character is a class of its own (Vinyals et al.).
        tfds_data_dir: TFDS data folder (default TFDS's own).
        download: let TFDS download Omniglot if it is not there yet.
        verbose: progress bar while decoding a local folder, as in
            `from_directory` (`"auto"`: from 1000 images, on a terminal).

    Returns:
        A `Source` holding the characters of `split`.

    Example:

    ```python
    train = km.data.omniglot("train", rotations=(0, 90, 180, 270))
    test = km.data.omniglot("test")
    batches = km.data.episodes(train, n_way=5, k_shot=1, q_query=15,
                               meta_batch_size=32, seed=0)
    ```

    Reference:
        - [Lake, Salakhutdinov, Tenenbaum, 2015](https://doi.org/10.1126/science.aab3050)
        - [Finn, Abbeel, Levine, 2017](https://arxiv.org/abs/1703.03400)
        - [Rajeswaran et al., 2019](https://arxiv.org/abs/1909.04630)
    """
    if isinstance(class_split, str):
        check_choice("class_split", class_split, tuple(CLASS_SPLITS))
        reference_counts, default_seed = CLASS_SPLITS[class_split]
        names = tuple(reference_counts)
    elif isinstance(class_split, dict) and class_split:
        reference_counts, default_seed = None, 0
        names = tuple(class_split)
    else:
        raise ValueError(
            f"`class_split` must be one of {list(CLASS_SPLITS)} or a dict of "
            f"class counts or fractions. Received: class_split={class_split!r}"
        )
    check_choice("split", split, names)
    seed = default_seed if seed is None else resolve_seed(seed)
    if data_dir is not None:
        data_dir = os.path.abspath(os.fspath(data_dir))
    image_size = _check_image_size(image_size)
    verbose = _check_verbose(verbose)
    characters = _all_characters(data_dir, image_size, tfds_data_dir, download, verbose)

    available = characters.num_base_classes
    if reference_counts is None:
        counts = split_counts(tuple(class_split.values()), available, characters.name)
    elif available == NUM_CHARACTERS:
        counts = list(reference_counts.values())
    else:
        quotas = [c * available / NUM_CHARACTERS for c in reference_counts.values()]
        counts = _largest_remainder(np.array(quotas), available)
    parts = dict(zip(names, characters.split(counts, seed=seed, names=names)))
    part = parts[split]
    if part.num_base_classes == 0:
        raise ValueError(
            f"Split {split!r} of class_split={class_split!r} holds no characters "
            f"({dict(zip(names, counts))} of the {available} available)."
        )
    part.metadata.update(
        dataset="omniglot",
        class_split=class_split,
        split_counts=dict(zip(names, counts)),
        available_characters=available,
    )
    return part.with_rotations(rotations) if rotations else part


@functools.lru_cache(maxsize=2)
def _all_characters(data_dir, image_size, tfds_data_dir, download, verbose):
    """Every character, sorted by name, decoded once per process."""
    if data_dir is None:
        try:
            source = from_tfds(
                "omniglot",
                "train+test",
                data_dir=tfds_data_dir,
                image_size=image_size,
                color_mode="grayscale",
                invert=True,
                download=download,
            )
        except DatasetDownloadError as error:
            raise DatasetDownloadError(
                "Could not download Omniglot from TFDS: "
                f"{_describe_network_error(network_error(error.__cause__) or error)} "
                f"{OFFLINE_HINT}"
            ) from error
        except FileNotFoundError as error:
            if download:
                raise
            where = (
                f"`tfds_data_dir`={tfds_data_dir!r}" if tfds_data_dir is not None
                else "TFDS's data folder"
            )
            raise FileNotFoundError(
                f"TFDS has no prepared Omniglot in {where}, and `download=False` "
                f"forbids downloading it. {OFFLINE_HINT}"
            ) from error
        # TFDS names characters "<alphabet>_<index from 0>".
        renamed = []
        for name in source.base_class_names:
            alphabet, _, index = name.rpartition("_")
            renamed.append(
                f"{alphabet}/character{int(index) + 1:02d}" if index.isdigit() and alphabet else name
            )
        source.base_class_names = tuple(renamed)
        source.name = "omniglot"
        return source.subset(sorted(renamed))
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(
            f"Omniglot folder not found: `data_dir`={data_dir!r} is not a folder."
        )
    files = {}
    walk = walk_image_folders(data_dir, (".png",))
    for dirpath, images in walk.folders:
        parts = os.path.normpath(dirpath).split(os.sep)
        character = "/".join(parts[-2:])
        seen = files.setdefault(character, {})
        for image in images:  # the same character may appear in two folders
            seen.setdefault(os.path.basename(image), image)
    if not files:
        raise ValueError(
            f"No Omniglot images (.png) found under `data_dir`={data_dir!r}; "
            f"expected <alphabet>/<character>/*.png folders.{walk.describe_skipped(data_dir)}"
        )
    names = sorted(files)
    return from_files(
        [list(files[n].values()) for n in names],
        names,
        image_size=image_size,
        color_mode="grayscale",
        invert=True,
        name="omniglot",
        metadata={"source": "directory", "root": data_dir},
        verbose=verbose,
    )
