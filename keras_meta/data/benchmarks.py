"""The few-shot image benchmarks beyond Omniglot, from the files users have.

`mini_imagenet`, `tiered_imagenet`, `cifar_fs`, `fc100` and `cub` read the
layouts in common use (no download of these sets: the other libraries' Google
Drive links break constantly), detect which one a folder holds, and say what
each layout needs when a file is missing. They return compact sources: uint8
images in memory, or left on disk (tiered-ImageNet, the mini-ImageNet
pickles), converted to float32 in [0, 1] per episode, optionally augmented
(`Augmentation`). Pickles are read with `keras_meta.data.safe_pickle`, which
rebuilds plain data only.

The class splits (mini-ImageNet's Ravi-Larochelle split, CIFAR-FS, FC100's
superclasses, CUB's 100/50/50) ship as text files in `keras_meta/data/splits/`
that name their source; `published_split(dataset)` returns them.
"""

import csv
import functools
import hashlib
import io
import os
import tarfile
import zipfile

import numpy as np
import tensorflow as tf

from keras_meta.data import safe_pickle
from keras_meta.data.sources import (
    DatasetDownloadError,
    EncodedImages,
    IMAGE_EXTENSIONS,
    RawImages,
    Source,
    _check_image_size,
    _check_storage,
    _check_verbose,
    _describe_network_error,
    _npy_layout,
    decode_image,
    from_files,
    network_error,
    walk_image_folders,
)
from keras_meta.validation import (
    check_bool,
    check_choice,
    check_non_negative_float,
    resolve_seed,
)

SPLITS = ("train", "validation", "test")
# How the files of each split are named on disk ("val" in most layouts).
FILE_SPLIT = {"train": "train", "validation": "val", "test": "test"}
DATASETS = ("mini_imagenet", "cifar_fs", "fc100", "cub")
# Pickles' arrays of at least this many bytes are read per episode from disk.
LAZY_BYTES = 1 << 20


def _check_split(split):
    if split == "val":
        return "validation"
    return check_choice("split", split, SPLITS + ("val",))


def _check_data_dir(data_dir, dataset):
    if isinstance(data_dir, bool) or not isinstance(data_dir, (str, os.PathLike)):
        raise ValueError(
            f"`data_dir` must be the folder holding {dataset}'s files. Received: "
            f"data_dir={data_dir!r}"
        )
    data_dir = os.path.abspath(os.fspath(data_dir))
    if not os.path.exists(data_dir):
        raise FileNotFoundError(
            f"{dataset} folder not found: `data_dir`={data_dir!r} does not exist."
        )
    if not os.path.isdir(data_dir):
        raise NotADirectoryError(
            f"`data_dir` must be the folder holding {dataset}'s files. Received: "
            f"{data_dir!r}, a file"
        )
    return data_dir


def _found(data_dir, limit=12):
    """What a folder holds, for error messages."""
    try:
        entries = sorted(os.listdir(data_dir))
    except OSError as error:
        return f"(cannot list it: {error.strerror or error})"
    entries = [e + ("/" if os.path.isdir(os.path.join(data_dir, e)) else "") for e in entries
               if not e.startswith(".")]
    if not entries:
        return "nothing (the folder is empty)"
    shown = ", ".join(entries[:limit])
    return shown + (f", ... ({len(entries)} entries)" if len(entries) > limit else "")


# ----------------------------------------------------------------------
# Published class splits (package data).


@functools.lru_cache(maxsize=None)
def published_split(dataset):
    """The published class split of a benchmark: `{split: (class, ...)}`.

    Read from `keras_meta/data/splits/<dataset>.txt`, whose header names the
    paper and the repository the lists come from.

    | dataset | classes | names |
    |---|---|---|
    | `"mini_imagenet"` | 64 / 16 / 20 | WordNet ids (Ravi & Larochelle 2017) |
    | `"cifar_fs"` | 64 / 16 / 20 | CIFAR-100 fine labels (Bertinetto et al. 2019) |
    | `"fc100"` | 12 / 4 / 4 superclasses (60 / 20 / 20 classes) | CIFAR-100 coarse labels (Oreshkin et al. 2018) |
    | `"cub"` | 100 / 50 / 50 | CUB-200-2011 folder names (Chen et al. 2019) |

    Args:
        dataset: one of `"mini_imagenet"`, `"cifar_fs"`, `"fc100"`, `"cub"`.

    Returns:
        A dict with keys `"train"`, `"validation"`, `"test"`, each a tuple of
        class (for FC100: superclass) names.

    Example:

    >>> {k: len(v) for k, v in published_split("mini_imagenet").items()}
    {'train': 64, 'validation': 16, 'test': 20}
    """
    check_choice("dataset", dataset, DATASETS)
    path = os.path.join(os.path.dirname(__file__), "splits", f"{dataset}.txt")
    splits, current = {}, None
    with open(path, encoding="utf-8") as file:
        for line in file:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = splits.setdefault(line[1:-1], [])
            else:
                current.append(line)
    return {name: tuple(splits[name]) for name in SPLITS}


def _split_source(source, split, dataset, names, augmentation):
    missing = [n for n in names if n not in set(source.base_class_names)]
    if missing:
        raise ValueError(
            f"{len(missing)} of the {len(names)} {split} classes of {dataset} have no "
            f"images in {source.metadata.get('path') or source.metadata.get('tfds_name')}: "
            f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}."
        )
    part = source.subset(names, name=f"{dataset}/{split}")
    part.metadata.update(dataset=dataset, split=split)
    return part.with_augmentation(augmentation) if augmentation is not None else part


# ----------------------------------------------------------------------
# Episode-level augmentation.


