"""Labelled examples held in memory, grouped by class: what episodes sample from.

Three builders turn the forms few-shot data comes in into a `Source`: arrays
(`from_arrays`), a folder of images per class (`from_directory`) and
TensorFlow Datasets (`from_tfds`). Images are decoded once, in parallel, and
kept as one array; `keras_meta.data.episodes` samples meta-batches from it.
"""

import os
import random

import numpy as np
import tensorflow as tf

from keras_meta.validation import check_choice

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
COLOR_MODES = {"grayscale": 1, "rgb": 3}
ROTATIONS = (0, 90, 180, 270)


class Source:
    """Labelled examples in memory, grouped by class.

    Holds every example of a data set as one array `x` (`[num_examples,
    ...]`), its class index `y` (int32, `0 .. num_base_classes - 1`) and the
    name of each class. Class splits (`split`, `subset`) return new sources
    holding only their classes, so splits are disjoint by construction and
    each records the classes it holds in `class_names`.

    With `rotations`, every class seen at each angle is a class of its own
    (the Vinyals et al. / torchmeta Omniglot protocol): `episodes` draws from
    `num_classes = num_base_classes * len(rotations)` classes, named
    `"<class>@<angle>"`. Build sources with `from_arrays`, `from_directory`,
    `from_tfds` or `keras_meta.data.omniglot` rather than directly.

    Args:
        x: array `[num_examples, ...]`.
        y: int array `[num_examples]` with values in `0 .. len(class_names) - 1`.
        class_names: one name per base class.
        name: a name used in error messages and reports.
        rotations: tuple of angles in `(0, 90, 180, 270)`; `(0,)` for none.
        metadata: dict recording where the data came from (paths, split).

    Example:

    >>> source = from_arrays(np.zeros((6, 2)), [5, 5, 7, 7, 9, 9])
    >>> source.class_names, source.examples_per_class.tolist()
    (('5', '7', '9'), [2, 2, 2])
    """

    def __init__(self, x, y, class_names, name="source", rotations=(0,), metadata=None):
        x = np.asarray(x).view()  # a view: freezing it leaves the caller's array be
        y = np.array(y, dtype=np.int32)
        class_names = tuple(str(n) for n in class_names)
        if len(x) != len(y):
            raise ValueError(
                "`x` and `y` must have the same length. Received: "
                f"len(x)={len(x)}, len(y)={len(y)}"
            )
        if len(set(class_names)) != len(class_names):
            raise ValueError(f"Class names must be unique. Received: {class_names}")
        if len(y) and (y.min() < 0 or y.max() >= len(class_names)):
            raise ValueError(
                f"`y` must hold class indices in [0, {len(class_names)}). "
                f"Received: values in [{y.min()}, {y.max()}]"
            )
        rotations = _check_rotations(rotations)
        if rotations != (0,) and (x.ndim < 3 or x.shape[1] != x.shape[2]):
            raise ValueError(
                "Rotations need square images, `[examples, height, width, "
                f"...]` with height == width. Source {name!r} has examples of "
                f"shape {x.shape[1:]}"
            )
        x.setflags(write=False)
        y.setflags(write=False)
        self.x, self.y = x, y
        self.base_class_names = class_names
        self.name = name
        self.rotations = rotations
        self.metadata = dict(metadata or {})
        self.examples_per_class = np.bincount(y, minlength=len(class_names))

    @property
    def num_base_classes(self):
        """Classes before rotation augmentation."""
        return len(self.base_class_names)

    @property
    def num_classes(self):
        """Classes episodes draw from: base classes times rotations."""
        return self.num_base_classes * len(self.rotations)

    @property
    def class_names(self):
        """Names of the classes episodes draw from (rotations included).

        Class `c` is base class `c % num_base_classes` rotated by
        `rotations[c // num_base_classes]`.
        """
        if self.rotations == (0,):
            return self.base_class_names
        return tuple(
            f"{name}@{angle}" for angle in self.rotations for name in self.base_class_names
        )

    @property
    def example_shape(self):
        return self.x.shape[1:]

    def __len__(self):
        return len(self.x)

    def __repr__(self):
        rotations = f", rotations={self.rotations}" if self.rotations != (0,) else ""
        return (
            f"<Source {self.name!r}: {len(self)} examples of shape "
            f"{self.example_shape} {self.x.dtype}, {self.num_base_classes} "
            f"classes{rotations}>"
        )

    def subset(self, classes, name=None):
        """A source holding only `classes` (names or base-class indices), in that order."""
        indices = []
        for c in classes:
            if isinstance(c, (int, np.integer)) and not isinstance(c, bool):
                if not 0 <= c < self.num_base_classes:
                    raise ValueError(
                        f"Class index {c} is out of range for source "
                        f"{self.name!r} with {self.num_base_classes} classes."
                    )
                indices.append(int(c))
            elif c in self.base_class_names:
                indices.append(self.base_class_names.index(c))
            else:
                raise ValueError(f"Source {self.name!r} has no class {c!r}.")
        if len(set(indices)) != len(indices):
            raise ValueError(f"`classes` must not repeat a class. Received: {list(classes)}")
        new_label = np.full(self.num_base_classes, -1, np.int64)
        new_label[indices] = np.arange(len(indices))
        keep = new_label[self.y] >= 0
        return Source(
            self.x[keep],
            new_label[self.y[keep]],
            [self.base_class_names[i] for i in indices],
            name=name or self.name,
            rotations=self.rotations,
            metadata=self.metadata,
        )

    def split(self, sizes, seed=0, names=None):
        """Disjoint, seeded class splits: a tuple of sources.

        The classes, in the source's order, are shuffled with Python's
        `random.Random(seed).shuffle` (the cbfinn/maml and iMAML convention)
        and cut into consecutive blocks of the given sizes.

        Args:
            sizes: class counts (ints, e.g. `(1100, 100, 423)`) or fractions
                of the classes (floats summing to at most 1, e.g.
                `(0.7, 0.1, 0.2)`). Counts must fit in the classes available.
            seed: int seed of the shuffle.
            names: names of the splits (default `split0`, `split1`, ...).

        Returns:
            One `Source` per size; each records its split in `metadata`.
        """
        counts = split_counts(sizes, self.num_base_classes, self.name)
        order = shuffled_classes(self.base_class_names, seed)
        names = names or [f"split{i}" for i in range(len(counts))]
        sources, start = [], 0
        for split_name, count in zip(names, counts):
            part = self.subset(order[start : start + count], name=f"{self.name}/{split_name}")
            part.metadata.update(split=split_name, split_seed=seed, split_counts=tuple(counts))
            sources.append(part)
            start += count
        return tuple(sources)

    def with_rotations(self, rotations=ROTATIONS):
        """The same examples with each rotation of each class a class of its own."""
        return Source(
            self.x, self.y, self.base_class_names, name=self.name,
            rotations=rotations, metadata=self.metadata,
        )


