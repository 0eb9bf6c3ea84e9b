"""Labelled examples grouped by class: what episodes sample from.

Three builders turn the forms few-shot data comes in into a `Source`: arrays
(`from_arrays`), a folder of images per class (`from_directory`) and
TensorFlow Datasets (`from_tfds`). Images are decoded once, in parallel, and
kept as one array; `keras_meta.data.episodes` samples meta-batches from it.

Compact storage: a source may hold its images as uint8 (`storage="uint8"`,
`Source.compact()`), a quarter of the float32 bytes, or leave them on disk
(`DiskImages`: raw rows or encoded PNG/JPEG bytes in a file, read with
`os.pread`); episodes then read the rows they need and convert them to
float32 in [0, 1] per episode, optionally augmented. `cache_dir` keeps the
decoded images of a folder in a file, so that the next run reads them back
instead of decoding again.
"""

import hashlib
import json
import os
import random
import re
import socket
import sys
import threading
import urllib.error

import numpy as np
import tensorflow as tf

from keras_meta.validation import check_choice

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif")
COLOR_MODES = {"grayscale": 1, "rgb": 3}
ROTATIONS = (0, 90, 180, 270)
INTERPOLATIONS = (
    "bilinear", "nearest", "bicubic", "area", "lanczos3", "lanczos5", "gaussian",
    "mitchellcubic",
)
# verbose="auto" shows a progress bar from this many images on (on a terminal).
PROGRESS_MIN_IMAGES = 1000


class DatasetDownloadError(ConnectionError):
    """A data set could not be downloaded (no network access, server unreachable)."""