class Augmentation:
    """Random crop with padding, horizontal flip and colour jitter, per episode.

    The augmentation of the few-shot papers that use one (e.g. MetaOptNet,
    learn2learn's CIFAR-FS/FC100 examples): each support and query image of
    an episode is, independently,

    1. zero-padded by `crop_padding` pixels on each side and cropped back to
       its size at a random offset (`"auto"`: 4 pixels for images of at most
       32 pixels, 8 above, torchvision's `RandomCrop(size, padding=...)`);
    2. flipped left-right with probability 1/2 (`horizontal_flip`);
    3. colour-jittered as torchvision's `ColorJitter(brightness, contrast,
       saturation)`: the image scaled by a factor in `[1 - b, 1 + b]`, blended
       with its mean grey level by a factor in `[1 - c, 1 + c]`, then with its
       greyscale version by a factor in `[1 - s, 1 + s]` (RGB only),
       clipping to [0, 1] after each step.

    It runs inside the `tf.data` pipeline on float32 images in [0, 1], with
    stateless random ops seeded by `seed` and by the examples the episode
    drew: the episode stream stays a pure function of its seed (the same
    episode is augmented the same way). Pass it to a loader
    (`mini_imagenet(..., augmentation=Augmentation())`) or to
    `source.with_augmentation`. Keras preprocessing layers work there too
    (called with `training=True`), drawing from their own seed generators.

    Args:
        crop_padding: pixels of zero padding before the random crop, `0` for
            no crop, or `"auto"`.
        horizontal_flip: flip left-right at random.
        brightness, contrast, saturation: jitter strengths (`0` for none).
        seed: int seed of the augmentation.
    """

    stateless = True

    def __init__(self, crop_padding="auto", horizontal_flip=True, brightness=0.4,
                 contrast=0.4, saturation=0.4, seed=0):
        if crop_padding != "auto" and (
            isinstance(crop_padding, bool)
            or not isinstance(crop_padding, (int, np.integer))
            or crop_padding < 0
        ):
            raise ValueError(
                "`crop_padding` must be 'auto' or a non-negative number of pixels. "
                f"Received: crop_padding={crop_padding!r}"
            )
        self.crop_padding = crop_padding if crop_padding == "auto" else int(crop_padding)
        self.horizontal_flip = check_bool("horizontal_flip", horizontal_flip)
        self.brightness = check_non_negative_float("brightness", brightness)
        self.contrast = check_non_negative_float("contrast", contrast)
        self.saturation = check_non_negative_float("saturation", saturation)
        for key in ("brightness", "contrast", "saturation"):
            if getattr(self, key) > 1:
                raise ValueError(
                    f"`{key}` must be in [0, 1] (a factor drawn from [1 - {key}, "
                    f"1 + {key}]). Received: {key}={getattr(self, key)!r}"
                )
        self.seed = resolve_seed(seed)

    def get_config(self):
        return {
            "crop_padding": self.crop_padding, "horizontal_flip": self.horizontal_flip,
            "brightness": self.brightness, "contrast": self.contrast,
            "saturation": self.saturation, "seed": self.seed,
        }

    def __repr__(self):
        arguments = ", ".join(f"{k}={v!r}" for k, v in self.get_config().items())
        return f"Augmentation({arguments})"

    def padding_for(self, height, width):
        if self.crop_padding != "auto":
            return self.crop_padding
        return 4 if max(height, width) <= 32 else 8

    def __call__(self, images, seed, scale=None):
        """Augments `images` `[n, height, width, channels]` with `seed` (int64 `[2]`).

        `images` are float (in [0, 1]), or integers converted to float32
        `images * scale` after the crop and flip (which move fewer bytes as
        uint8). Returns float32 images in [0, 1].
        """
        images = tf.convert_to_tensor(images)
        if not images.dtype.is_floating and scale is None:
            raise ValueError(
                f"Integer images ({images.dtype.name}) need `scale` (1/255 for uint8) "
                "to be converted to float32."
            )
        n = tf.shape(images)[0]
        height, width, channels = images.shape[1:]
        seed = tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), self.seed)
        seeds = tf.random.experimental.stateless_split(seed, 6)
        padding = self.padding_for(height, width)
        # Crop and flip are one gather of rows and one of columns (a flip
        # reverses the columns the crop keeps).
        cols = tf.broadcast_to(tf.range(width)[None, :], tf.stack([n, width]))
        if padding:
            images = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]])
            offsets = tf.random.stateless_uniform(
                [2, n], seeds[0], minval=0, maxval=2 * padding + 1, dtype=tf.int32
            )
            rows = offsets[0][:, None] + tf.range(height)[None, :]
            images = tf.gather(images, rows, axis=1, batch_dims=1)
            cols = cols + offsets[1][:, None]
        if self.horizontal_flip:
            flip = tf.random.stateless_uniform([n], seeds[1]) < 0.5
            cols = tf.where(flip[:, None], tf.reverse(cols, [1]), cols)
        if padding or self.horizontal_flip:
            images = tf.gather(images, cols, axis=2, batch_dims=1)
        if scale is not None:
            images = tf.cast(images, tf.float32) * scale
        images = tf.cast(images, tf.float32)

        def factor(strength, seed):
            low = max(0.0, 1.0 - strength)
            return tf.random.stateless_uniform(
                [n, 1, 1, 1], seed, minval=low, maxval=1.0 + strength
            )

        if self.brightness:
            images = tf.clip_by_value(images * factor(self.brightness, seeds[2]), 0.0, 1.0)
        if self.contrast:
            grey = tf.image.rgb_to_grayscale(images) if channels == 3 else images
            mean = tf.reduce_mean(grey, axis=[1, 2, 3], keepdims=True)
            c = factor(self.contrast, seeds[3])
            images = tf.clip_by_value(c * images + (1.0 - c) * mean, 0.0, 1.0)
        if self.saturation and channels == 3:
            grey = tf.image.rgb_to_grayscale(images)
            s = factor(self.saturation, seeds[4])
            images = tf.clip_by_value(s * images + (1.0 - s) * grey, 0.0, 1.0)
        images.set_shape([None, height, width, channels])
        return images


def _check_augmentation(augmentation):
    if augmentation is not None and not callable(augmentation):
        raise ValueError(
            "`augmentation` must be None, a keras_meta.data.Augmentation or a "
            f"Keras preprocessing layer. Received: augmentation={augmentation!r}"
        )
    return augmentation


# ----------------------------------------------------------------------
# mini-ImageNet.

MINI_IMAGENET_LAYOUTS = {
    "pickle": "mini-imagenet-cache-{train,val,test}.pkl (dicts with 'image_data', uint8 "
              "[N, 84, 84, 3], and 'class_dict', {class: [indices]})",
    "csv": "images/ (the JPEG files) plus train.csv, val.csv, test.csv (header "
           "'filename,label': one image file name and its class per row)",
    "folders": "train/, val/, test/ with one folder of images per class",
}