def _check_rotations(rotations):
    if rotations is None:
        return (0,)
    rotations = tuple(rotations)
    if (
        not rotations
        or len(set(rotations)) != len(rotations)
        or any(isinstance(a, bool) or a not in ROTATIONS for a in rotations)
    ):
        raise ValueError(
            "`rotations` must be distinct angles among (0, 90, 180, 270). "
            f"Received: rotations={rotations!r}"
        )
    return tuple(int(a) for a in rotations)


def shuffled_classes(class_names, seed):
    """`class_names` shuffled by `random.Random(seed)` (cbfinn/maml, iMAML)."""
    order = list(class_names)
    random.Random(seed).shuffle(order)
    return order


def split_counts(sizes, num_classes, name="source"):
    """Class counts from counts (ints) or fractions (floats) of `num_classes`."""
    sizes = tuple(sizes)
    if not sizes or any(isinstance(s, bool) or not isinstance(s, (int, float, np.number)) or s < 0
                        for s in sizes):
        raise ValueError(
            "Class split sizes must be non-negative counts (ints) or fractions "
            f"(floats). Received: {sizes!r}"
        )
    if all(isinstance(s, (int, np.integer)) for s in sizes):
        counts = [int(s) for s in sizes]
        if sum(counts) > num_classes:
            raise ValueError(
                f"The class split asks for {' + '.join(map(str, counts))} = "
                f"{sum(counts)} classes, but source {name!r} has only "
                f"{num_classes}. Pass fewer classes, or fractions such as "
                f"{tuple(round(c / sum(counts), 3) for c in counts)}."
            )
        return counts
    fractions = np.array(sizes, dtype=np.float64)
    if fractions.max() > 1 or fractions.sum() > 1 + 1e-9:
        raise ValueError(
            "Class split fractions must sum to at most 1. Received: "
            f"{sizes!r} (sum {fractions.sum():g})"
        )
    return _largest_remainder(fractions * num_classes, round(fractions.sum() * num_classes))