class Source:
    """Labelled examples, grouped by class.

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

    Compact sources (`scale` set, or `x` a `DiskImages`) hold integer images
    (uint8) and convert them per episode: `episodes` yields float32
    `x * scale` (`1 / 255`: values in [0, 1]), so the source holds a quarter
    of the bytes of a float32 one, or none at all when the images stay on
    disk. `augmentation` (see `with_augmentation`) transforms the support
    and query images of every episode after that conversion.

    Args:
        x: array `[num_examples, ...]`, or a `DiskImages` (images on disk).
        y: int array `[num_examples]` with values in `0 .. len(class_names) - 1`.
        class_names: one name per base class.
        name: a name used in error messages and reports.
        rotations: tuple of angles in `(0, 90, 180, 270)`; `(0,)` for none.
        metadata: dict recording where the data came from (paths, split).
        scale: `None` (episodes yield `x` as stored) or a positive number:
            `x` holds integers and episodes yield float32 `x * scale`. A
            `DiskImages` `x` defaults to `1 / 255`.
        augmentation: `None`, or a callable applied to each episode's images
            (see `with_augmentation`).

    Example:

    >>> source = from_arrays(np.zeros((6, 2)), [5, 5, 7, 7, 9, 9])
    >>> source.class_names, source.examples_per_class.tolist()
    (('5', '7', '9'), [2, 2, 2])
    """

    def __init__(
        self, x, y, class_names, name="source", rotations=(0,), metadata=None,
        scale=None, augmentation=None,
    ):
        if not isinstance(x, DiskImages):
            x = np.asarray(x).view()  # a view: freezing it leaves the caller's array be
        y = np.array(y, dtype=np.int32)
        class_names = tuple(str(n) for n in class_names)
        if len(x) != len(y):
            raise ValueError(
                "`x` and `y` must have the same length. Received: "
                f"len(x)={len(x)}, len(y)={len(y)}"
            )
        if len(set(class_names)) != len(class_names):
            repeated = sorted({n for n in class_names if class_names.count(n) > 1})
            raise ValueError(
                f"`class_names` must be unique. Received: {repeated} more than once "
                f"among {len(class_names)} names"
            )
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
        scale = _check_scale(scale, x, name)
        augmentation = _check_augmentation(augmentation, x, name)
        if not isinstance(x, DiskImages):
            x.setflags(write=False)
        y.setflags(write=False)
        self.x, self.y = x, y
        self.base_class_names = class_names
        self.name = name
        self.rotations = rotations
        self.metadata = dict(metadata or {})
        self.examples_per_class = np.bincount(y, minlength=len(class_names))
        self.scale = scale
        self.augmentation = augmentation

    @property
    def storage(self):
        """How the examples are held: e.g. `"float32 in memory"`, `"uint8 on disk"`."""
        where = "on disk" if isinstance(self.x, DiskImages) else "in memory"
        return f"{np.dtype(self.x.dtype).name} {where}"

    @property
    def converts_per_episode(self):
        """Whether episodes read, convert or augment the examples per episode."""
        return (
            self.scale is not None
            or self.augmentation is not None
            or isinstance(self.x, DiskImages)
        )

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
        dtype = np.dtype(self.x.dtype).name
        if isinstance(self.x, DiskImages):
            dtype += " on disk"
        if self.scale is not None:
            dtype += " (float32 per episode)"
        augmented = ", augmented" if self.augmentation is not None else ""
        return (
            f"<Source {self.name!r}: {len(self)} examples of shape "
            f"{self.example_shape} {dtype}, {self.num_base_classes} "
            f"classes{rotations}{augmented}>"
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
        if isinstance(self.x, DiskImages):
            x = self.x.take(np.flatnonzero(keep))  # stays on disk
        else:
            x = self.x[keep]
        return Source(
            x,
            new_label[self.y[keep]],
            [self.base_class_names[i] for i in indices],
            name=name or self.name,
            rotations=self.rotations,
            metadata=self.metadata,
            scale=self.scale,
            augmentation=self.augmentation,
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
        return self._replace(rotations=rotations)

    def with_augmentation(self, augmentation):
        """The same examples, with every episode's images augmented.

        `augmentation` is applied, inside the `tf.data` pipeline, to the
        support and to the query images of each episode (float32 in [0, 1]
        for compact sources), as `[examples, height, width, channels]`
        batches:

        - a `keras_meta.data.Augmentation` (random crop with padding,
          horizontal flip, colour jitter): stateless random ops seeded by the
          episode, so the stream stays a pure function of its seed;
        - a Keras layer (e.g. a `keras.Sequential` of `keras.layers.RandomCrop`,
          `RandomFlip`, `RandomColorJitter`), called with `training=True`;
          its random draws come from the layers' own seed generators;
        - `None`: no augmentation.

        Only image sources (`[examples, height, width, channels]`) take one.
        Augment the training source only: validation and test tasks are
        evaluated on the images as they are.
        """
        return self._replace(augmentation=augmentation)

    def compact(self):
        """The same source with its float images in [0, 1] held as uint8.

        Values are rounded to the nearest multiple of 1/255 (exact for
        images decoded from 8-bit files); episodes convert them back to
        float32 per episode. Sources already compact are returned as they
        are.
        """
        if self.scale is not None or isinstance(self.x, DiskImages):
            return self
        if not np.issubdtype(self.x.dtype, np.floating):
            raise ValueError(
                f"Source {self.name!r} holds {self.x.dtype} examples: `compact()` "
                "converts float images in [0, 1] to uint8."
            )
        if len(self.x) and (np.nanmin(self.x) < 0 or np.nanmax(self.x) > 1):
            raise ValueError(
                f"Source {self.name!r} holds values in [{np.nanmin(self.x):g}, "
                f"{np.nanmax(self.x):g}]: `compact()` needs images in [0, 1]."
            )
        x = np.empty(self.x.shape, np.uint8)
        for start in range(0, len(x), 4096):  # in blocks: no float copy of it all
            block = self.x[start : start + 4096]
            x[start : start + 4096] = np.rint(block * 255)
        return self._replace(x=x, scale=1 / 255)

    def _replace(self, **changes):
        arguments = dict(
            x=self.x, y=self.y, class_names=self.base_class_names, name=self.name,
            rotations=self.rotations, metadata=self.metadata, scale=self.scale,
            augmentation=self.augmentation,
        )
        arguments.update(changes)
        return Source(**arguments)

    def _read_rows(self, rows):
        """The examples at `rows` (`rotation * len(self) + index`) for one episode.

        Runs inside the episode pipeline: reads the rows (from memory or from
        disk, in a `tf.numpy_function`), rotates them, converts them to
        float32 (`x * scale`) and augments them.
        """
        rows = tf.convert_to_tensor(rows)
        outer = rows.shape.as_list()
        flat = tf.reshape(tf.cast(rows, tf.int64), [-1])
        count = len(self)
        index = flat % count if self.rotations != (0,) else flat
        example_shape = list(self.example_shape)
        x = self.x
        if isinstance(x, DiskImages) and x.encoded:
            encoded = tf.numpy_function(x.read_encoded, [index], tf.string, stateful=False)
            encoded.set_shape([None])
            channels = example_shape[-1]
            images = tf.map_fn(
                lambda contents: tf.ensure_shape(
                    decode_image(contents, channels), example_shape
                ),
                encoded,
                fn_output_signature=tf.TensorSpec(example_shape, tf.uint8),
                parallel_iterations=16,
            )
        else:
            read = x.read if isinstance(x, DiskImages) else _ArrayRows(x)
            images = tf.numpy_function(
                read, [index], tf.as_dtype(x.dtype), stateful=False
            )
            images.set_shape([None] + example_shape)
        if self.rotations != (0,):
            turns = tf.gather(
                tf.constant([angle // 90 for angle in self.rotations], tf.int64),
                flat // count,
            )
            rotated = tf.stack([tf.image.rot90(images, k) for k in range(4)], axis=1)
            images = tf.gather(rotated, turns, axis=1, batch_dims=1)
        if getattr(self.augmentation, "stateless", False):
            # Converts too: crops and flips the stored integers (fewer bytes
            # to move), then jitters the float32 images.
            images = self.augmentation(images, seed=_episode_seed(flat), scale=self.scale)
        else:
            if self.scale is not None:
                images = tf.cast(images, tf.float32) * self.scale
            if self.augmentation is not None:
                images = self.augmentation(images, training=True)
        return tf.reshape(images, outer + example_shape)


class _ArrayRows:
    """`rows -> array[rows]`, the numpy side of reading an in-memory array."""

    def __init__(self, array):
        self.array = array

    def __call__(self, rows):
        return np.ascontiguousarray(self.array[rows])


def _episode_seed(rows):
    """A stateless seed (int64 [2]) from the rows an episode drew.

    The same episode gets the same augmentation, and the stream stays a pure
    function of its seed.
    """
    weights = tf.range(1, tf.size(rows, out_type=tf.int64) + 1) * 2 - 1
    fingerprint = tf.reduce_sum((rows + 1) * weights * 2654435761)
    return tf.stack([fingerprint, tf.size(rows, out_type=tf.int64)])


def _check_scale(scale, x, name):
    if scale is None:
        return 1 / 255 if isinstance(x, DiskImages) else None
    if (
        isinstance(scale, bool)
        or not isinstance(scale, (int, float, np.integer, np.floating))
        or not np.isfinite(scale)
        or scale <= 0
    ):
        raise ValueError(
            f"`scale` must be None or a positive number (1/255 for uint8 images). "
            f"Received: scale={scale!r}"
        )
    if not np.issubdtype(np.dtype(x.dtype), np.integer):
        raise ValueError(
            f"`scale` converts integer examples (uint8 images) to float32 per "
            f"episode, but source {name!r} holds {np.dtype(x.dtype).name} examples. "
            "Pass scale=None."
        )
    return float(scale)


def _check_augmentation(augmentation, x, name):
    if augmentation is None:
        return None
    if not callable(augmentation):
        raise ValueError(
            "`augmentation` must be None, a keras_meta.data.Augmentation or a "
            "Keras layer (a callable on [examples, height, width, channels] "
            f"images). Received: augmentation={augmentation!r}"
        )
    if len(x.shape) != 4:
        raise ValueError(
            f"`augmentation` transforms images [examples, height, width, "
            f"channels], but source {name!r} holds examples of shape "
            f"{tuple(x.shape[1:])}."
        )
    return augmentation


class DiskImages:
    """uint8 images that stay in a file: the `x` of a disk-backed `Source`.

    Episodes read only the rows they draw (`os.pread` from worker threads of
    the `tf.data` pipeline), so a source larger than memory samples episodes
    in constant memory; the operating system's page cache keeps what is read
    often. Indexing (`images[3]`, `images[[3, 1]]`, slices, boolean masks)
    returns uint8 arrays and `np.asarray(images)` reads them all. Build one
    with `RawImages` (rows of `height * width * channels` bytes) or
    `EncodedImages` (PNG/JPEG bytes at given offsets).

    Attributes:
        path: the file.
        image_shape: `(height, width, channels)`.
        rows: which images of the file, in order (a subset keeps its rows).
    """

    dtype = np.dtype(np.uint8)
    encoded = False

    def __init__(self, path, image_shape, rows):
        self.path = os.fspath(path)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._fd, self._pid = None, None

    @property
    def shape(self):
        return (len(self.rows),) + self.image_shape

    @property
    def ndim(self):
        return 1 + len(self.image_shape)

    @property
    def nbytes(self):
        return len(self.rows) * int(np.prod(self.image_shape))

    def __len__(self):
        return len(self.rows)

    def __repr__(self):
        return f"<{type(self).__name__} {self.shape} uint8 in {self.path!r}>"

    def __getitem__(self, key):
        if isinstance(key, (int, np.integer)) and not isinstance(key, bool):
            return self.read(np.arange(len(self))[[key]])[0]
        if isinstance(key, slice):
            return self.read(np.arange(len(self))[key])
        key = np.asarray(key)
        if key.dtype == bool:
            key = np.flatnonzero(key)
        return self.read(np.arange(len(self))[key])

    def __array__(self, dtype=None, copy=None):
        images = self.read(np.arange(len(self)))
        return images if dtype is None else images.astype(dtype)

    def take(self, indices):
        """The images at `indices` (positions in this collection), still on disk."""
        other = object.__new__(type(self))
        other.__dict__.update(self.__dict__)
        other.rows = self.rows[np.asarray(indices, dtype=np.int64)]
        other._fd, other._pid = None, None
        return other

    def _descriptor(self):
        if self._fd is None or self._pid != os.getpid():  # reopened after a fork
            with _OPEN_LOCK:  # pipeline threads read at once
                if self._fd is None or self._pid != os.getpid():
                    flags = os.O_RDONLY | getattr(os, "O_BINARY", 0)
                    self._fd, self._pid = os.open(self.path, flags), os.getpid()
        return self._fd

    def _pread(self, size, offset, what):
        data = _read_at(self._descriptor(), size, offset)
        if len(data) != size:
            raise ValueError(
                f"{self.path!r} ends before {what} (byte {offset} + {size}): the "
                "file is truncated or changed since the source was built."
            )
        return data

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None and self._pid == os.getpid():
            try:
                os.close(fd)
            except OSError:
                pass

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fd"], state["_pid"] = None, None
        return state


class RawImages(DiskImages):
    """Images stored as consecutive uint8 rows of a file (a `.npy`, a pickle's array).

    Image `i` is the `height * width * channels` bytes at `offset + i *
    row_bytes`, in C order (height, width, channels).

    Args:
        path: the file.
        offset: byte offset of the first image.
        count: images in the file.
        image_shape: `(height, width, channels)`.
        channel_order: `"rgb"`, or `"bgr"` for files written by OpenCV (the
            channels are reversed as rows are read).
    """

    def __init__(self, path, offset, count, image_shape, channel_order="rgb", rows=None):
        super().__init__(path, image_shape, np.arange(count) if rows is None else rows)
        self.offset = int(offset)
        self.count = int(count)
        self.channel_order = check_choice("channel_order", channel_order, ("rgb", "bgr"))
        self.row_bytes = int(np.prod(self.image_shape))
        size = os.path.getsize(self.path)
        if self.offset + self.count * self.row_bytes > size:
            raise ValueError(
                f"{self.path!r} holds {size} bytes, too few for {self.count} images of "
                f"shape {self.image_shape} from byte {self.offset}: the file is truncated."
            )

    def read(self, indices):
        """uint8 `[len(indices), *image_shape]`: the images at positions `indices`."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        out = np.empty((len(indices),) + self.image_shape, np.uint8)
        flat = out.reshape(len(indices), self.row_bytes)
        fd = self._descriptor()
        for i, row in enumerate(self.rows[indices]):
            offset = self.offset + int(row) * self.row_bytes
            if hasattr(os, "preadv"):  # straight into the output
                if os.preadv(fd, [flat[i]], offset) != self.row_bytes:
                    self._pread(self.row_bytes, offset, f"image {row}")  # raises
            else:
                flat[i] = np.frombuffer(self._pread(self.row_bytes, offset, f"image {row}"),
                                        np.uint8)
        if self.channel_order == "bgr":
            out = out[..., ::-1].copy()
        return out


class EncodedImages(DiskImages):
    """Images stored encoded (PNG, JPEG, ...) at given byte ranges of a file.

    Episodes read the bytes of the images they draw and decode them in the
    pipeline (`tf.io.decode_image`); all must decode to `image_shape`.

    Args:
        path: the file.
        offsets: byte offset of each encoded image.
        lengths: byte length of each.
        image_shape: `(height, width, channels)` they decode to.
    """

    encoded = True

    def __init__(self, path, offsets, lengths, image_shape, rows=None):
        offsets = np.asarray(offsets, dtype=np.int64)
        lengths = np.asarray(lengths, dtype=np.int64)
        if offsets.shape != lengths.shape or offsets.ndim != 1:
            raise ValueError(
                "`offsets` and `lengths` must be 1-D and of one length. Received: "
                f"shapes {offsets.shape} and {lengths.shape}"
            )
        super().__init__(path, image_shape, np.arange(len(offsets)) if rows is None else rows)
        self.offsets, self.lengths = offsets, lengths
        size = os.path.getsize(self.path)
        if len(offsets) and int((offsets + lengths).max()) > size:
            raise ValueError(
                f"{self.path!r} holds {size} bytes, fewer than its images reach "
                f"({int((offsets + lengths).max())}): the file is truncated."
            )

    def read_encoded(self, indices):
        """The encoded bytes of the images at positions `indices` (object array)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        rows = self.rows[indices]
        out = np.empty(len(rows), dtype=object)
        for i, row in enumerate(rows):
            out[i] = self._pread(
                int(self.lengths[row]), int(self.offsets[row]), f"image {row}"
            )
        return out

    def read(self, indices):
        """uint8 `[len(indices), *image_shape]`, decoded."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        encoded = self.read_encoded(indices)
        channels = self.image_shape[-1]
        images = np.empty((len(encoded),) + self.image_shape, np.uint8)
        for i, contents in enumerate(encoded):
            image = decode_image(tf.constant(contents), channels).numpy()
            if image.shape != self.image_shape:
                raise ValueError(
                    f"Image {int(self.rows[indices[i]])} of {self.path!r} decodes to "
                    f"shape {image.shape}, not {self.image_shape}."
                )
            images[i] = image
        return images


_OPEN_LOCK = threading.Lock()


def _read_at(fd, size, offset):
    """`size` bytes of `fd` from `offset` (thread-safe)."""
    if hasattr(os, "pread"):
        return os.pread(fd, size, offset)
    with _OPEN_LOCK:  # no positional reads (Windows): seek and read under a lock
        os.lseek(fd, offset, os.SEEK_SET)
        return os.read(fd, size)


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
    try:
        x = np.asarray(x)
    except ValueError as error:
        raise ValueError(
            "`x` must be an array [num_examples, ...] of examples that share one "
            f"shape. Received: {type(x).__name__} that NumPy cannot stack ({error})"
        ) from error
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
    verbose="auto",
    storage="float32",
    cache_dir=None,
):
    """A source from a folder of images, one sub-folder per class.

    Every folder under `root`, at any depth, that holds image files is a
    class, named by its path relative to `root` (`"Greek/character01"` for
    Omniglot's `alphabet/character/*.png`, `"cat"` for flat class folders).
    The images are decoded once, in parallel, converted to `color_mode`,
    resized to `image_size`, scaled to [0, 1] and optionally inverted, then
    held in memory as one float32 array.

    What counts:

    - Hidden folders and files (names starting with `.`, e.g.
      `.ipynb_checkpoints`, `.DS_Store`, macOS `._*` files) are skipped at
      every depth: they are never classes or images.
    - Files whose names end with one of `extensions` are images; other files
      (`notes.txt`, `labels.csv`) are ignored.
    - Symbolic links to folders and files are followed, but every image file
      is counted once, under one class: a link that leads back to a folder
      that contains it (a cycle, e.g. `ln -s .. loop`) or a layout that
      reaches the same image file twice (two links to one folder) is refused
      with a `ValueError` that names the link or both paths, since repeated
      images would leak across class splits.
    - GIFs decode to their first frame, in both color modes.

    Args:
        root: the folder.
        image_size: `(height, width)`, an int `n` for `(n, n)`, or `None` to
            keep the files' size (then they must all share it).
        color_mode: `"grayscale"` (1 channel) or `"rgb"` (3 channels).
        invert: `x -> 1 - x` after scaling (Omniglot's strokes are black on
            white: invert so that strokes are 1 on a background of 0).
        interpolation: a `tf.image.resize` method; `"lanczos3"` (with
            anti-aliasing, clipped to [0, 1]) matches the PIL LANCZOS resize of
            the reference MAML and iMAML code.
        extensions: file name endings counted as images (case-insensitive):
            a string such as `".png"` or a sequence of them.
        name: a name for error messages (default: the folder's name).
        verbose: `"auto"` shows a progress bar while decoding when there are
            at least 1000 images and the output is a terminal or a notebook;
            `1` (or `True`) always shows one, `0` (or `False`) never.
        storage: `"float32"` (the images in [0, 1]) or `"uint8"` (a quarter
            of the memory; episodes convert them to float32 in [0, 1]).
        cache_dir: `None`, or a folder where the decoded images are kept: a
            later call with the same files (paths, sizes, modification
            times) and options reads them back instead of decoding again.
            With `storage="uint8"` the cached images stay on disk
            (`DiskImages`), read per episode.

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
    extensions = _check_extensions(extensions)
    # Argument errors before the (possibly long) walk of the folder.
    _check_image_options(image_size, color_mode, invert, interpolation, verbose)
    _check_storage(storage, cache_dir)
    walk = walk_image_folders(root, extensions)
    class_names, files = [], []
    for dirpath, images in walk.folders:
        relative = os.path.relpath(dirpath, root)
        if relative == os.curdir:
            raise ValueError(
                f"Image files lie directly in `root`={root!r}; from_directory "
                "expects one sub-folder per class (e.g. root/cat/1.png). "
                f"Found e.g. {os.path.basename(images[0])!r}"
            )
        class_names.append(relative.replace(os.sep, "/"))
        files.append(images)
    if not class_names:
        raise ValueError(
            f"No image files ({', '.join(extensions)}) found in any folder "
            f"under `root`={root!r}: from_directory expects one sub-folder of "
            f"images per class, at any depth.{walk.describe_skipped(root)}"
        )
    return from_files(
        files, class_names, image_size=image_size, color_mode=color_mode,
        invert=invert, interpolation=interpolation, name=name,
        metadata={"source": "directory", "root": os.path.abspath(root)},
        verbose=verbose, storage=storage, cache_dir=cache_dir,
    )


class _ImageWalk:
    """The result of `walk_image_folders`: folders of images, and what was skipped."""

    def __init__(self):
        self.folders = []  # (folder path, [image paths]) in walk order
        self.hidden = []  # hidden names skipped (paths)
        self.other_files = []  # files without an image extension (paths)

    def describe_skipped(self, root):
        notes = []
        for label, paths in (
            ("other file(s)", self.other_files),
            ("hidden folder(s) or file(s), which are skipped", self.hidden),
        ):
            if paths:
                shown = ", ".join(repr(os.path.relpath(p, root)) for p in paths[:3])
                more = ", ..." if len(paths) > 3 else ""
                notes.append(f"{len(paths)} {label}: {shown}{more}")
        return f" Found {'; '.join(notes)}." if notes else ""


def walk_image_folders(root, extensions=IMAGE_EXTENSIONS):
    """Folders under `root` that hold image files, each real file counted once.

    A depth-first walk in sorted name order (a folder before its
    sub-folders), following symbolic links. Hidden entries (names starting
    with `.`) are skipped. A link to a folder that contains it (a cycle) and
    an image file reached twice (through links) raise a `ValueError` naming
    the paths.

    Args:
        root: the folder to walk.
        extensions: lower-case file name endings counted as images.

    Returns:
        An object with `folders`, a list of `(folder, [image paths])` for the
        folders holding images, and `hidden` and `other_files`, the paths of
        the hidden entries and of the non-image files skipped.
    """
    walk = _ImageWalk()
    real_root = os.path.realpath(root)
    seen_files = {}  # real path -> path of the image file
    # (path, real path, real paths of the folders above and including it)
    stack = [(root, real_root, (real_root,))]
    while stack:
        folder, real_folder, ancestors = stack.pop()
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
        images, subfolders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                walk.hidden.append(entry.path)
                continue
            # Below a known real folder, only a link needs resolving.
            if entry.is_symlink():
                real = os.path.realpath(entry.path)
            else:
                real = os.path.join(real_folder, entry.name)
            if entry.is_dir():  # follows links
                if real in ancestors:
                    raise ValueError(
                        f"Symbolic link {entry.path!r} points to {real!r}, a folder "
                        "that contains the link: following it would count the same "
                        "images again and again. Remove the link (or point it "
                        "outside the folder) and call again."
                    )
                subfolders.append((entry.path, real, ancestors + (real,)))
            elif entry.name.lower().endswith(extensions):
                # A broken link is kept: decoding then names it.
                if real in seen_files:
                    raise ValueError(
                        f"Image file {real!r} is reached twice, as "
                        f"{seen_files[real]!r} and as {entry.path!r}, through a "
                        "symbolic link: each image must be counted once, in one "
                        "class. Remove one of the links."
                    )
                seen_files[real] = entry.path
                images.append(entry.path)
            else:
                walk.other_files.append(entry.path)
        if images:
            walk.folders.append((folder, images))
        stack.extend(reversed(subfolders))
    return walk


def from_files(
    files,
    class_names,
    image_size=(28, 28),
    color_mode="grayscale",
    invert=False,
    interpolation="lanczos3",
    name="files",
    metadata=None,
    verbose="auto",
    storage="float32",
    cache_dir=None,
):
    """A source from lists of image files, one list per class.

    The decoding step of `from_directory`, for layouts it does not cover.
    PNG, JPEG, BMP and GIF files (the first frame) are decoded.

    Args:
        files: a list per class of image paths.
        class_names: one name per class.
        image_size, color_mode, invert, interpolation, verbose, storage,
            cache_dir: as in `from_directory`.
        name: a name for error messages.
        metadata: dict recorded on the source.

    Returns:
        A `Source`.
    """
    image_size, channels, verbose = _check_image_options(
        image_size, color_mode, invert, interpolation, verbose
    )
    storage, cache_dir = _check_storage(storage, cache_dir)
    if isinstance(files, (str, bytes, os.PathLike)) or not hasattr(files, "__len__"):
        raise ValueError(
            "`files` must be a list per class of image paths. Received: "
            f"files={files!r}"
        )
    if isinstance(class_names, (str, bytes)) or not hasattr(class_names, "__len__"):
        raise ValueError(
            "`class_names` must be a list of class names, one per list of "
            f"`files`. Received: class_names={class_names!r}"
        )
    if len(files) != len(class_names):
        raise ValueError(
            "`files` must hold one list of files per class. Received: "
            f"{len(files)} lists for {len(class_names)} class names"
        )
    for i, (class_name, paths) in enumerate(zip(class_names, files)):
        if isinstance(paths, (str, bytes, os.PathLike)) or not hasattr(paths, "__len__"):
            raise ValueError(
                "`files` must be a list per class of image paths (a list of "
                f"lists). Received: files[{i}]={paths!r} for class {class_name!r}"
            )
        if not len(paths):
            raise ValueError(f"Class {class_name!r} of source {name!r} has no image files.")
    paths = [os.fspath(p) for paths in files for p in paths]
    labels = np.repeat(np.arange(len(files)), [len(p) for p in files])
    metadata = dict(metadata or {})
    scale = 1 / 255 if storage == "uint8" else None
    cache = None
    if cache_dir is not None:
        options = dict(image_size=image_size, channels=channels, invert=bool(invert),
                       interpolation=interpolation, storage=storage)
        cache = _DecodedCache(cache_dir, name, paths, [str(c) for c in class_names], options)
        cached = cache.load()
        if cached is not None:
            metadata.update(cache=cache.images_path, cache_hit=True)
            return Source(cached, labels, class_names, name=name, metadata=metadata,
                          scale=scale)

    def decode(contents):
        image = decode_image(contents, channels)
        return preprocess_images(image, image_size, None, invert, interpolation)

    def decode_stored(contents):
        image = decode(contents)
        if storage == "uint8":
            image = tf.cast(tf.round(image * 255), tf.uint8)
        return image

    def load(index):
        return decode_stored(tf.io.read_file(tf.gather(paths, index))), index

    # Files that fail to read or decode are dropped by `ignore_errors` and
    # named below from the indices that did not come back.
    dataset = (
        tf.data.Dataset.range(len(paths))
        .map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .ignore_errors()
    )
    progress = None
    if verbose == "auto":
        verbose = int(len(paths) >= PROGRESS_MIN_IMAGES and _interactive_output())
    if verbose:
        import keras

        message = f"Decoding {len(paths)} images of {len(files)} classes (source {name!r})"
        if keras.config.is_interactive_logging_enabled():  # as Progbar prints
            sys.stdout.write(message + "\n")
            sys.stdout.flush()
        else:
            from absl import logging

            logging.info(message)
        progress = keras.utils.Progbar(len(paths), verbose=verbose, unit_name="image")
    images, indices = _collect(dataset, image_size is not None, name, paths, progress)
    if len(indices) != len(paths):
        bad = np.setdiff1d(np.arange(len(paths)), indices)
        shown = "".join(
            f"\n  {paths[i]!r}: {_why_unreadable(paths[i], decode)}" for i in bad[:5]
        )
        more = f"\n  and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise ValueError(
            f"Could not read or decode {len(bad)} image file(s) of source "
            f"{name!r}:{shown}{more}\n"
            "Remove them or fix them."
        )
    if cache is not None:
        cache.save(images)
        metadata.update(cache=cache.images_path, cache_hit=False)
    return Source(images, labels[indices], class_names, name=name, metadata=metadata,
                  scale=scale)


STORAGES = ("float32", "uint8")


def _check_storage(storage, cache_dir):
    storage = check_choice("storage", storage, STORAGES)
    if cache_dir is not None:
        if isinstance(cache_dir, bool) or not isinstance(cache_dir, (str, os.PathLike)):
            raise ValueError(
                "`cache_dir` must be None or a folder path. Received: "
                f"cache_dir={cache_dir!r}"
            )
        cache_dir = os.fspath(cache_dir)
        if os.path.exists(cache_dir) and not os.path.isdir(cache_dir):
            raise NotADirectoryError(
                f"`cache_dir` must be a folder. Received: {cache_dir!r}, a file"
            )
    return storage, cache_dir


class _DecodedCache:
    """Decoded images of a list of files, kept in `cache_dir` for the next run.

    Two files per key: `<name>-<key>.npy` (the images, in file order) and
    `<name>-<key>.json` (what they are), the JSON written last so that an
    interrupted write is never read. The key hashes the options and every
    file's path, size and modification time: changing a file or an option
    decodes again.
    """

    VERSION = 1

    def __init__(self, cache_dir, name, paths, class_names, options):
        digest = hashlib.sha256()
        digest.update(json.dumps(
            {"version": self.VERSION, "options": options, "classes": class_names},
            sort_keys=True,
        ).encode())
        for path in paths:
            try:
                stat = os.stat(path)
                digest.update(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            except OSError:
                digest.update(f"{os.path.abspath(path)}\0missing\n".encode())
        stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name)).strip("._") or "images"
        base = os.path.join(cache_dir, f"{stem}-{digest.hexdigest()[:20]}")
        self.images_path, self.info_path = base + ".npy", base + ".json"
        self.count, self.storage = len(paths), options["storage"]

    def load(self):
        """The cached images (on disk for uint8, in memory for float32), or None."""
        if not (os.path.isfile(self.info_path) and os.path.isfile(self.images_path)):
            return None
        try:
            with open(self.info_path, encoding="utf-8") as file:
                info = json.load(file)
            offset, shape, dtype = _npy_layout(self.images_path)
        except (OSError, ValueError):
            return None  # damaged: decode again
        if info.get("count") != self.count or shape[0] != self.count:
            return None
        if self.storage == "uint8" and dtype == np.uint8 and len(shape) == 4:
            return RawImages(self.images_path, offset, shape[0], shape[1:])
        return np.load(self.images_path)

    def save(self, images):
        os.makedirs(os.path.dirname(self.images_path) or ".", exist_ok=True)
        partial = f"{self.images_path}.{os.getpid()}.partial"
        try:
            with open(partial, "wb") as file:
                np.save(file, np.ascontiguousarray(images))
            os.replace(partial, self.images_path)
            info = {"count": self.count, "shape": list(images.shape),
                    "dtype": str(images.dtype), "version": self.VERSION}
            with open(partial, "w", encoding="utf-8") as file:
                json.dump(info, file)
            os.replace(partial, self.info_path)
        finally:
            if os.path.exists(partial):
                os.remove(partial)


def _npy_layout(path):
    """(data offset, shape, dtype) of a C-order `.npy` file."""
    with open(path, "rb") as file:
        version = np.lib.format.read_magic(file)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(file)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(file)
        if fortran:
            raise ValueError(f"{path!r} holds a Fortran-order array.")
        return file.tell(), tuple(shape), np.dtype(dtype)


def decode_image(contents, channels):
    """An image file's bytes -> uint8 `[height, width, channels]`.

    PNG, JPEG and BMP decode through `tf.io.decode_image`; GIFs (which it
    decodes to RGB only) through `tf.io.decode_gif`, keeping the first frame
    and converting it to `channels`.
    """

    def gif():
        frame = tf.io.decode_gif(contents)[0]
        return tf.image.rgb_to_grayscale(frame) if channels == 1 else frame

    def other():
        return tf.io.decode_image(contents, channels=channels, expand_animations=False)

    image = tf.cond(tf.equal(tf.strings.substr(contents, 0, 3), "GIF"), gif, other)
    image.set_shape([None, None, channels])
    return image


def _why_unreadable(path, decode):
    """Why `path` could not be loaded: a short reason for an error message."""
    if not os.path.lexists(path):
        return "no such file"
    if not os.path.exists(path):
        return f"a broken symbolic link (to {os.readlink(path)!r})"
    try:
        with open(path, "rb") as file:
            contents = file.read()
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    if not contents:
        return "an empty file (0 bytes)"
    try:
        decode(tf.constant(contents))
    except (tf.errors.OpError, ValueError) as error:
        message = getattr(error, "message", None) or str(error)
        message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message.strip())
        message = re.sub(r"\s*\[Op:\w+\].*$", "", message.splitlines()[0])
        return f"not a valid image ({message})"
    return "failed to decode in the input pipeline"


def _interactive_output():
    isatty = getattr(sys.stdout, "isatty", None)
    return bool(isatty and isatty()) or "ipykernel" in sys.modules


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

    A download that fails for want of network access (or with an HTTP error)
    raises `DatasetDownloadError`, a `ConnectionError` whose message names
    the failure and is chained to TFDS's error; with `download=False`, a data
    set not yet prepared in `data_dir` raises `FileNotFoundError`.

    Args:
        name: TFDS name, e.g. `"omniglot"`.
        split: TFDS split, e.g. `"train"` or `"train+test"`.
        image_key: feature holding the inputs.
        label_key: feature holding the integer class label.
        data_dir: TFDS data folder (default TFDS's own).
        image_size: `(height, width)` (or an int for a square) to resize
            to, or `None`.
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
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    if not isinstance(invert, (bool, np.bool_)):
        raise ValueError(f"`invert` must be True or False. Received: invert={invert!r}")
    try:
        dataset, info = tfds.load(
            name, split=split, data_dir=data_dir, download=download, with_info=True
        )
    except Exception as error:
        where = f"`data_dir`={data_dir!r}" if data_dir is not None else "TFDS's data folder"
        network = network_error(error)
        if network is not None:
            raise DatasetDownloadError(
                f"Could not download TFDS {name!r}: {_describe_network_error(network)} "
                f"Prepare the data set where there is network access and copy "
                f"{where} here, or build the source from local files with "
                "`from_directory`."
            ) from error
        not_prepared = isinstance(error, AssertionError) and "could not find data" in str(error)
        if not download and not_prepared:
            raise FileNotFoundError(
                f"TFDS {name!r} is not prepared in {where}, and `download=False` "
                "forbids downloading it. Pass `download=True`, or the `data_dir` "
                "where it was prepared."
            ) from error
        raise
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


def network_error(error):
    """The network failure behind `error` (in its cause chain), or None.

    Connection-level failures count (no route, refused, name resolution,
    timeouts, `requests` and `urllib3` connection errors, TFDS download
    errors); other errors (a bad argument, a full disk) do not.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        module = type(error).__module__.split(".")[0]
        if (
            isinstance(error, (ConnectionError, TimeoutError, socket.gaierror,
                               socket.herror, urllib.error.URLError))
            or module in ("requests", "urllib3")
            or type(error).__name__ == "DownloadError"
        ):
            return error
        error = error.__cause__ or error.__context__
    return None


def _describe_network_error(error):
    # requests wraps urllib3's MaxRetryError, whose `reason` is the failure
    # itself (NewConnectionError, NameResolutionError): name that one.
    for _ in range(5):
        inner = getattr(error, "reason", None)
        if not isinstance(inner, BaseException) and error.args:
            inner = error.args[0]
        if not isinstance(inner, BaseException):
            break
        error = inner
    if type(error).__name__ in ("HTTPError", "DownloadError"):
        return f"the server refused the download ({_short(error)})."
    return (
        f"no network access ({_short(error)}). This machine seems to be offline, "
        "or the server is unreachable."
    )


def _short(error, limit=400):
    text = f"{type(error).__name__}: {error}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    received = image_size
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        image_size = (image_size, image_size)
    if (
        isinstance(image_size, (str, bytes))
        or not hasattr(image_size, "__len__")
        or len(image_size) != 2
        or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 1
               for s in image_size)
    ):
        raise ValueError(
            "`image_size` must be (height, width) with positive ints, a positive "
            f"int for a square, or None. Received: image_size={received!r}"
        )
    return tuple(int(s) for s in image_size)


def _check_extensions(extensions):
    if isinstance(extensions, str):
        extensions = (extensions,)
    try:
        extensions = tuple(extensions)
    except TypeError:
        extensions = None
    if not extensions or any(not isinstance(e, str) or not e.strip(".") for e in extensions):
        raise ValueError(
            "`extensions` must be a file name ending such as '.png' or a sequence "
            f"of them. Received: extensions={extensions!r}"
        )
    return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in extensions)


def _check_image_options(image_size, color_mode, invert, interpolation, verbose):
    """(image_size, channels, verbose) after checking the decoding options."""
    image_size = _check_image_size(image_size)
    channels = COLOR_MODES[check_choice("color_mode", color_mode, tuple(COLOR_MODES))]
    if not isinstance(invert, (bool, np.bool_)):
        raise ValueError(f"`invert` must be True or False. Received: invert={invert!r}")
    check_choice("interpolation", interpolation, INTERPOLATIONS)
    return image_size, channels, _check_verbose(verbose)


def _check_verbose(verbose):
    if verbose == "auto" and isinstance(verbose, str):
        return verbose
    if isinstance(verbose, (bool, np.bool_)):
        return int(verbose)
    if isinstance(verbose, (int, np.integer)) and verbose in (0, 1, 2):
        return int(verbose)
    raise ValueError(
        "`verbose` must be 'auto', 0, 1, 2, True or False. Received: "
        f"verbose={verbose!r}"
    )


def _collect(dataset, batched, name, paths, progress=None):
    """(images, indices) as numpy arrays from a dataset of (image, index)."""
    done = 0
    if batched:
        # One array for all the images, filled batch by batch (no second copy).
        images, indices = None, []
        for x, i in dataset.batch(512).prefetch(2).as_numpy_iterator():
            if images is None:
                images = np.empty((len(paths),) + x.shape[1:], x.dtype)
            images[done : done + len(i)] = x
            indices.append(i)
            done += len(i)
            if progress is not None:
                progress.update(done)
        if progress is not None and done < progress.target:  # files failed
            progress.update(done, finalize=True)
        if images is None:
            return np.zeros((0,)), np.zeros((0,), np.int64)
        return images[:done], np.concatenate(indices)
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
        if progress is not None and len(images) % 64 == 0:
            progress.update(len(images))
    if progress is not None and (len(images) % 64 or len(images) < progress.target):
        progress.update(len(images), finalize=True)
    if not images:
        return np.zeros((0,)), np.zeros((0,), np.int64)
    return np.stack(images), np.array(indices)