def mini_imagenet(
    split,
    data_dir,
    image_size=84,
    layout="auto",
    in_memory=False,
    cache_dir=None,
    augmentation=None,
    verbose="auto",
):
    """mini-ImageNet (Ravi-Larochelle split) from the files in `data_dir`.

    The split of Ravi & Larochelle (2017): 64 train, 16 validation and 20
    test classes of 600 images each (`published_split("mini_imagenet")`),
    from whichever of the layouts in common use `data_dir` holds (detected;
    `layout=` forces one):

    - `"pickle"`: `mini-imagenet-cache-{train,val,test}.pkl` (learn2learn's
      `mini-imagenet-cache-validation.pkl` is accepted too), each a dict
      with `image_data` (uint8 `[N, 84, 84, 3]`) and `class_dict` (`{class:
      [row, ...]}`). Read with the restricted unpickler; the images are not
      loaded: episodes read the rows they draw from the pickle
      (`in_memory=True` reads them into memory once).
    - `"csv"`: `images/` plus `train.csv` / `val.csv` / `test.csv` with the
      header `filename,label` (Ravi & Larochelle's files); an image is
      `images/<filename>` or `images/<label>/<filename>`.
    - `"folders"`: `train/`, `val/`, `test/`, one sub-folder of images per
      class.

    JPEG and PNG files are decoded once (resized to `image_size`, anti-aliased
    Lanczos) and held as uint8; with `cache_dir` the decoded images are kept
    there and read back (from disk, per episode) by the next run. When several
    layouts are present, the first complete one of pickle, folders, csv is
    used (`metadata["layout"]` says which). A folder with none of them, or
    with a layout missing a file, raises an error that lists what was found
    and what each layout needs.

    Args:
        split: `"train"`, `"validation"` (or `"val"`) or `"test"`.
        data_dir: the folder holding the files.
        image_size: an int or `(height, width)`; the papers use 84.
        layout: `"auto"`, `"pickle"`, `"csv"` or `"folders"`.
        in_memory: read the pickle layout's images into memory (faster
            episodes from a slow disk); the other layouts are in memory
            unless they come from `cache_dir`.
        cache_dir: a folder for the decoded images of the csv and folders
            layouts (see `from_directory`).
        augmentation: `None`, an `Augmentation` or a Keras preprocessing
            layer applied to every episode's images (training only).
        verbose: progress bar while decoding, as in `from_directory`.

    Returns:
        A compact `Source` of the split's classes (named by WordNet id),
        whose `metadata` records the layout, the files and whether its
        classes are those of the published split.

    Example:

    ```python
    train = km.data.mini_imagenet("train", "/data/mini-imagenet")
    batches = km.data.episodes(train, n_way=5, k_shot=1, q_query=15,
                               meta_batch_size=4, seed=0)
    ```

    Reference:
        - [Vinyals et al., 2016](https://arxiv.org/abs/1606.04080)
        - [Ravi & Larochelle, 2017](https://openreview.net/forum?id=rJY0-Kcll)
    """
    split = _check_split(split)
    data_dir = _check_data_dir(data_dir, "mini-ImageNet")
    image_size = _check_image_size(image_size)
    if image_size is None:
        raise ValueError("`image_size` must be an int or (height, width). Received: None")
    check_choice("layout", layout, ("auto",) + tuple(MINI_IMAGENET_LAYOUTS))
    in_memory = check_bool("in_memory", in_memory)
    _check_storage("uint8", cache_dir)
    verbose = _check_verbose(verbose)
    augmentation = _check_augmentation(augmentation)

    found = _mini_imagenet_layouts(data_dir, split)
    if layout == "auto":
        complete = [name for name in ("pickle", "folders", "csv") if found[name][0]]
        if not complete:
            raise FileNotFoundError(_mini_imagenet_missing(data_dir, split, found))
        layout = complete[0]
    elif not found[layout][0]:
        raise FileNotFoundError(_mini_imagenet_missing(data_dir, split, found, layout))
    name = f"mini_imagenet/{split}"
    paths = found[layout][1]
    if layout == "pickle":
        source = _mini_imagenet_pickle(paths["pickle"], image_size, in_memory, name)
    elif layout == "csv":
        files, classes = _mini_imagenet_csv(paths["csv"], paths["images"])
        source = from_files(
            files, classes, image_size=image_size, color_mode="rgb", name=name,
            metadata={"source": "files"}, verbose=verbose, storage="uint8",
            cache_dir=cache_dir,
        )
    else:
        source = _image_folders(paths["folder"], image_size, name, verbose, cache_dir)
    published = published_split("mini_imagenet")[split]
    source.metadata.update(
        dataset="mini_imagenet", split=split, layout=layout, data_dir=data_dir,
        files={k: v for k, v in paths.items()},
        published_split=set(source.base_class_names) <= set(published),
    )
    if augmentation is not None:
        source = source.with_augmentation(augmentation)
    return source


def _mini_imagenet_layouts(data_dir, split):
    """{layout: (complete, paths, what is missing)} for `split`."""
    stem = FILE_SPLIT[split]
    names = [f"mini-imagenet-cache-{stem}.pkl"]
    if split == "validation":
        names.append("mini-imagenet-cache-validation.pkl")
    pickle_path = next((os.path.join(data_dir, n) for n in names
                        if os.path.isfile(os.path.join(data_dir, n))), None)
    csv_path = os.path.join(data_dir, f"{stem}.csv")
    images = os.path.join(data_dir, "images")
    folder = next((os.path.join(data_dir, n) for n in (stem, split)
                   if os.path.isdir(os.path.join(data_dir, n))), None)
    has_csv, has_images = os.path.isfile(csv_path), os.path.isdir(images)
    csv_missing = [m for m, ok in ((f"{stem}.csv", has_csv), ("images/", has_images)) if not ok]
    return {
        "pickle": (pickle_path is not None, {"pickle": pickle_path}, names[:1]),
        "csv": (has_csv and has_images, {"csv": csv_path, "images": images}, csv_missing),
        "folders": (folder is not None, {"folder": folder}, [f"{stem}/"]),
    }


def _mini_imagenet_missing(data_dir, split, found, forced=None):
    lines = [
        f"No mini-ImageNet {split} split found in `data_dir`={data_dir!r}"
        + (f" in the {forced!r} layout" if forced else "")
        + f". It holds: {_found(data_dir)}.",
        "Each layout needs, for this split:",
    ]
    for layout, (complete, _, missing) in found.items():
        if forced and layout != forced:
            continue
        partial = ""
        if layout == "csv" and len(missing) == 1:
            present = "images/" if missing[0].endswith(".csv") else f"{FILE_SPLIT[split]}.csv"
            partial = f" (found {present} but no {missing[0]})"
        if layout == "pickle" and not complete and any(
            n.startswith("mini-imagenet-cache-") for n in os.listdir(data_dir)
        ):
            partial = (" (found other splits' pickles: "
                       + ", ".join(n for n in sorted(os.listdir(data_dir))
                                   if n.startswith("mini-imagenet-cache-")) + ")")
        lines.append(f"  - {layout}: {MINI_IMAGENET_LAYOUTS[layout]}; missing "
                     f"{', '.join(missing)}{partial}")
    return "\n".join(lines)