def _largest_remainder(quotas, total):
    """Integers summing to `total`, each the floor or ceiling of its quota."""
    counts = np.floor(quotas).astype(int)
    remainder = int(total - counts.sum())
    if remainder > 0:
        counts[np.argsort(-(quotas - counts), kind="stable")[:remainder]] += 1
    return [int(c) for c in counts]


# ----------------------------------------------------------------------
# Builders.


def from_arrays(x, y, class_names=None, name="arrays"):
    """A source from arrays in memory.

    Args:
        x: array-like `[num_examples, ...]`, any example shape.
        y: integer class labels `[num_examples]` (any integers, e.g. `[3, 7,
            3, 100]`; a trailing axis of size 1 is dropped). Classes are
            ordered by label.
        class_names: optional dict `{label: name}` or sequence with one name
            per distinct label in sorted order; default the labels as strings.
        name: a name used in error messages.

    Returns:
        A `Source`.

    Example:

    >>> x = np.random.rand(100, 8).astype("float32")
    >>> source = from_arrays(x, np.arange(100) % 10)
    >>> source.num_classes, source.example_shape
    (10, (8,))
    """
    x = np.asarray(x)
    y = np.asarray(y)
    if x.ndim == 0:
        raise ValueError(f"`x` must be an array [num_examples, ...]. Received: a scalar {x!r}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(
            f"`y` must be one integer label per example, shape [num_examples]. "
            f"Received: y with shape {y.shape}"
        )
    if len(x) != len(y):
        raise ValueError(
            "`x` and `y` must have the same length (one label per example). "
            f"Received: len(x)={len(x)}, len(y)={len(y)}"
        )
    if len(y) == 0:
        raise ValueError(f"Source {name!r} is empty: `x` and `y` hold no examples.")
    if not np.issubdtype(y.dtype, np.integer):
        example = y.ravel()[0].item()
        raise ValueError(
            "`y` must hold integer class labels. Received: y with dtype "
            f"{y.dtype} (first value {example!r})"
        )
    labels, y = np.unique(y, return_inverse=True)
    if class_names is None:
        names = [str(label) for label in labels]
    elif isinstance(class_names, dict):
        names = [str(class_names.get(label, label)) for label in labels.tolist()]
    else:
        if len(class_names) != len(labels):
            raise ValueError(
                f"`class_names` must name the {len(labels)} distinct labels. "
                f"Received: {len(class_names)} names"
            )
        names = list(class_names)
    return Source(x, y, names, name=name, metadata={"source": "arrays"})


def from_directory(
    root,
    image_size=(28, 28),
    color_mode="grayscale",
    invert=False,
    interpolation="lanczos3",
    extensions=IMAGE_EXTENSIONS,
    name=None,
):
    """A source from a folder of images, one sub-folder per class.

    Every folder under `root`, at any depth, that holds image files is a
    class, named by its path relative to `root` (`"Greek/character01"` for
    Omniglot's `alphabet/character/*.png`, `"cat"` for flat class folders).
    The images are decoded once, in parallel, converted to `color_mode`,
    resized to `image_size`, scaled to [0, 1] and optionally inverted, then
    held in memory as one float32 array.

    Args:
        root: the folder.
        image_size: `(height, width)`, or `None` to keep the files' size
            (then they must all share it).
        color_mode: `"grayscale"` (1 channel) or `"rgb"` (3 channels).
        invert: `x -> 1 - x` after scaling (Omniglot's strokes are black on
            white: invert so that strokes are 1 on a background of 0).
        interpolation: a `tf.image.resize` method; `"lanczos3"` (with
            anti-aliasing, clipped to [0, 1]) matches the PIL LANCZOS resize of
            the reference MAML and iMAML code.
        extensions: file name endings counted as images (case-insensitive).
        name: a name for error messages (default: the folder's name).

    Returns:
        A `Source`.

    Example:

    ```python
    source = km.data.from_directory("omniglot/images_background", invert=True)
    ```
    """
    root = os.fspath(root)
    name = name or os.path.basename(os.path.normpath(root))
    if not os.path.exists(root):
        raise FileNotFoundError(f"Image folder not found: `root`={root!r} does not exist.")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"`root` must be a folder of class folders. Received: {root!r}")
    extensions = tuple(e.lower() for e in extensions)
    class_names, files = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        images = sorted(f for f in filenames if f.lower().endswith(extensions))
        if not images:
            continue
        relative = os.path.relpath(dirpath, root)
        if relative == os.curdir:
            raise ValueError(
                f"Image files lie directly in `root`={root!r}; from_directory "
                "expects one sub-folder per class (e.g. root/cat/1.png). "
                f"Found e.g. {images[0]!r}"
            )
        class_names.append(relative.replace(os.sep, "/"))
        files.append([os.path.join(dirpath, f) for f in images])
    if not class_names:
        raise ValueError(
            f"No image files ({', '.join(extensions)}) found in any folder "
            f"under `root`={root!r}: from_directory expects one sub-folder of "
            "images per class, at any depth."
        )
    return from_files(
        files, class_names, image_size=image_size, color_mode=color_mode,
        invert=invert, interpolation=interpolation, name=name,
        metadata={"source": "directory", "root": os.path.abspath(root)},
    )


