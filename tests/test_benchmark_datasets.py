"""Benchmark loaders (mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100, CUB) on
small generated fixtures in the real layouts (file names, CSV headers, pickle
keys, Python 2 pickles), the restricted unpickler, compact sources, the
decoded-image cache and episode augmentation. No network.

The memory figures of the issue (full-size mini-ImageNet pickle, a
tiered-sized disk-backed source) are `large` tests at the end.
"""

import io
import json
import os
import pickle
import struct
import subprocess
import sys
import tarfile
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import keras_meta as km
from keras_meta.data import benchmarks, safe_pickle
from keras_meta.data.sources import RawImages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CIFAR100 = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}


# ----------------------------------------------------------------------
# Writers of the real layouts.


def py2_dumps(obj, file=None):
    """A pickle as Python 2's cPickle (protocol 2) writes it: str as BINSTRING,
    numpy arrays through numpy.core.multiarray._reconstruct. Written to `file`
    if given, else returned."""
    out = file if file is not None else io.BytesIO()
    w = out.write

    def string(value):
        data = value.encode("latin1") if isinstance(value, str) else bytes(value)
        if len(data) < 256:
            w(b"U" + bytes([len(data)]) + data)
        else:
            w(b"T" + struct.pack("<i", len(data)) + data)

    def integer(value):
        w(b"J" + struct.pack("<i", int(value)))

    def dump(o):
        if isinstance(o, dict):
            w(b"}")
            if o:
                w(b"(")
                for key, value in o.items():
                    dump(key)
                    dump(value)
                w(b"u")
        elif isinstance(o, list):
            w(b"]")
            if o:
                w(b"(")
                for item in o:
                    dump(item)
                w(b"e")
        elif isinstance(o, (int, np.integer)) and not isinstance(o, bool):
            integer(o)
        elif isinstance(o, (str, bytes)):
            string(o)
        elif isinstance(o, np.ndarray):
            w(b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n")
            w(b"K\x00\x85")
            string("b")
            w(b"\x87R(K\x01(")
            for size in o.shape:
                integer(size)
            w(b"tcnumpy\ndtype\n")
            string(o.dtype.str[1:])
            w(b"K\x00K\x01\x87R(K\x03")
            string(o.dtype.str[0] if o.dtype.str[0] != "=" else "<")
            w(b"NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89")
            string(np.ascontiguousarray(o).tobytes())
            w(b"tb")
        else:
            raise TypeError(type(o))

    w(b"\x80\x02")
    dump(obj)
    w(b".")
    return None if file is not None else out.getvalue()


def noise_images(count, size, seed=0, channels=3):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def png_bytes(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


MINI_CLASSES = {
    split: km.data.published_split("mini_imagenet")[split][:count]
    for split, count in (("train", 5), ("validation", 3), ("test", 4))
}


def write_mini_imagenet(root, layout, per_class=6, size=12, splits=("train", "validation", "test"),
                        seed=0, protocol=4):
    """A scaled-down mini-ImageNet: the split's first published classes."""
    os.makedirs(root, exist_ok=True)
    arrays = {}
    for split in splits:
        classes = MINI_CLASSES[split]
        images = noise_images(per_class * len(classes), size, seed=seed + len(arrays))
        arrays[split] = (classes, images)
        stem = benchmarks.FILE_SPLIT[split]
        if layout == "pickle":
            class_dict = {c: list(range(i * per_class, (i + 1) * per_class))
                          for i, c in enumerate(classes)}
            with open(os.path.join(root, f"mini-imagenet-cache-{stem}.pkl"), "wb") as f:
                pickle.dump({"image_data": images, "class_dict": class_dict}, f,
                            protocol=protocol)
        elif layout == "csv":
            os.makedirs(os.path.join(root, "images"), exist_ok=True)
            lines = ["filename,label"]
            for i, image in enumerate(images):
                wnid = classes[i // per_class]
                filename = f"{wnid}{i % per_class + 1:08d}.jpg"
                Image.fromarray(image).save(os.path.join(root, "images", filename), quality=100,
                                            subsampling=0)
                lines.append(f"{filename},{wnid}")
            with open(os.path.join(root, f"{stem}.csv"), "w") as f:
                f.write("\n".join(lines) + "\n")
        elif layout == "folders":
            for i, image in enumerate(images):
                folder = os.path.join(root, stem, classes[i // per_class])
                os.makedirs(folder, exist_ok=True)
                Image.fromarray(image).save(os.path.join(folder, f"{i:04d}.png"))
    return arrays


def tiered_labels(per_class, classes):
    specific = np.repeat(np.arange(classes), per_class).astype(np.int64)
    return {
        "label_specific": specific,
        "label_general": (specific // 2).astype(np.int64),
        "label_specific_str": [f"class{i:03d}" for i in range(classes)],
        "label_general_str": [f"category{i}" for i in range((classes + 1) // 2)],
    }


def write_tiered(root, layout, split="train", classes=4, per_class=5, size=16, python2=True,
                 compressed=False, seed=0):
    os.makedirs(root, exist_ok=True)
    stem = benchmarks.FILE_SPLIT[split]
    images = noise_images(classes * per_class, size, seed=seed)
    labels = tiered_labels(per_class, classes)
    with open(os.path.join(root, f"{stem}_labels.pkl"), "wb") as f:
        f.write(py2_dumps(labels) if python2 else pickle.dumps(labels, protocol=4))
    if layout == "png_pickle":
        encoded = [np.frombuffer(png_bytes(im), np.uint8).reshape(-1, 1) for im in images]
        with open(os.path.join(root, f"{stem}_images_png.pkl"), "wb") as f:
            f.write(py2_dumps(encoded) if python2 else pickle.dumps(encoded, protocol=4))
    else:
        saver = np.savez_compressed if compressed else np.savez
        saver(os.path.join(root, f"{stem}_images.npz"), images=images[..., ::-1])  # BGR
    return images, labels


def write_cifar100(root, per_class=4, archive=False, python2=True):
    """CIFAR-100's python version: cifar-100-python/{train,test,meta}."""
    fine_names = sorted(f for fines in CIFAR100.values() for f in fines)
    coarse_names = sorted(CIFAR100)
    coarse_of = {f: coarse_names.index(c) for c, fines in CIFAR100.items() for f in fines}
    rng = np.random.default_rng(0)
    files = {}
    for part, count in (("train", per_class - 1), ("test", 1)):
        fine = np.repeat(np.arange(100), count)
        data = rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        data[:, 0] = fine  # the class in the first red pixel
        files[part] = {
            "filenames": [f"img_{part}_{i}.png" for i in range(len(fine))],
            "batch_label": f"{part} batch",
            "fine_labels": fine.tolist(),
            "coarse_labels": [coarse_of[fine_names[f]] for f in fine],
            "data": data,
        }
    files["meta"] = {"fine_label_names": fine_names, "coarse_label_names": coarse_names}
    dumps = py2_dumps if python2 else (lambda o: pickle.dumps(o, protocol=2))
    folder = os.path.join(root, "cifar-100-python")
    if archive:
        os.makedirs(root, exist_ok=True)
        with tarfile.open(os.path.join(root, "cifar-100-python.tar.gz"), "w:gz") as tar:
            for name, content in files.items():
                data = dumps(content)
                info = tarfile.TarInfo(f"cifar-100-python/{name}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        os.makedirs(folder, exist_ok=True)
        for name, content in files.items():
            with open(os.path.join(folder, name), "wb") as f:
                f.write(dumps(content))
    return fine_names


def cub_classes():
    return sorted(n for names in km.data.published_split("cub").values() for n in names)


def write_cub(root, per_class=2, size=10):
    images = os.path.join(root, "CUB_200_2011", "images")
    for i, name in enumerate(cub_classes()):
        os.makedirs(os.path.join(images, name))
        for j, image in enumerate(noise_images(per_class, size, seed=i)):
            Image.fromarray(image).save(os.path.join(images, name, f"{name[4:]}_{j}.jpg"))
    return images


class PlainObject:
    def __init__(self):
        self.x = 1


class Evil:
    """Pickles to `os.system("touch <marker>")`."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------
# Published class splits.


def test_published_split_counts_and_disjointness():
    counts = {name: {k: len(v) for k, v in km.data.published_split(name).items()}
              for name in ("mini_imagenet", "cifar_fs", "fc100", "cub")}
    assert counts == {
        "mini_imagenet": {"train": 64, "validation": 16, "test": 20},
        "cifar_fs": {"train": 64, "validation": 16, "test": 20},
        "fc100": {"train": 12, "validation": 4, "test": 4},
        "cub": {"train": 100, "validation": 50, "test": 50},
    }
    for name in counts:
        parts = [set(v) for v in km.data.published_split(name).values()]
        assert sum(map(len, parts)) == len(set.union(*parts))  # disjoint, no repeats
    # FC100's superclasses hold 60 / 20 / 20 CIFAR-100 classes.
    fc = {k: sum(len(CIFAR100[s]) for s in v) for k, v in km.data.published_split("fc100").items()}
    assert fc == {"train": 60, "validation": 20, "test": 20}
    all_fine = {f for fines in CIFAR100.values() for f in fines}
    assert set().union(*km.data.published_split("cifar_fs").values()) == all_fine
    assert set().union(*km.data.published_split("fc100").values()) == set(CIFAR100)
    # CUB: Chen et al.'s rule over the 200 sorted folder names.
    names = cub_classes()
    assert len(names) == 200 and names[0] == "001.Black_footed_Albatross"
    split = km.data.published_split("cub")
    assert list(split["train"]) == names[0::2]
    assert list(split["validation"]) == names[1::4] and list(split["test"]) == names[3::4]
    assert all(n.startswith("n") and len(n) == 9 for v in
               km.data.published_split("mini_imagenet").values() for n in v)


def test_split_files_cite_their_source():
    folder = os.path.join(REPO, "keras_meta", "data", "splits")
    for name in ("mini_imagenet", "cifar_fs", "fc100", "cub"):
        with open(os.path.join(folder, f"{name}.txt")) as f:
            header = [line for line in f if line.startswith("#")]
        assert any(line.startswith("# Source: ") and "/" in line for line in header), name
    with open(os.path.join(REPO, "setup.cfg")) as f:
        assert "splits/*.txt" in f.read()


def test_published_split_rejects_unknown_dataset():
    with pytest.raises(ValueError, match=r"`dataset` must be one of \['mini_imagenet', "
                                         r"'cifar_fs', 'fc100', 'cub'\]\. Received: "
                                         r"dataset='omniglot'"):
        km.data.published_split("omniglot")


# ----------------------------------------------------------------------
# The restricted unpickler.


@pytest.mark.parametrize("protocol", [0, 1, 2, 3, 4, 5])
@pytest.mark.parametrize("lazy_from", [None, 64])
def test_safe_pickle_rebuilds_plain_data(tmp_path, protocol, lazy_from):
    big = np.arange(3 * 70_000, dtype=np.uint8).reshape(3, 70_000)  # outside pickle frames
    obj = {
        "image_data": noise_images(5, 6),
        "big": big,
        "class_dict": {"n01": [0, 1, 2], "n02": (3, 4)},
        "scalars": [np.int64(7), np.float32(2.5), 1.5, -3, True, None],
        "text": ("x", b"\x00\xff", "é"),
        "objects": np.array([np.arange(3, dtype=np.uint8), np.arange(400, dtype=np.uint8)],
                            dtype=object),
        "fortran": np.asfortranarray(np.arange(12, dtype=np.int64).reshape(3, 4)),
    }
    path = tmp_path / "data.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    out = safe_pickle.load(path, lazy_from=lazy_from)
    # Protocols 3 to 5 store bytes as one run: protocol 5 as a bytearray of any size,
    # 3 and 4 as bytes, "short" (read) under 256 bytes.
    shortest = {3: 256, 4: 256, 5: 64}.get(protocol)
    for key in ("image_data", "big", "fortran"):
        value = out[key]
        lazy = lazy_from is not None and shortest is not None and obj[key].nbytes >= shortest
        assert isinstance(value, safe_pickle.LazyArray) == lazy
        if isinstance(value, safe_pickle.LazyArray):
            np.testing.assert_array_equal(value.memmap(), obj[key])
            value = value.read()
        np.testing.assert_array_equal(value, obj[key])
        assert value.dtype == obj[key].dtype
    assert out["class_dict"] == {"n01": [0, 1, 2], "n02": (3, 4)}
    assert out["scalars"] == [7, 2.5, 1.5, -3, True, None]
    assert type(out["scalars"][0]) is np.int64 and out["text"] == ("x", b"\x00\xff", "é")
    for got, want in zip(out["objects"], obj["objects"]):
        got = got.read() if isinstance(got, safe_pickle.LazyArray) else got
        np.testing.assert_array_equal(got, want)


def test_safe_pickle_reads_python2_pickles(tmp_path):
    obj = {"data": noise_images(2, 8).reshape(2, -1), "fine_labels": [3, 1],
           "filenames": ["a.png", "b.png"], "batch_label": "training batch 1 of 1"}
    raw = py2_dumps(obj)
    reference = pickle.loads(raw, encoding="latin1")  # the writer is a real Python 2 pickle
    np.testing.assert_array_equal(reference["data"], obj["data"])
    path = tmp_path / "train"
    path.write_bytes(raw)
    for lazy_from in (None, 8):
        out = safe_pickle.load(path, lazy_from=lazy_from)
        data = out["data"]
        assert isinstance(data, safe_pickle.LazyArray) == (lazy_from is not None)
        data = data.read() if lazy_from else data
        np.testing.assert_array_equal(data, obj["data"])
        assert out["fine_labels"] == [3, 1] and out["filenames"] == ["a.png", "b.png"]
        assert out["batch_label"] == "training batch 1 of 1"


def evil_pickles(marker):
    """Pickles that run `touch marker` when loaded with pickle.load."""
    command = f"touch {marker}".encode()
    reduce = pickle.dumps({"image_data": Evil(marker)}, protocol=2)
    inst = b"(S'" + command + b"'\nios\nsystem\n."  # protocol 0 INST
    eval_builtin = b"\x80\x02cbuiltins\neval\nX\x05\x00\x00\x00'ok'\x85R."
    return {"reduce": reduce, "inst": inst, "eval": eval_builtin}


@pytest.mark.parametrize("kind", ["reduce", "inst", "eval"])
def test_safe_pickle_refuses_code(tmp_path, kind):
    marker = tmp_path / "ran"
    raw = evil_pickles(marker)[kind]
    path = tmp_path / "mini-imagenet-cache-train.pkl"
    path.write_bytes(raw)
    if kind == "reduce":  # the same pickle does run code under pickle.load
        subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(path)!r}, 'rb'))"],
                       check=False, capture_output=True)
        assert marker.exists()
        marker.unlink()
    what = {"reduce": r"`posix\.system`", "inst": r"`os\.system`", "eval": r"`builtins\.eval`"}[kind]
    with pytest.raises(safe_pickle.UnsafePickleError,
                       match=rf"Refusing to unpickle '.*mini-imagenet-cache-train\.pkl': it asks "
                             rf"for the Python object {what}, and loading it could run code\. "
                             r"keras_meta's restricted unpickler rebuilds only numpy arrays, "
                             r"dicts, lists, tuples, strings, bytes and numbers"):
        safe_pickle.load(path)
    assert not marker.exists()
    # The loaders refuse it the same way, naming the file.
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"mini-imagenet-cache-train\.pkl"):
        km.data.mini_imagenet("train", tmp_path)
    assert not marker.exists()


def test_safe_pickle_refuses_other_constructs(tmp_path):
    path = tmp_path / "objects.pkl"
    path.write_bytes(pickle.dumps([PlainObject()], protocol=2))
    with pytest.raises(safe_pickle.UnsafePickleError,
                       match=r"it asks for the Python object "
                             r"`tests\.test_benchmark_datasets\.PlainObject`"):
        safe_pickle.load(path)
    persistent = tmp_path / "persistent.pkl"
    persistent.write_bytes(b"\x80\x02X\x03\x00\x00\x00keyQ.")  # BINPERSID
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"it holds a persistent id \('key'\)"):
        safe_pickle.load(persistent)
    build = tmp_path / "build.pkl"  # BUILD on a list would set attributes
    build.write_bytes(b"\x80\x02]}X\x01\x00\x00\x00aK\x01sb.")
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"it sets the state of a list"):
        safe_pickle.load(build)
    codecs = tmp_path / "codecs.pkl"
    codecs.write_bytes(b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"`_codecs\.encode` with str and "
                                                            r"encoding 'rot13'"):
        safe_pickle.load(codecs)


@pytest.mark.parametrize("content, message", [
    (b"", r"'.*bad\.pkl' is empty \(0 bytes\): it is not a pickle\."),
    (b"<!DOCTYPE html><html><head><title>Google Drive - Quota exceeded",
     r"is an HTML page, not a pickle .*a download that failed \(e\.g\. a Google Drive quota"),
    (b"\x1f\x8b\x08\x00", r"is a gzip archive, not a pickle .* Extract or convert it first\."),
    (pickle.dumps({"a": list(range(100))}, protocol=4)[:40],
     r"Could not unpickle '.*bad\.pkl': .*The file is damaged or truncated"),
])
def test_safe_pickle_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.pkl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        safe_pickle.load(path)


def test_safe_pickle_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match=r"`lazy_from` must be None or a positive number of "
                                         r"bytes\. Received: lazy_from=0"):
        safe_pickle.load(tmp_path / "x.pkl", lazy_from=0)
    with pytest.raises(ValueError, match=r"`lazy_from` needs a file path"):
        safe_pickle.load(io.BytesIO(b"\x80\x02N."), lazy_from=10)
    assert safe_pickle.load(io.BytesIO(pickle.dumps([1, "a"]))) == [1, "a"]


# ----------------------------------------------------------------------
# mini-ImageNet.


@pytest.mark.parametrize("layout", ["pickle", "csv", "folders"])
def test_mini_imagenet_layouts(tmp_path, layout):
    arrays = write_mini_imagenet(tmp_path, layout)
    sources = {s: km.data.mini_imagenet(s, tmp_path, image_size=12) for s in benchmarks.SPLITS}
    for split, source in sources.items():
        classes, images = arrays[split]
        assert source.class_names == tuple(sorted(classes))
        assert source.metadata["layout"] == layout and source.metadata["published_split"]
        assert source.name == f"mini_imagenet/{split}" and source.scale == 1 / 255
        np.testing.assert_array_equal(source.examples_per_class, [6] * len(classes))
        stored = np.asarray(source.x)
        assert stored.dtype == np.uint8 and stored.shape == (len(images), 12, 12, 3)
        for c, name in enumerate(source.class_names):
            want = images[classes.index(name) * 6 : classes.index(name) * 6 + 6]
            got = stored[source.y == c]
            if layout == "csv":  # JPEG: close, not exact
                assert np.abs(got.astype(int) - want.astype(int)).mean() < 20
            else:
                np.testing.assert_array_equal(got, want)
    # Disjoint splits.
    names = [set(s.class_names) for s in sources.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert km.data.mini_imagenet("val", tmp_path, image_size=12).class_names == \
        sources["validation"].class_names
    batch = next(iter(km.data.episodes(sources["train"], 5, 1, 2, 3, seed=0)))
    assert batch["support_x"].dtype == tf.float32 and batch["support_x"].shape == (3, 5, 12, 12, 3)
    assert 0 <= float(tf.reduce_min(batch["query_x"])) and float(tf.reduce_max(batch["query_x"])) <= 1


def test_mini_imagenet_pickle_stays_on_disk(tmp_path, monkeypatch):
    arrays = write_mini_imagenet(tmp_path, "pickle", splits=("train",))
    monkeypatch.setattr(benchmarks, "LAZY_BYTES", 64)  # the fixture is small
    source = km.data.mini_imagenet("train", tmp_path, image_size=12)
    assert isinstance(source.x, km.data.DiskImages) and source.storage == "uint8 on disk"
    assert source.x.path == str(tmp_path / "mini-imagenet-cache-train.pkl")
    in_memory = km.data.mini_imagenet("train", tmp_path, image_size=12, in_memory=True)
    assert isinstance(in_memory.x, np.ndarray)
    np.testing.assert_array_equal(np.asarray(source.x), arrays["train"][1])
    a = next(iter(km.data.episodes(source, 4, 2, 2, 2, seed=5)))
    b = next(iter(km.data.episodes(in_memory, 4, 2, 2, 2, seed=5)))
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    resized = km.data.mini_imagenet("train", tmp_path, image_size=6)
    assert resized.example_shape == (6, 6, 3) and resized.x.dtype == np.uint8


def test_mini_imagenet_python2_and_learn2learn_pickles(tmp_path):
    images = noise_images(12, 8)
    data = {"image_data": images, "class_dict": {"n01532829": list(range(6)),
                                                 "n01558993": list(range(6, 12))}}
    (tmp_path / "mini-imagenet-cache-validation.pkl").write_bytes(py2_dumps(data))
    source = km.data.mini_imagenet("validation", tmp_path, image_size=8)
    assert source.class_names == ("n01532829", "n01558993")
    np.testing.assert_array_equal(np.asarray(source.x), images)
    assert not source.metadata["published_split"]  # those are training classes


def test_mini_imagenet_detection_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"mini-ImageNet folder not found: "
                                                r"`data_dir`='.*nowhere' does not exist\."):
        km.data.mini_imagenet("train", tmp_path / "nowhere")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match=(
        r"No mini-ImageNet train split found in `data_dir`='.*'\. It holds: notes\.txt\.\n"
        r"Each layout needs, for this split:\n"
        r"  - pickle: mini-imagenet-cache-\{train,val,test\}\.pkl .*; missing "
        r"mini-imagenet-cache-train\.pkl\n"
        r"  - csv: images/ .*header 'filename,label'.*; missing train\.csv, images/\n"
        r"  - folders: train/, val/, test/ .*; missing train/")):
        km.data.mini_imagenet("train", tmp_path)
    # Partial layouts: a csv without images/, the train pickle only.
    (tmp_path / "test.csv").write_text("filename,label\n")
    write_mini_imagenet(tmp_path, "pickle", splits=("train",))
    with pytest.raises(FileNotFoundError, match=(
        r"No mini-ImageNet test split .*It holds: mini-imagenet-cache-train\.pkl, notes\.txt, "
        r"test\.csv\.\n[\s\S]*missing mini-imagenet-cache-test\.pkl \(found other splits' "
        r"pickles: mini-imagenet-cache-train\.pkl\)\n.*missing images/ \(found test\.csv but "
        r"no images/\)\n.*missing test/$")):
        km.data.mini_imagenet("test", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"No mini-ImageNet train split found in "
                                                r"`data_dir`='.*' in the 'csv' layout"):
        km.data.mini_imagenet("train", tmp_path, layout="csv")


def test_mini_imagenet_csv_errors(tmp_path):
    write_mini_imagenet(tmp_path, "csv", splits=("train",))
    (tmp_path / "val.csv").write_text("image,class\nx.jpg,n01\n")
    with pytest.raises(ValueError, match=r"val\.csv' must start with the header 'filename,label' "
                                         r"\(Ravi & Larochelle's split files\)\. Found: "
                                         r"'image,class'"):
        km.data.mini_imagenet("validation", tmp_path)
    (tmp_path / "test.csv").write_text("filename,label\nn0000000100000001.jpg,n00000001\n"
                                       "n0000000100000002.jpg,n00000001\n")
    with pytest.raises(FileNotFoundError, match=r"2 image file\(s\) listed in '.*test\.csv' are "
                                                r"not in '.*images' \(as images/<filename> or "
                                                r"images/<label>/<filename>\): "
                                                r"'n0000000100000001\.jpg', "):
        km.data.mini_imagenet("test", tmp_path)


def test_mini_imagenet_argument_errors(tmp_path):
    write_mini_imagenet(tmp_path, "pickle", splits=("train",))
    for kwargs, message in [
        ({"split": "training"}, r"`split` must be one of \['train', 'validation', 'test', "
                                r"'val'\]\. Received: split='training'"),
        ({"layout": "lmdb"}, r"`layout` must be one of \['auto', 'pickle', 'csv', 'folders'\]\. "
                             r"Received: layout='lmdb'"),
        ({"image_size": 0}, r"`image_size` must be \(height, width\) with positive ints"),
        ({"in_memory": "yes"}, r"`in_memory` must be True or False\. Received: in_memory='yes'"),
        ({"augmentation": "flip"}, r"`augmentation` must be None, a keras_meta\.data\.Augmentation "
                                   r"or a Keras preprocessing layer\. Received: augmentation='flip'"),
        ({"cache_dir": 3}, r"`cache_dir` must be None or a folder path\. Received: cache_dir=3"),
    ]:
        arguments = {"split": "train", "data_dir": tmp_path, **kwargs}
        with pytest.raises(ValueError, match=message):
            km.data.mini_imagenet(**arguments)
    with pytest.raises(ValueError, match=r"`data_dir` must be the folder holding mini-ImageNet's "
                                         r"files\. Received: data_dir=None"):
        km.data.mini_imagenet("train", None)
    (tmp_path / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps({"images": 1}))
    with pytest.raises(ValueError, match=r"is not a mini-ImageNet cache pickle: expected a dict "
                                         r"with 'image_data' .* Found: \['images'\]"):
        km.data.mini_imagenet("test", tmp_path)


def test_mini_imagenet_cache_skips_decoding(tmp_path, monkeypatch):
    write_mini_imagenet(tmp_path / "data", "folders", splits=("train",))
    cache = tmp_path / "cache"
    first = km.data.mini_imagenet("train", tmp_path / "data", image_size=12, cache_dir=cache)
    assert first.metadata["cache_hit"] is False and isinstance(first.x, np.ndarray)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(tf.io, "read_file", no_decoding)
    second = km.data.mini_imagenet("train", tmp_path / "data", image_size=12, cache_dir=cache)
    assert second.metadata["cache_hit"] is True and isinstance(second.x, RawImages)
    np.testing.assert_array_equal(np.asarray(second.x), first.x)
    np.testing.assert_array_equal(second.y, first.y)
    monkeypatch.undo()
    # A changed file, or other options, decode again.
    png = sorted((tmp_path / "data" / "train").rglob("*.png"))[0]
    os.utime(png, ns=(1, 1))
    third = km.data.mini_imagenet("train", tmp_path / "data", image_size=12, cache_dir=cache)
    assert third.metadata["cache_hit"] is False
    assert len(list(cache.glob("*.npy"))) == 2 and len(list(cache.glob("*.json"))) == 2


# ----------------------------------------------------------------------
# tiered-ImageNet.


@pytest.mark.parametrize("python2", [True, False])
def test_tiered_imagenet_png_pickle_decodes_per_episode(tmp_path, python2):
    images, labels = write_tiered(tmp_path, "png_pickle", python2=python2)
    source = km.data.tiered_imagenet("train", tmp_path)
    assert isinstance(source.x, km.data.EncodedImages) and source.metadata["layout"] == "png_pickle"
    assert source.class_names == tuple(f"class{i:03d}" for i in range(4))
    np.testing.assert_array_equal(source.y, labels["label_specific"])
    np.testing.assert_array_equal(np.asarray(source.x), images)
    np.testing.assert_array_equal(source.x[[7, 2]], images[[7, 2]])
    batch = next(iter(km.data.episodes(source, 3, 2, 2, 2, seed=0, return_classes=True)))
    # Every image decoded in the pipeline is its class's.
    for task in range(2):
        for x, label in zip(batch["support_x"][task].numpy(), batch["support_y"][task].numpy()):
            cls = batch["classes"][task][label].numpy()
            pool = images[labels["label_specific"] == cls].astype(np.float32) / 255
            assert np.min(np.abs(pool - x).max(axis=(1, 2, 3))) < 1e-6
    cached = km.data.tiered_imagenet("train", tmp_path, cache_dir=tmp_path / "cache")
    assert len(list((tmp_path / "cache").glob("tiered-png-index-*.npz"))) == 1
    again = km.data.tiered_imagenet("train", tmp_path, cache_dir=tmp_path / "cache")
    for other in (cached, again):
        np.testing.assert_array_equal(other.x.offsets, source.x.offsets)
        np.testing.assert_array_equal(other.x[[3, 0]], images[[3, 0]])
    general = km.data.tiered_imagenet("train", tmp_path, labels="general")
    assert general.class_names == ("category0", "category1")
    np.testing.assert_array_equal(general.examples_per_class, [10, 10])


@pytest.mark.parametrize("compressed", [False, True])
def test_tiered_imagenet_npz(tmp_path, compressed):
    images, labels = write_tiered(tmp_path / "data", "npz", split="test", compressed=compressed)
    kwargs = {"cache_dir": tmp_path / "cache"} if compressed else {}
    source = km.data.tiered_imagenet("test", tmp_path / "data", **kwargs)
    assert isinstance(source.x, RawImages) and source.x.channel_order == "bgr"
    np.testing.assert_array_equal(np.asarray(source.x), images)  # back to RGB
    bgr = km.data.tiered_imagenet("test", tmp_path / "data", channel_order="rgb", **kwargs)
    np.testing.assert_array_equal(np.asarray(bgr.x), images[..., ::-1])
    if compressed:
        with pytest.raises(ValueError, match=r"is a compressed \.npz: its images cannot be read "
                                             r"in place\. Pass `cache_dir=`"):
            km.data.tiered_imagenet("test", tmp_path / "data")
    else:
        assert source.x.path == str(tmp_path / "data" / "test_images.npz")  # read in place


def test_tiered_imagenet_errors(tmp_path):
    write_tiered(tmp_path, "npz", split="train")
    os.remove(tmp_path / "train_labels.pkl")
    with pytest.raises(FileNotFoundError, match=(
        r"No tiered-ImageNet train split found in `data_dir`='.*'\. It holds: "
        r"train_images\.npz\.\nEach layout needs, for this split:\n"
        r"  - png_pickle: train_images_png\.pkl \(a list of PNG-encoded images\) plus "
        r"train_labels\.pkl; missing train_images_png\.pkl, train_labels\.pkl\n"
        r"  - npz: train_images\.npz .*; missing train_labels\.pkl")):
        km.data.tiered_imagenet("train", tmp_path)
    (tmp_path / "train_labels.pkl").write_bytes(pickle.dumps({"labels": [0]}))
    with pytest.raises(ValueError, match=r"has no 'label_specific' \(tiered-ImageNet's labels "
                                         r"pickle holds label_specific"):
        km.data.tiered_imagenet("train", tmp_path)
    (tmp_path / "train_labels.pkl").write_bytes(pickle.dumps(tiered_labels(2, 2)))
    with pytest.raises(ValueError, match=r"holds 20 images but '.*train_labels\.pkl' labels 4: "
                                         r"the two files are not of the same split\."):
        km.data.tiered_imagenet("train", tmp_path)
    with pytest.raises(ValueError, match=r"`labels` must be one of \['specific', 'general'\]"):
        km.data.tiered_imagenet("train", tmp_path, labels="coarse")


# ----------------------------------------------------------------------
# CIFAR-FS, FC100.


@pytest.fixture(scope="module")
def cifar_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_cifar100(root)
    return root


def test_cifar_fs_and_fc100_from_the_python_archive(cifar_folder):
    fine_names = sorted(f for fines in CIFAR100.values() for f in fines)
    sizes = {}
    for split in benchmarks.SPLITS:
        source = km.data.cifar_fs(split, data_dir=cifar_folder)
        assert source.class_names == km.data.published_split("cifar_fs")[split]
        assert source.example_shape == (32, 32, 3) and source.x.dtype == np.uint8
        np.testing.assert_array_equal(source.examples_per_class, 4)  # train + test images
        for c, name in enumerate(source.class_names):  # the class in the first red pixel
            assert set(source.x[source.y == c][:, 0, 0, 0]) == {fine_names.index(name)}
        fc = km.data.fc100(split, data_dir=cifar_folder)
        supers = km.data.published_split("fc100")[split]
        assert set(fc.class_names) == {f for s in supers for f in CIFAR100[s]}
        assert fc.metadata["superclasses"] == supers
        sizes[split] = (source.num_classes, fc.num_classes)
    assert sizes == {"train": (64, 60), "validation": (16, 20), "test": (20, 20)}
    test = km.data.fc100("test", data_dir=cifar_folder)
    assert not set(test.class_names) & set(km.data.fc100("train", data_dir=cifar_folder).class_names)


@pytest.mark.parametrize("python2", [True, False])
def test_cifar_from_the_tar_gz(tmp_path, python2):
    write_cifar100(tmp_path, archive=True, per_class=2, python2=python2)
    source = km.data.cifar_fs("test", data_dir=tmp_path)
    assert source.num_classes == 20 and source.metadata["source"] == "cifar-100-python"
    assert source.metadata["path"].endswith("cifar-100-python.tar.gz")


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"No CIFAR-100 python version in `data_dir`='.*': "
                                                r"expected cifar-100-python\.tar\.gz, or the "
                                                r"folder cifar-100-python/ .* It holds: nothing"):
        km.data.cifar_fs("train", data_dir=tmp_path)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for name in ("train", "test", "meta"):
        (folder / name).write_bytes(pickle.dumps({"image_data": Evil(tmp_path / "ran")}))
    with pytest.raises(safe_pickle.UnsafePickleError, match=r"cifar-100-python/meta'"):
        km.data.fc100("train", data_dir=tmp_path)
    assert not (tmp_path / "ran").exists()


def test_cifar_and_cub_from_mocked_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    benchmarks._cifar100.cache_clear()
    with tfds.testing.mock_data(num_examples=500):
        source = km.data.cifar_fs("validation")
    assert source.num_classes == 16 and source.metadata["source"] == "tfds"
    assert source.class_names == km.data.published_split("cifar_fs")["validation"]
    assert source.x.dtype == np.uint8 and source.example_shape == (32, 32, 3)
    # Mocked data draws coarse labels at random: FC100 refuses them.
    with pytest.raises(ValueError, match=r"The CIFAR-100 data \(TFDS cifar100\) gives [0-9]+ classes "
                                         r"several superclasses .*its coarse labels are damaged"):
        km.data.fc100("train")
    benchmarks._cifar100.cache_clear()
    benchmarks._cub_tfds.cache_clear()
    with tfds.testing.mock_data(num_examples=2000):
        birds = km.data.cub("test", image_size=10)
    assert birds.class_names == km.data.published_split("cub")["test"]
    assert birds.example_shape == (10, 10, 3) and birds.x.dtype == np.uint8
    benchmarks._cub_tfds.cache_clear()
    with tfds.testing.mock_data(num_examples=20):
        with pytest.raises(ValueError, match=r"of the 50 test classes of cub have no images in "
                                             r"caltech_birds2011: '"):
            km.data.cub("test", image_size=10)
    benchmarks._cub_tfds.cache_clear()


# ----------------------------------------------------------------------
# CUB.


def test_cub_from_the_official_folder(tmp_path):
    images = write_cub(tmp_path)
    for where in (tmp_path, tmp_path / "CUB_200_2011", images):
        source = km.data.cub("validation", data_dir=where, image_size=10)
        assert source.class_names == km.data.published_split("cub")["validation"]
        assert source.num_classes == 50 and source.example_shape == (10, 10, 3)
        np.testing.assert_array_equal(source.examples_per_class, 2)
    import shutil

    shutil.rmtree(os.path.join(images, "004.Groove_billed_Ani"))
    with pytest.raises(FileNotFoundError, match=r"1 of the 50 test classes of CUB are not in "
                                                r"'.*images': '004\.Groove_billed_Ani'"):
        km.data.cub("test", data_dir=tmp_path, image_size=10)
    with pytest.raises(FileNotFoundError, match=r"No CUB-200-2011 images in `data_dir`='.*'"):
        km.data.cub("test", data_dir=tmp_path / "CUB_200_2011" / "images" / "001.Black_footed_Albatross")


# ----------------------------------------------------------------------
# Compact sources and augmentation.


def test_compact_source_episodes_equal_float_ones():
    images = noise_images(60, 6)
    floats = km.data.from_arrays(images.astype(np.float32) / 255, np.repeat(np.arange(6), 10))
    compact = floats.compact()
    assert compact.x.dtype == np.uint8 and compact.x.nbytes * 4 == floats.x.nbytes
    np.testing.assert_array_equal(compact.x, images)
    assert "uint8 (float32 per episode)" in repr(compact)
    for rotations in (None, (0, 90, 180, 270)):
        a = floats.with_rotations(rotations) if rotations else floats
        b = compact.with_rotations(rotations) if rotations else compact
        ea = next(iter(km.data.episodes(a, 5, 2, 3, 4, seed=3, num_tasks=8)))
        eb = next(iter(km.data.episodes(b, 5, 2, 3, 4, seed=3, num_tasks=8)))
        for key in ea:
            assert ea[key].dtype == eb[key].dtype and ea[key].shape == eb[key].shape
            np.testing.assert_allclose(ea[key].numpy(), eb[key].numpy(), rtol=0, atol=1e-7)
    subset = compact.subset(["3", "1"])
    assert subset.scale == 1 / 255 and subset.class_names == ("3", "1")


def test_disk_images_subset_and_indexing(tmp_path):
    images = noise_images(20, 4)
    path = tmp_path / "images.npy"
    np.save(path, images)
    offset = os.path.getsize(path) - images.nbytes
    source = km.data.Source(RawImages(path, offset, 20, (4, 4, 3)), np.repeat(np.arange(4), 5),
                            ["a", "b", "c", "d"])
    assert source.scale == 1 / 255 and source.storage == "uint8 on disk"
    part = source.subset(["c", "a"])
    assert isinstance(part.x, RawImages) and part.x.shape == (10, 4, 4, 3)
    np.testing.assert_array_equal(np.asarray(part.x), images[np.r_[0:5, 10:15]])
    np.testing.assert_array_equal(part.x[part.y == 0], images[10:15])
    np.testing.assert_array_equal(part.x[-1], images[14])
    with pytest.raises(ValueError, match=r"holds \d+ bytes, too few for 30 images of shape "
                                         r"\(4, 4, 3\) from byte \d+: the file is truncated\."):
        RawImages(path, offset, 30, (4, 4, 3))


def test_compact_and_scale_errors():
    with pytest.raises(ValueError, match=r"`scale` converts integer examples \(uint8 images\) to "
                                         r"float32 per episode, but source 'source' holds float32 "
                                         r"examples\. Pass scale=None\."):
        km.data.Source(np.zeros((2, 2), np.float32), [0, 1], ["a", "b"], scale=1 / 255)
    with pytest.raises(ValueError, match=r"`scale` must be None or a positive number \(1/255 for "
                                         r"uint8 images\)\. Received: scale=-1"):
        km.data.Source(np.zeros((2, 2), np.uint8), [0, 1], ["a", "b"], scale=-1)
    with pytest.raises(ValueError, match=r"`compact\(\)` needs images in \[0, 1\]"):
        km.data.from_arrays(np.full((2, 2), 3.0), [0, 1]).compact()
    with pytest.raises(ValueError, match=r"`augmentation` transforms images \[examples, height, "
                                         r"width, channels\], but source 'arrays' holds examples "
                                         r"of shape \(2,\)\."):
        km.data.from_arrays(np.zeros((2, 2)), [0, 1]).with_augmentation(km.data.Augmentation())
    with pytest.raises(ValueError, match=r"`storage` must be one of \['float32', 'uint8'\]\. "
                                         r"Received: storage='int8'"):
        km.data.from_files([["a.png"]], ["a"], storage="int8")


def test_from_directory_uint8_storage(tmp_path):
    for c in range(3):
        (tmp_path / f"c{c}").mkdir()
        for i, image in enumerate(noise_images(4, 5, seed=c)):
            Image.fromarray(image).save(tmp_path / f"c{c}" / f"{i}.png")
    floats = km.data.from_directory(tmp_path, image_size=None, color_mode="rgb")
    compact = km.data.from_directory(tmp_path, image_size=None, color_mode="rgb", storage="uint8")
    assert compact.x.dtype == np.uint8 and compact.scale == 1 / 255
    np.testing.assert_array_equal(compact.x.astype(np.float32) * np.float32(1 / 255), floats.x)
    resized = km.data.from_directory(tmp_path, image_size=3, color_mode="rgb", storage="uint8")
    resized_float = km.data.from_directory(tmp_path, image_size=3, color_mode="rgb")
    assert np.abs(resized.x / 255 - resized_float.x).max() <= 0.5 / 255 + 1e-6


def test_augmentation_is_deterministic_and_changes_images():
    images = noise_images(40, 16)
    source = km.data.from_arrays(images, np.repeat(np.arange(4), 10)).compact() \
        if False else km.data.Source(images, np.repeat(np.arange(4), 10), list("abcd"), scale=1 / 255)
    plain = next(iter(km.data.episodes(source, 4, 2, 3, 2, seed=1)))
    augmented = source.with_augmentation(km.data.Augmentation(seed=7))
    assert "augmented" in repr(augmented)
    a = next(iter(km.data.episodes(augmented, 4, 2, 3, 2, seed=1)))
    b = next(iter(km.data.episodes(augmented, 4, 2, 3, 2, seed=1)))
    other = next(iter(km.data.episodes(source.with_augmentation(km.data.Augmentation(seed=8)),
                                       4, 2, 3, 2, seed=1)))
    for key in ("support_x", "query_x"):
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())  # pure function of seeds
        assert a[key].shape == plain[key].shape and a[key].dtype == tf.float32
        assert not np.allclose(a[key].numpy(), plain[key].numpy())  # support and query both
        assert not np.allclose(a[key].numpy(), other[key].numpy())
        assert 0 <= a[key].numpy().min() and a[key].numpy().max() <= 1
    for key in ("support_y", "query_y"):
        np.testing.assert_array_equal(a[key].numpy(), plain[key].numpy())


def test_augmentation_steps():
    image = np.random.default_rng(0).random((1, 16, 16, 3)).astype(np.float32)
    flip = km.data.Augmentation(crop_padding=0, brightness=0, contrast=0, saturation=0)
    outs = [flip(image, tf.constant([s, 0], tf.int64)).numpy() for s in range(8)]
    for out in outs:  # each is the image or its mirror
        assert np.array_equal(out, image) or np.array_equal(out, image[:, :, ::-1])
    assert any(np.array_equal(o, image) for o in outs) and any(
        np.array_equal(o, image[:, :, ::-1]) for o in outs)
    crop = km.data.Augmentation(crop_padding=2, horizontal_flip=False, brightness=0, contrast=0,
                                saturation=0)
    padded = np.pad(image, [(0, 0), (2, 2), (2, 2), (0, 0)])
    for s in range(5):
        out = crop(image, tf.constant([s, 1], tf.int64)).numpy()
        assert any(np.array_equal(out, padded[:, i:i + 16, j:j + 16])
                   for i in range(5) for j in range(5))
    assert km.data.Augmentation().padding_for(32, 32) == 4
    assert km.data.Augmentation().padding_for(84, 84) == 8
    jitter = km.data.Augmentation(crop_padding=0, horizontal_flip=False, contrast=0, saturation=0,
                                  brightness=0.5)
    ratio = jitter(image, tf.constant([3, 3], tf.int64)).numpy() / image
    bright = ratio[image * 1.5 < 1]
    assert 0.5 <= bright.min() and bright.max() <= 1.5 and np.ptp(bright) < 1e-5


def test_augmentation_errors():
    for kwargs, message in [
        ({"crop_padding": -1}, r"`crop_padding` must be 'auto' or a non-negative number of "
                               r"pixels\. Received: crop_padding=-1"),
        ({"horizontal_flip": "yes"}, r"`horizontal_flip` must be True or False"),
        ({"brightness": -0.1}, r"`brightness` must be a non-negative number\. Received: "
                               r"brightness=-0\.1"),
        ({"saturation": 2}, r"`saturation` must be in \[0, 1\] \(a factor drawn from "
                            r"\[1 - saturation, 1 \+ saturation\]\)\. Received: saturation=2\.0"),
        ({"seed": -3}, r"`seed` must be a non-negative integer or None\. Received: seed=-3"),
    ]:
        with pytest.raises(ValueError, match=message):
            km.data.Augmentation(**kwargs)
    assert "crop_padding='auto'" in repr(km.data.Augmentation())


def test_keras_preprocessing_layers_as_augmentation():
    images = noise_images(20, 8)
    source = km.data.Source(images, np.repeat(np.arange(4), 5), list("abcd"), scale=1 / 255)
    layer = keras.Sequential([keras.layers.RandomFlip("horizontal", seed=1),
                              keras.layers.RandomContrast(0.3, seed=2)])
    batch = next(iter(km.data.episodes(source.with_augmentation(layer), 3, 1, 2, 2, seed=0)))
    assert batch["support_x"].shape == (2, 3, 8, 8, 3) and batch["query_x"].dtype == tf.float32
    assert np.all(np.isfinite(batch["query_x"].numpy()))


def test_loaders_apply_augmentation(tmp_path):
    write_mini_imagenet(tmp_path, "pickle", splits=("train",), size=16)
    train = km.data.mini_imagenet("train", tmp_path, image_size=16,
                                  augmentation=km.data.Augmentation(seed=3))
    assert isinstance(train.augmentation, km.data.Augmentation)
    assert km.data.mini_imagenet("train", tmp_path, image_size=16).augmentation is None


# ----------------------------------------------------------------------
# End to end: MAML and ANIL on a generated mini-ImageNet through model.fit.


@pytest.mark.parametrize("algorithm", ["MAML", "ANIL"])
def test_fit_on_generated_mini_imagenet(tmp_path, algorithm):
    write_mini_imagenet(tmp_path, "pickle", splits=("train", "validation"), per_class=4, size=84)
    train = km.data.mini_imagenet("train", tmp_path, augmentation=km.data.Augmentation())
    val = km.data.mini_imagenet("validation", tmp_path)
    episodes = km.data.episodes(train, n_way=3, k_shot=1, q_query=2, meta_batch_size=2, seed=0)
    validation = km.data.episodes(val, n_way=3, k_shot=1, q_query=2, meta_batch_size=2, seed=1,
                                  num_tasks=4)
    model = km.models.conv4(3, filters=4, input_shape=(84, 84, 3), downsampling="max_pool", seed=0)
    learner = getattr(km, algorithm)(model, inner_learning_rate=0.05, inner_steps=1)
    learner.compile(optimizer=keras.optimizers.Adam(1e-3),
                    loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                    metrics=["accuracy"])
    history = learner.fit(episodes, epochs=2, steps_per_epoch=2, validation_data=validation,
                          validation_steps=1, verbose=0)
    assert len(history.history["loss"]) == 2
    assert all(np.isfinite(v) for values in history.history.values() for v in values)
    assert 0 <= history.history["val_accuracy"][-1] <= 1


# ----------------------------------------------------------------------
# Memory (large): the figures. Each runs in a fresh process and
# prints its peak RSS.

MEMORY_SCRIPT = textwrap.dedent("""
    import json, os, resource, sys, time
    import numpy as np
    import keras_meta as km

    def rss_mib():
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {k: int(fields[k].split()[0]) // 1024 for k in ("VmRSS", "VmHWM", "RssAnon", "RssFile")}

    kind, data_dir = sys.argv[1], sys.argv[2]
    before = rss_mib()
    start = time.perf_counter()
    if kind == "mini":
        source = km.data.mini_imagenet("train", data_dir)
    else:
        source = km.data.tiered_imagenet("train", data_dir)
    built = rss_mib()
    build_seconds = time.perf_counter() - start
    batches = iter(km.data.episodes(source, 5, 5, 15, 4, seed=0))
    start = time.perf_counter()
    for _ in range(int(sys.argv[3])):
        batch = next(batches)
    sample_seconds = time.perf_counter() - start
    print(json.dumps({"examples": len(source), "classes": source.num_classes,
                      "storage": source.storage, "before": before, "built": built,
                      "build_seconds": build_seconds, "sampled": rss_mib(),
                      "sample_seconds": sample_seconds}))
""")


def run_memory_script(kind, data_dir, batches):
    result = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, kind, str(data_dir), str(batches)],
        capture_output=True, text=True, check=True, cwd=REPO,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    return report


@pytest.mark.large
def test_full_size_mini_imagenet_pickle_memory(tmp_path):
    """38,400 random 84x84x3 images in the pickle layout: peak RSS < 1.5 GB."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (38_400, 84, 84, 3), dtype=np.uint8)
    classes = km.data.published_split("mini_imagenet")["train"]
    class_dict = {c: list(range(i * 600, (i + 1) * 600)) for i, c in enumerate(classes)}
    with open(tmp_path / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
    del images
    report = run_memory_script("mini", tmp_path, 200)
    assert report["examples"] == 38_400 and report["classes"] == 64
    assert report["sampled"]["VmHWM"] * 2**20 < 1.5e9


@pytest.mark.large
def test_tiered_sized_png_pickle_memory(tmp_path):
    """120,000 PNGs (84x84x3) in the png_pickle layout: episodes read from disk."""
    count, per_class = 120_000, 1_200
    base = [np.frombuffer(png_bytes(image), np.uint8).reshape(-1, 1)
            for image in noise_images(64, 84)]
    with open(tmp_path / "train_images_png.pkl", "wb") as f:
        py2_dumps([base[i % 64] for i in range(count)], f)
    with open(tmp_path / "train_labels.pkl", "wb") as f:
        f.write(py2_dumps(tiered_labels(per_class, count // per_class)))
    size = os.path.getsize(tmp_path / "train_images_png.pkl")
    report = run_memory_script("tiered", tmp_path, 200)
    report["pickle_bytes"] = size
    print(json.dumps(report))
    assert report["examples"] == count
    assert (report["sampled"]["RssAnon"] - report["before"]["RssAnon"]) * 2**20 < size / 4