def _mini_imagenet_pickle(path, image_size, in_memory, name):
    data = safe_pickle.load(path, lazy_from=LAZY_BYTES)
    if not isinstance(data, dict) or not {"image_data", "class_dict"} <= set(data):
        keys = sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{path!r} is not a mini-ImageNet cache pickle: expected a dict with "
            f"'image_data' (uint8 [N, 84, 84, 3]) and 'class_dict'. Found: {keys}"
        )
    images, class_dict = data["image_data"], data["class_dict"]
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 3 or np.dtype(images.dtype) != np.uint8:
        raise ValueError(
            f"'image_data' of {path!r} must be uint8 [N, height, width, 3]. Found: "
            f"{np.dtype(images.dtype).name} {shape}"
        )
    if not isinstance(class_dict, dict) or not class_dict:
        raise ValueError(f"'class_dict' of {path!r} must be a non-empty dict "
                         "{class: [row, ...]}.")
    classes = sorted(_text(c) for c in class_dict)
    by_name = {_text(c): rows for c, rows in class_dict.items()}
    labels = np.full(shape[0], -1, np.int64)
    for label, class_name in enumerate(classes):
        rows = np.asarray(by_name[class_name], dtype=np.int64).reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
            raise ValueError(
                f"'class_dict' of {path!r} lists rows outside [0, {shape[0]}) for "
                f"class {class_name!r}."
            )
        if np.any(labels[rows] >= 0):
            raise ValueError(f"'class_dict' of {path!r} lists a row under two classes "
                             f"(one of them {class_name!r}).")
        labels[rows] = label
    if np.any(labels < 0):
        raise ValueError(
            f"'class_dict' of {path!r} leaves {int(np.sum(labels < 0))} of the "
            f"{shape[0]} images without a class."
        )
    if isinstance(images, safe_pickle.LazyArray):
        if in_memory or images.order != "C":
            images = images.read()
        else:
            images = RawImages(path, images.offset, shape[0], shape[1:])
    if shape[1:3] != image_size:
        images = _resize_uint8(np.asarray(images), image_size)
    source = Source(images, labels, classes, name=name, scale=1 / 255,
                    metadata={"source": "pickle", "path": path})
    return source


def _text(value):
    return value.decode("latin1") if isinstance(value, bytes) else str(value)


def _resize_uint8(images, image_size, block=1024):
    out = np.empty((len(images),) + tuple(image_size) + images.shape[3:], np.uint8)
    for start in range(0, len(images), block):
        part = tf.image.convert_image_dtype(images[start : start + block], tf.float32)
        part = tf.image.resize(part, image_size, method="lanczos3", antialias=True)
        out[start : start + block] = tf.cast(
            tf.round(tf.clip_by_value(part, 0.0, 1.0) * 255), tf.uint8
        ).numpy()
    return out


def _mini_imagenet_csv(csv_path, images):
    with open(csv_path, newline="", encoding="utf-8-sig") as file:
        rows = list(csv.reader(file))
    header = [c.strip() for c in rows[0]] if rows else []
    if header != ["filename", "label"]:
        raise ValueError(
            f"{csv_path!r} must start with the header 'filename,label' (Ravi & "
            f"Larochelle's split files). Found: {','.join(header) or 'an empty file'!r}"
        )
    by_class, missing, bad = {}, [], []
    for number, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        if len(row) != 2:
            bad.append(number)
            continue
        filename, label = row[0].strip(), row[1].strip()
        path = os.path.join(images, filename)
        if not os.path.isfile(path):
            nested = os.path.join(images, label, filename)
            if os.path.isfile(nested):
                path = nested
            else:
                missing.append(filename)
                continue
        by_class.setdefault(label, []).append(path)
    if bad:
        raise ValueError(
            f"{csv_path!r}: rows {bad[:5]} do not have two fields (filename,label)."
        )
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image file(s) listed in {csv_path!r} are not in "
            f"{images!r} (as images/<filename> or images/<label>/<filename>): "
            f"{', '.join(map(repr, missing[:5]))}{' ...' if len(missing) > 5 else ''}"
        )
    if not by_class:
        raise ValueError(f"{csv_path!r} lists no images.")
    classes = sorted(by_class)
    return [by_class[c] for c in classes], classes


def _image_folders(folder, image_size, name, verbose, cache_dir, extensions=IMAGE_EXTENSIONS):
    walk = walk_image_folders(folder, extensions)
    by_class = {}
    for dirpath, images in walk.folders:
        relative = os.path.relpath(dirpath, folder)
        if relative == os.curdir:
            raise ValueError(
                f"Image files lie directly in {folder!r}; expected one folder of "
                f"images per class (e.g. {folder}/n01532829/*.jpg)."
            )
        by_class.setdefault(relative.split(os.sep)[0], []).extend(images)
    if not by_class:
        raise ValueError(
            f"No image files ({', '.join(extensions)}) in any class folder under "
            f"{folder!r}.{walk.describe_skipped(folder)}"
        )
    classes = sorted(by_class)
    return from_files(
        [by_class[c] for c in classes], classes, image_size=image_size,
        color_mode="rgb", name=name, metadata={"source": "directory", "root": folder},
        verbose=verbose, storage="uint8", cache_dir=cache_dir,
    )


# ----------------------------------------------------------------------
# tiered-ImageNet.

TIERED_IMAGENET_LAYOUTS = {
    "png_pickle": "{split}_images_png.pkl (a list of PNG-encoded images) plus "
                  "{split}_labels.pkl",
    "npz": "{split}_images.npz (key 'images', uint8 [N, 84, 84, 3]) plus "
           "{split}_labels.pkl",
}