def from_files(
    files,
    class_names,
    image_size=(28, 28),
    color_mode="grayscale",
    invert=False,
    interpolation="lanczos3",
    name="files",
    metadata=None,
):
    """A source from lists of image files, one list per class.

    The decoding step of `from_directory`, for layouts it does not cover.

    Args:
        files: a list per class of image paths.
        class_names: one name per class.
        image_size, color_mode, invert, interpolation: as in `from_directory`.
        name: a name for error messages.
        metadata: dict recorded on the source.

    Returns:
        A `Source`.
    """
    channels = COLOR_MODES[check_choice("color_mode", color_mode, tuple(COLOR_MODES))]
    image_size = _check_image_size(image_size)
    if len(files) != len(class_names):
        raise ValueError(
            "`files` must hold one list of files per class. Received: "
            f"{len(files)} lists for {len(class_names)} class names"
        )
    for class_name, paths in zip(class_names, files):
        if not len(paths):
            raise ValueError(f"Class {class_name!r} of source {name!r} has no image files.")
    paths = [p for paths in files for p in paths]
    labels = np.repeat(np.arange(len(files)), [len(p) for p in files])

    def load(index):
        image = tf.io.decode_image(
            tf.io.read_file(tf.gather(paths, index)),
            channels=channels,
            expand_animations=False,
        )
        return preprocess_images(image, image_size, None, invert, interpolation), index

    # Files that fail to read or decode are dropped by `ignore_errors` and
    # named below from the indices that did not come back.
    dataset = (
        tf.data.Dataset.range(len(paths))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
    )
    images, indices = _collect(dataset, image_size is not None, name, paths)
    if len(indices) != len(paths):
        bad = np.setdiff1d(np.arange(len(paths)), indices)
        shown = ", ".join(repr(paths[i]) for i in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"Could not read or decode {len(bad)} image file(s) of source "
            f"{name!r}: {shown}{more}. Remove them or fix them."
        )
    return Source(images, labels[indices], class_names, name=name, metadata=metadata)