def tiered_imagenet(
    split,
    data_dir,
    layout="auto",
    labels="specific",
    channel_order=None,
    cache_dir=None,
    augmentation=None,
):
    """tiered-ImageNet (Ren et al. 2018) from the files in `data_dir`.

    608 ImageNet classes (351 train, 97 validation, 160 test; 779,165
    images of 84x84) grouped into 34 categories (20 / 6 / 8). The images
    stay on disk and are decoded per episode: the source holds only their
    byte offsets and labels. Two layouts (detected; `layout=` forces one),
    both with `{split}_labels.pkl` (a dict with `label_specific`,
    `label_specific_str`, `label_general`, `label_general_str`), `split` in
    `train`, `val`, `test`:

    - `"png_pickle"`: `{split}_images_png.pkl`, a list of PNG-encoded images
      (the files of Ren et al.'s release). The restricted unpickler records
      where each PNG lies in the pickle without reading it.
    - `"npz"`: `{split}_images.npz`, key `images`, uint8 `[N, 84, 84, 3]`
      (what Ren et al.'s code decompresses the PNGs to, with OpenCV, hence
      in BGR channel order: `channel_order="bgr"`, the default for this
      layout, reverses it). An uncompressed `.npz` is read in place; a
      compressed one is extracted once into `cache_dir`.

    Args:
        split: `"train"`, `"validation"` (or `"val"`) or `"test"`.
        data_dir: the folder holding the files.
        layout: `"auto"`, `"png_pickle"` or `"npz"`.
        labels: `"specific"` (the 608 ImageNet classes) or `"general"` (the
            34 categories as classes).
        channel_order: `None` (RGB for PNGs, BGR for the npz layout),
            `"rgb"` or `"bgr"`.
        cache_dir: where a compressed `.npz` is extracted, and where the
            offsets of the PNGs in a `png_pickle` are kept (parsing the
            pickle, 448,695 images for train, takes about 25 s; the next run
            reads them back).
        augmentation: as in `mini_imagenet`.

    Returns:
        A disk-backed `Source` (its `x` is a `DiskImages`).

    Example:

    ```python
    train = km.data.tiered_imagenet("train", "/data/tiered-imagenet")
    ```

    Reference:
        - [Ren et al., 2018](https://arxiv.org/abs/1803.00676)
    """
    split = _check_split(split)
    data_dir = _check_data_dir(data_dir, "tiered-ImageNet")
    check_choice("layout", layout, ("auto",) + tuple(TIERED_IMAGENET_LAYOUTS))
    check_choice("labels", labels, ("specific", "general"))
    if channel_order is not None:
        check_choice("channel_order", channel_order, ("rgb", "bgr"))
    _check_storage("uint8", cache_dir)
    augmentation = _check_augmentation(augmentation)
    stem = FILE_SPLIT[split]
    files = {
        "labels": os.path.join(data_dir, f"{stem}_labels.pkl"),
        "png_pickle": os.path.join(data_dir, f"{stem}_images_png.pkl"),
        "npz": os.path.join(data_dir, f"{stem}_images.npz"),
    }
    present = {k: os.path.isfile(p) for k, p in files.items()}
    candidates = [layout] if layout != "auto" else ["png_pickle", "npz"]
    chosen = next((c for c in candidates if present[c] and present["labels"]), None)
    if chosen is None:
        lines = [f"No tiered-ImageNet {split} split found in `data_dir`={data_dir!r}"
                 + (f" in the {layout!r} layout" if layout != "auto" else "")
                 + f". It holds: {_found(data_dir)}.", "Each layout needs, for this split:"]
        for name in candidates:
            need = [os.path.basename(files[name]), os.path.basename(files["labels"])]
            missing = [n for n, key in zip(need, (name, "labels")) if not present[key]]
            lines.append(f"  - {name}: {TIERED_IMAGENET_LAYOUTS[name].format(split=stem)}; "
                         f"missing {', '.join(missing)}")
        raise FileNotFoundError("\n".join(lines))
    label_data = safe_pickle.load(files["labels"])
    y, class_names = _tiered_labels(label_data, files["labels"], labels)
    name = f"tiered_imagenet/{split}"
    if chosen == "png_pickle":
        images = _png_pickle_images(files["png_pickle"], channel_order or "rgb", cache_dir)
    else:
        images = _npz_images(files["npz"], channel_order or "bgr", cache_dir)
    if len(images) != len(y):
        raise ValueError(
            f"{files[chosen]!r} holds {len(images)} images but {files['labels']!r} "
            f"labels {len(y)}: the two files are not of the same split."
        )
    source = Source(images, y, class_names, name=name, scale=1 / 255, metadata={
        "source": chosen, "dataset": "tiered_imagenet", "split": split,
        "layout": chosen, "labels": labels, "data_dir": data_dir,
        "files": {"images": files[chosen], "labels": files["labels"]},
    })
    if augmentation is not None:
        source = source.with_augmentation(augmentation)
    return source


def _tiered_labels(data, path, which):
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} must hold a dict of labels; found "
                         f"{type(data).__name__}.")
    data = {_text(k): v for k, v in data.items()}
    key = f"label_{which}"
    if key not in data:
        raise ValueError(
            f"{path!r} has no {key!r} (tiered-ImageNet's labels pickle holds "
            f"label_specific, label_specific_str, label_general, label_general_str). "
            f"Found: {sorted(data)}"
        )
    y = np.asarray(data[key]).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"{key!r} of {path!r} must hold non-negative integer labels.")
    names = data.get(f"{key}_str")
    count = int(y.max()) + 1 if len(y) else 0
    if names is not None and len(names) >= count and len({_text(n) for n in names}) == len(names):
        names = [_text(n) for n in names][:count]
    else:
        names = [str(i) for i in range(count)]
    used = np.unique(y)
    return np.searchsorted(used, y), [names[i] for i in used]


def _png_pickle_images(path, channel_order, cache_dir=None):
    index_path = None
    if cache_dir is not None:
        stat = os.stat(path)
        key = hashlib.sha256(f"{os.path.abspath(path)}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
        index_path = os.path.join(cache_dir, f"tiered-png-index-{key.hexdigest()[:20]}.npz")
        if os.path.isfile(index_path):
            try:
                with np.load(index_path) as index:
                    if channel_order == "bgr":
                        raise ValueError("`channel_order='bgr'` applies to the npz layout; "
                                         "PNGs decode to RGB.")
                    return EncodedImages(path, index["offsets"], index["lengths"],
                                         tuple(index["shape"]))
            except (OSError, KeyError, zipfile.BadZipFile):
                pass  # damaged: parse the pickle again
    images = safe_pickle.load(path, lazy_from=1)
    if isinstance(images, np.ndarray) and images.dtype == object:
        images = list(images)
    if not isinstance(images, list) or not images:
        raise ValueError(
            f"{path!r} must hold a list of PNG-encoded images (uint8 arrays); "
            f"found {type(images).__name__}."
        )
    offsets = np.empty(len(images), np.int64)
    lengths = np.empty(len(images), np.int64)
    in_memory = []
    for i, image in enumerate(images):
        if isinstance(image, safe_pickle.LazyArray):
            offsets[i], lengths[i] = image.offset, image.nbytes
        elif isinstance(image, (np.ndarray, bytes)):  # a PNG of < 256 bytes
            in_memory.append(i)
        else:
            raise ValueError(f"Item {i} of {path!r} is a {type(image).__name__}, not "
                             "an encoded image.")
    first = images[0]
    first = first.read() if isinstance(first, safe_pickle.LazyArray) else first
    shape = tuple(decode_image(tf.constant(np.asarray(first).tobytes()), 3).shape)
    if in_memory:
        # Tiny encoded images were stored inline: decode everything into memory.
        decoded = np.empty((len(images),) + shape, np.uint8)
        for i, image in enumerate(images):
            data = image.read() if isinstance(image, safe_pickle.LazyArray) else image
            decoded[i] = decode_image(tf.constant(np.asarray(data).tobytes()), 3).numpy()
        return decoded[..., ::-1].copy() if channel_order == "bgr" else decoded
    if channel_order == "bgr":
        raise ValueError("`channel_order='bgr'` applies to the npz layout; PNGs decode to RGB.")
    if index_path is not None:  # where the PNGs lie: the next run skips parsing
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{index_path}.{os.getpid()}.partial.npz"
        np.savez(partial, offsets=offsets, lengths=lengths, shape=np.array(shape))
        os.replace(partial, index_path)
    return EncodedImages(path, offsets, lengths, shape)


def _npz_images(path, channel_order, cache_dir):
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        if "images.npy" not in names:
            raise ValueError(f"{path!r} has no array 'images' (it holds "
                             f"{[n[:-4] for n in names]}).")
        info = archive.getinfo("images.npy")
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as file:
                file.seek(info.header_offset)
                header = file.read(30)
                name_length, extra_length = np.frombuffer(header[26:30], "<u2")
                start = info.header_offset + 30 + int(name_length) + int(extra_length)
                file.seek(start)
                version = np.lib.format.read_magic(file)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = read_header(file)
                offset = file.tell()
        else:
            if cache_dir is None:
                raise ValueError(
                    f"{path!r} is a compressed .npz: its images cannot be read in "
                    "place. Pass `cache_dir=` a folder with room for them (they are "
                    "extracted once), or save it with np.savez (uncompressed)."
                )
            stat = os.stat(path)
            target = os.path.join(
                cache_dir, f"tiered-{os.path.basename(path)}-{stat.st_size}-"
                f"{stat.st_mtime_ns}.npy"
            )
            if not os.path.isfile(target):
                os.makedirs(cache_dir, exist_ok=True)
                partial = f"{target}.{os.getpid()}.partial"
                with archive.open(info) as source, open(partial, "wb") as out:
                    while True:
                        chunk = source.read(1 << 24)
                        if not chunk:
                            break
                        out.write(chunk)
                os.replace(partial, target)
            offset, shape, dtype = _npy_layout(target)
            fortran, path = False, target
    if fortran or np.dtype(dtype) != np.uint8 or len(shape) != 4:
        raise ValueError(f"'images' of {path!r} must be uint8 [N, height, width, "
                         f"channels] in C order. Found: {np.dtype(dtype).name} {shape}.")
    return RawImages(path, offset, shape[0], shape[1:], channel_order=channel_order)


# ----------------------------------------------------------------------
# CIFAR-FS and FC100, from CIFAR-100.

CIFAR_HINT = (
    "Offline, pass `data_dir=` a folder holding the CIFAR-100 python version "
    "(cifar-100-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html, "
    "or its extracted cifar-100-python/ folder with train, test and meta), or "
    "`tfds_data_dir=` a TFDS data folder where cifar100 is prepared."
)


def cifar_fs(split, data_dir=None, tfds_data_dir=None, download=True, augmentation=None):
    """CIFAR-FS (Bertinetto et al. 2019): CIFAR-100 split 64 / 16 / 20 classes.

    All 600 images of each class (CIFAR-100's train and test sets
    together), 32x32 RGB, with the class lists of the paper
    (`published_split("cifar_fs")`). From a local CIFAR-100 python archive
    (`data_dir`: `cifar-100-python.tar.gz` or the extracted
    `cifar-100-python/` folder, pickles read with the restricted unpickler),
    or from TFDS `cifar100` (downloaded on first use unless `download=False`).

    Args:
        split: `"train"`, `"validation"` (or `"val"`) or `"test"`.
        data_dir: a folder with the CIFAR-100 python version, or `None` for
            TFDS.
        tfds_data_dir: TFDS data folder (default TFDS's own).
        download: let TFDS download cifar100 if needed.
        augmentation: as in `mini_imagenet` (crop padding "auto" is 4 here).

    Returns:
        A compact `Source` (uint8, float32 per episode) named by fine label.

    Example:

    ```python
    train = km.data.cifar_fs("train", data_dir="/data/cifar100")
    ```

    Reference:
        - [Bertinetto et al., 2019](https://arxiv.org/abs/1805.08136)
    """
    split = _check_split(split)
    augmentation = _check_augmentation(augmentation)
    cifar = _cifar100(*_cifar_options(data_dir, tfds_data_dir, download))
    names = published_split("cifar_fs")[split]
    return _split_source(cifar, split, "cifar_fs", names, augmentation)


def fc100(split, data_dir=None, tfds_data_dir=None, download=True, augmentation=None):
    """FC100 (Oreshkin et al. 2018): CIFAR-100 split by superclass.

    12 / 4 / 4 of CIFAR-100's 20 superclasses (`published_split("fc100")`),
    that is 60 / 20 / 20 classes of 600 32x32 images, so that training and
    test classes share no superclass. Sources as in `cifar_fs`; the classes
    are the fine labels, and `metadata["superclasses"]` lists the split's
    superclasses.

    Args:
        split, data_dir, tfds_data_dir, download, augmentation: as in
            `cifar_fs`.

    Returns:
        A compact `Source` of the split's 60, 20 or 20 classes.

    Example:

    ```python
    test = km.data.fc100("test", data_dir="/data/cifar100")
    ```

    Reference:
        - [Oreshkin et al., 2018](https://arxiv.org/abs/1805.10123)
    """
    split = _check_split(split)
    augmentation = _check_augmentation(augmentation)
    cifar = _cifar100(*_cifar_options(data_dir, tfds_data_dir, download))
    superclasses = published_split("fc100")[split]
    coarse = cifar.metadata["coarse_of_class"]
    mixed = sorted(n for n, found in coarse.items() if len(found) > 1)
    if mixed:
        raise ValueError(
            f"The CIFAR-100 data ({cifar.metadata.get('path', 'TFDS cifar100')}) gives "
            f"{len(mixed)} classes several superclasses (e.g. {mixed[0]!r}: "
            f"{sorted(coarse[mixed[0]])}): its coarse labels are damaged, and FC100 "
            "splits by superclass."
        )
    names = [n for n in cifar.base_class_names if next(iter(coarse[n])) in superclasses]
    source = _split_source(cifar, split, "fc100", names, augmentation)
    source.metadata["superclasses"] = superclasses
    return source


def _cifar_options(data_dir, tfds_data_dir, download):
    if data_dir is not None:
        data_dir = _check_data_dir(data_dir, "CIFAR-100")
    return data_dir, tfds_data_dir, check_bool("download", download)


@functools.lru_cache(maxsize=2)
def _cifar100(data_dir, tfds_data_dir, download):
    """All 60,000 CIFAR-100 images as one compact source, once per process."""
    if data_dir is None:
        arrays = _tfds_arrays("cifar100", "train+test", ("image", "label", "coarse_label"),
                              tfds_data_dir, download, CIFAR_HINT)
        x, fine, coarse = arrays["image"], arrays["label"], arrays["coarse_label"]
        # CIFAR-100 numbers its classes and superclasses in alphabetical order
        # (the python version's meta file and TFDS's label files alike).
        fine_names = _label_names(arrays["names"]["label"], sorted(
            n for names in published_split("cifar_fs").values() for n in names))
        coarse_names = _label_names(arrays["names"]["coarse_label"], sorted(
            n for names in published_split("fc100").values() for n in names))
        where = {"source": "tfds", "tfds_name": "cifar100"}
    else:
        x, fine, coarse, fine_names, coarse_names, path = _cifar100_python(data_dir)
        where = {"source": "cifar-100-python", "path": path}
    coarse_of_class = {}
    for f, c in set(zip(fine.tolist(), coarse.tolist())):
        coarse_of_class.setdefault(fine_names[f], set()).add(coarse_names[c])
    source = Source(x, fine, fine_names, name="cifar100", scale=1 / 255,
                    metadata=dict(where, coarse_of_class=coarse_of_class))
    return source


def _label_names(names, default):
    """TFDS's label names, or `default` when it has none (only numbers)."""
    if len(names) == len(default) and not all(str(n).isdigit() for n in names):
        return list(names)
    return list(default)


def _cifar100_reader(data_dir):
    """(where, read): `read(part)` unpickles CIFAR-100's `train`, `test` or `meta`."""
    for folder in (data_dir, os.path.join(data_dir, "cifar-100-python")):
        paths = {n: os.path.join(folder, n) for n in ("train", "test", "meta")}
        if all(os.path.isfile(p) for p in paths.values()):
            return folder, lambda part: safe_pickle.load(paths[part])
    archive = os.path.join(data_dir, "cifar-100-python.tar.gz")
    if not os.path.isfile(archive):
        raise FileNotFoundError(
            f"No CIFAR-100 python version in `data_dir`={data_dir!r}: expected "
            "cifar-100-python.tar.gz, or the folder cifar-100-python/ (or "
            f"`data_dir` itself) holding train, test and meta. It holds: "
            f"{_found(data_dir)}."
        )
    members = {}
    with tarfile.open(archive, "r:*") as tar:  # read in place, not extracted
        for member in tar.getmembers():
            base = member.name.rsplit("/", 1)[-1]
            if member.isfile() and base in ("train", "test", "meta"):
                members[base] = tar.extractfile(member).read()
    missing = sorted({"train", "test", "meta"} - set(members))
    if missing:
        raise ValueError(f"{archive!r} lacks {missing}: it is not the CIFAR-100 "
                         "python version.")
    return archive, lambda part: safe_pickle.load(io.BytesIO(members[part]),
                                                  name=f"{archive}:{part}")


def _cifar100_python(data_dir):
    """CIFAR-100's python version from a folder: the archive or its extraction."""
    where, read = _cifar100_reader(data_dir)
    meta = read("meta")
    try:
        fine_names = [_text(n) for n in meta["fine_label_names"]]
        coarse_names = [_text(n) for n in meta["coarse_label_names"]]
    except (KeyError, TypeError) as error:
        raise ValueError(f"The CIFAR-100 'meta' file in {where!r} lacks "
                         "fine_label_names or coarse_label_names.") from error
    xs, fines, coarses = [], [], []
    for part in ("train", "test"):
        data = read(part)
        try:
            images = np.asarray(data["data"], dtype=np.uint8)
            fines.append(np.asarray(data["fine_labels"], dtype=np.int64))
            coarses.append(np.asarray(data["coarse_labels"], dtype=np.int64))
        except (KeyError, TypeError) as error:
            raise ValueError(f"The CIFAR-100 {part!r} file in {where!r} lacks data, "
                             "fine_labels or coarse_labels.") from error
        if images.ndim != 2 or images.shape[1] != 3 * 32 * 32:
            raise ValueError(f"'data' of the CIFAR-100 {part!r} file in {where!r} "
                             f"must be [N, 3072]. Found {images.shape}.")
        xs.append(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    x = np.ascontiguousarray(np.concatenate(xs))
    return x, np.concatenate(fines), np.concatenate(coarses), fine_names, coarse_names, where


def _tfds_arrays(name, split, keys, data_dir, download, hint):
    """Features `keys` of a TFDS split as numpy arrays (uint8 images kept uint8)."""
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"Loading {name} from TFDS needs tensorflow-datasets: pip install "
            f"keras-meta[datasets]. {hint}"
        ) from error
    try:
        dataset, info = tfds.load(name, split=split, data_dir=data_dir,
                                  download=download, with_info=True)
    except Exception as error:
        network = network_error(error)
        if network is not None:
            raise DatasetDownloadError(
                f"Could not download TFDS {name!r}: {_describe_network_error(network)} "
                f"{hint}"
            ) from error
        if not download and isinstance(error, AssertionError):
            where = f"`tfds_data_dir`={data_dir!r}" if data_dir else "TFDS's data folder"
            raise FileNotFoundError(
                f"TFDS {name!r} is not prepared in {where}, and `download=False` "
                f"forbids downloading it. {hint}"
            ) from error
        raise
    columns = {key: [] for key in keys}
    for batch in dataset.map(lambda e: {k: e[k] for k in keys}).batch(1024).as_numpy_iterator():
        for key in keys:
            columns[key].append(batch[key])
    arrays = {key: np.concatenate(values) for key, values in columns.items()}
    arrays["names"] = {
        key: list(getattr(info.features[key], "names", None) or [])
        for key in keys if key != "image"
    }
    return arrays


# ----------------------------------------------------------------------
# CUB-200-2011.

CUB_HINT = (
    "Offline, pass `data_dir=` the folder of the official CUB_200_2011 release "
    "(CUB_200_2011/images/<class>/*.jpg: the CUB_200_2011 folder, its parent or "
    "its images/ folder), or `tfds_data_dir=` a TFDS data folder where "
    "caltech_birds2011 is prepared."
)


def cub(split, data_dir=None, image_size=84, tfds_data_dir=None, download=True,
        cache_dir=None, augmentation=None, verbose="auto"):
    """CUB-200-2011 birds with the 100 / 50 / 50 class split of Chen et al.

    200 species, 11,788 images, split as in "A Closer Look at Few-shot
    Classification" (Chen et al. 2019; `published_split("cub")`: of the 200
    species in order, the even-indexed ones train, indices 1 mod 4
    validation, 3 mod 4 test). Whole images (no bounding-box crop), resized
    to `image_size` and held as uint8. From the official folder (`data_dir`:
    `CUB_200_2011/images/<class>/*.jpg`) or from TFDS `caltech_birds2011`.

    Args:
        split: `"train"`, `"validation"` (or `"val"`) or `"test"`.
        data_dir: the official folder, or `None` for TFDS.
        image_size: an int or `(height, width)` (84 in Chen et al.'s Conv-4
            experiments).
        tfds_data_dir, download: as in `cifar_fs`.
        cache_dir: keep the decoded images of `data_dir` for the next run.
        augmentation, verbose: as in `mini_imagenet`.

    Returns:
        A compact `Source` named by the official folder names
        (`"001.Black_footed_Albatross"`).

    Example:

    ```python
    train = km.data.cub("train", data_dir="/data/CUB_200_2011")
    ```

    Reference:
        - [Wah et al., 2011](https://www.vision.caltech.edu/datasets/cub_200_2011/)
        - [Hilliard et al., 2018](https://arxiv.org/abs/1802.04376)
        - [Chen et al., 2019](https://arxiv.org/abs/1904.04232)
    """
    split = _check_split(split)
    image_size = _check_image_size(image_size)
    if image_size is None:
        raise ValueError("`image_size` must be an int or (height, width). Received: None")
    _check_storage("uint8", cache_dir)
    verbose = _check_verbose(verbose)
    augmentation = _check_augmentation(augmentation)
    published = published_split("cub")
    names = published[split]
    if data_dir is None:
        download = check_bool("download", download)
        source = _cub_tfds(image_size, tfds_data_dir, download)
        return _split_source(source, split, "cub", names, augmentation)
    data_dir = _check_data_dir(data_dir, "CUB-200-2011")
    images = _cub_images_folder(data_dir)
    missing = [n for n in names if not os.path.isdir(os.path.join(images, n))]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} of the {len(names)} {split} classes of CUB are not in "
            f"{images!r}: {', '.join(map(repr, missing[:5]))}"
            f"{' ...' if len(missing) > 5 else ''}. It holds: {_found(images)}."
        )
    files = []
    for name in names:
        folder = os.path.join(images, name)
        listed = sorted(
            os.path.join(folder, f) for f in os.listdir(folder)
            if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS)
        )
        files.append(listed)
    source = from_files(
        files, list(names), image_size=image_size, color_mode="rgb",
        name=f"cub/{split}", metadata={"source": "directory", "root": images},
        verbose=verbose, storage="uint8", cache_dir=cache_dir,
    )
    source.metadata.update(dataset="cub", split=split)
    return source.with_augmentation(augmentation) if augmentation is not None else source