def from_tfds(
    name,
    split,
    image_key="image",
    label_key="label",
    data_dir=None,
    image_size=None,
    color_mode=None,
    invert=False,
    interpolation="lanczos3",
    download=True,
):
    """A source from a TensorFlow Datasets split.

    Images (uint8 features of rank 3) are scaled to [0, 1] float32,
    optionally converted to `color_mode`, resized and inverted; other
    features are kept as they are. Class names come from the label's
    `ClassLabel` names when it has them. Needs `tensorflow-datasets`
    (`pip install keras-meta[datasets]`).

    Args:
        name: TFDS name, e.g. `"omniglot"`.
        split: TFDS split, e.g. `"train"` or `"train+test"`.
        image_key: feature holding the inputs.
        label_key: feature holding the integer class label.
        data_dir: TFDS data folder (default TFDS's own).
        image_size: `(height, width)` to resize to, or `None`.
        color_mode: `None` (keep), `"grayscale"` or `"rgb"`.
        invert: `x -> 1 - x` after scaling.
        interpolation: a `tf.image.resize` method.
        download: let TFDS download and prepare the data set if needed.

    Returns:
        A `Source`.

    Example:

    ```python
    source = km.data.from_tfds("omniglot", "small1", image_size=(28, 28),
                               color_mode="grayscale", invert=True)
    ```
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "from_tfds needs tensorflow-datasets: pip install keras-meta[datasets] "
            "(or pip install tensorflow-datasets)."
        ) from error
    channels = None
    if color_mode is not None:
        channels = COLOR_MODES[check_choice("color_mode", color_mode, tuple(COLOR_MODES))]
    image_size = _check_image_size(image_size)
    dataset, info = tfds.load(
        name, split=split, data_dir=data_dir, download=download, with_info=True
    )
    for key in (image_key, label_key):
        if key not in dataset.element_spec:
            raise ValueError(
                f"TFDS {name!r} has no feature {key!r}. Its features: "
                f"{sorted(dataset.element_spec)}"
            )
    label_spec = dataset.element_spec[label_key]
    if not label_spec.dtype.is_integer or label_spec.shape.rank != 0:
        raise ValueError(
            f"Feature `label_key`={label_key!r} of TFDS {name!r} must hold one "
            f"integer class label per example. Received: dtype "
            f"{label_spec.dtype.name}, shape {tuple(label_spec.shape)}"
        )
    image_spec = dataset.element_spec[image_key]
    is_image = image_spec.dtype == tf.uint8 and image_spec.shape.rank == 3

    def convert(example):
        x = example[image_key]
        if is_image:
            x = preprocess_images(x, image_size, channels, invert, interpolation)
        return x, example[label_key]

    dataset = dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE)
    source_name = f"{name}/{split}"
    xs, ys = [], []
    for x, y in dataset.batch(1024).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    if not xs:
        raise ValueError(f"TFDS split {source_name!r} is empty.")
    x, y = np.concatenate(xs), np.concatenate(ys)
    label_names = None
    feature = info.features[label_key] if label_key in info.features else None
    if getattr(feature, "names", None):
        label_names = {i: n for i, n in enumerate(feature.names)}
    source = from_arrays(x, y, class_names=label_names, name=source_name)
    source.metadata.update(source="tfds", tfds_name=name, tfds_split=split)
    return source


def preprocess_images(image, image_size, channels, invert, interpolation):
    """uint8 image(s) -> float32 in [0, 1]: channels, resize, inversion."""
    if channels is not None and image.shape[-1] != channels:
        if channels == 1:
            image = tf.image.rgb_to_grayscale(image)
        else:
            image = tf.image.grayscale_to_rgb(image)
    image = tf.image.convert_image_dtype(image, tf.float32)
    if image_size is not None:
        image = tf.image.resize(image, image_size, method=interpolation, antialias=True)
        image = tf.clip_by_value(image, 0.0, 1.0)
    if invert:
        image = 1.0 - image
    return image


def _check_image_size(image_size):
    if image_size is None:
        return None
    if (
        len(image_size) != 2
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
               for s in image_size)
    ):
        raise ValueError(
            "`image_size` must be (height, width) with positive ints, or None. "
            f"Received: image_size={image_size!r}"
        )
    return tuple(int(s) for s in image_size)


def _collect(dataset, batched, name, paths):
    """(images, indices) as numpy arrays from a dataset of (image, index)."""
    if batched:
        images, indices = [], []
        for x, i in dataset.batch(512).prefetch(2).as_numpy_iterator():
            images.append(x)
            indices.append(i)
        if not images:
            return np.zeros((0,)), np.zeros((0,), np.int64)
        return np.concatenate(images), np.concatenate(indices)
    images, indices = [], []
    for x, i in dataset.prefetch(8).as_numpy_iterator():
        if images and x.shape != images[0].shape:
            raise ValueError(
                f"Images of source {name!r} differ in size: {paths[indices[0]]!r} "
                f"is {images[0].shape}, {paths[i]!r} is {x.shape}. Pass "
                "`image_size=(height, width)` to resize them."
            )
        images.append(x)
        indices.append(i)
    if not images:
        return np.zeros((0,)), np.zeros((0,), np.int64)
    return np.stack(images), np.array(indices)