def _cub_images_folder(data_dir):
    for folder in (os.path.join(data_dir, "CUB_200_2011", "images"),
                   os.path.join(data_dir, "images"), data_dir):
        if os.path.isdir(folder) and any(
            e[:3].isdigit() and e[3:4] == "." for e in os.listdir(folder)
        ):
            return folder
    raise FileNotFoundError(
        f"No CUB-200-2011 images in `data_dir`={data_dir!r}: expected class folders "
        "such as 001.Black_footed_Albatross/ in CUB_200_2011/images/, images/ or "
        f"`data_dir` itself. It holds: {_found(data_dir)}."
    )


@functools.lru_cache(maxsize=2)
def _cub_tfds(image_size, tfds_data_dir, download):
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError("Loading CUB from TFDS needs tensorflow-datasets: pip "
                          f"install keras-meta[datasets]. {CUB_HINT}") from error
    try:
        dataset = tfds.load("caltech_birds2011", split="train+test",
                            data_dir=tfds_data_dir, download=download)
    except Exception as error:
        network = network_error(error)
        if network is not None:
            raise DatasetDownloadError(
                "Could not download TFDS 'caltech_birds2011': "
                f"{_describe_network_error(network)} {CUB_HINT}"
            ) from error
        raise

    def convert(example):
        image = tf.image.convert_image_dtype(example["image"], tf.float32)
        image = tf.image.resize(image, image_size, method="lanczos3", antialias=True)
        image = tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255), tf.uint8)
        return image, example["label"]

    xs, ys = [], []
    for x, y in dataset.map(convert, num_parallel_calls=tf.data.AUTOTUNE).batch(512).as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    # TFDS labels species by their number minus one, in the official order.
    everything = sorted(n for names in published_split("cub").values() for n in names)
    y = np.concatenate(ys)
    used = np.unique(y)
    return Source(np.concatenate(xs), np.searchsorted(used, y),
                  [everything[i] for i in used], name="cub", scale=1 / 255,
                  metadata={"source": "tfds", "tfds_name": "caltech_birds2011"})
