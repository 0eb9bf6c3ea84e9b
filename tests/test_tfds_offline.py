"""TFDS's real download-and-prepare path, with no mocks of TFDS.

`test_sources.py` and `test_omniglot.py` mock TFDS's data; these tests run the
code a new user runs: `tfds.load` -> `download_and_prepare` -> the download
manager -> `requests`. The network is blocked at the socket (it is also
missing on the test machines), so the download fails for real and keras_meta
must turn that failure into a message that says what happened and how to work
offline, never an import error from a missing dependency of the `datasets`
extra (the first failure a new user met: `No module named
'importlib_resources'`). A small local builder then runs the rest of the
prepare path (extraction, example generation, writing, reading) end to end.
"""

import socket
import zipfile

import numpy as np
import pytest
import tensorflow as tf

import keras_meta as km

tfds = pytest.importorskip("tensorflow_datasets")
omniglot_module = pytest.importorskip("keras_meta.data.omniglot")


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt fails, as on a machine without network access.

    urllib3 retries a failed connection (TFDS asks for 10 retries with
    exponential backoff, about 100 s in all): its backoff is set to 0 so that
    the retries run, quickly.
    """

    def refuse(*args, **kwargs):
        raise OSError("network access blocked by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    import urllib3.util.retry

    monkeypatch.setattr(urllib3.util.retry.Retry, "get_backoff_time", lambda self: 0.0)
    omniglot_module._all_characters.cache_clear()
    yield
    omniglot_module._all_characters.cache_clear()


def _chain(error):
    seen = []
    while error is not None and error not in seen:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def test_omniglot_without_network_says_so_and_how_to_work_offline(no_network, tmp_path):
    with pytest.raises(ConnectionError) as info:
        km.data.omniglot("train", tfds_data_dir=tmp_path)
    error = info.value
    assert isinstance(error, km.data.sources.DatasetDownloadError)
    message = str(error)
    assert message.startswith(
        "Could not download Omniglot from TFDS: no network access (NewConnectionError: "
        "HTTPSConnection(host='github.com', port=443): Failed to establish a new "
        "connection: network access blocked by the test)."
    )
    assert "This machine seems to be offline, or the server is unreachable." in message
    assert (
        "Offline, pass `data_dir=` a local folder of Omniglot images laid out as "
        "<alphabet>/<character>/<drawing>.png (at any depth, e.g. the unzipped "
        "images_background/ and images_evaluation/ folders of "
        "https://github.com/brendenlake/omniglot/tree/master/python)"
    ) in message
    assert "`tfds_data_dir=` a TFDS data folder where omniglot is already prepared" in message
    # chained to the real failure inside TFDS's downloader: a requests error,
    # not an ImportError of a dependency the install left out
    chain = _chain(error)
    assert not any(isinstance(e, ImportError) for e in chain), chain
    assert any(type(e).__module__.startswith("requests") for e in chain), chain
    # TFDS got as far as its download manager: it made its download folder
    assert (tmp_path / "downloads").is_dir()


def test_from_tfds_without_network(no_network, tmp_path):
    with pytest.raises(
        ConnectionError,
        match=r"Could not download TFDS 'mnist': no network access \(NewConnectionError: "
              r"HTTPSConnection\(host='storage\.googleapis\.com', port=443\): Failed to "
              r"establish a new connection: network access blocked by the test\)\. "
              r"This machine seems to be offline, or the server is unreachable\. Prepare "
              r"the data set where there is network access and copy `data_dir`=.* here, "
              r"or build the source from local files with `from_directory`\.",
    ):
        km.data.from_tfds("mnist", "train", data_dir=str(tmp_path))


def test_omniglot_not_prepared_and_no_download(tmp_path):
    omniglot_module._all_characters.cache_clear()
    with pytest.raises(
        FileNotFoundError,
        match=r"TFDS has no prepared Omniglot in `tfds_data_dir`=.*, and `download=False` "
              r"forbids downloading it\. Offline, pass `data_dir=` a local folder of "
              r"Omniglot images laid out as <alphabet>/<character>/<drawing>\.png",
    ):
        km.data.omniglot("train", tfds_data_dir=str(tmp_path), download=False)
    with pytest.raises(
        FileNotFoundError,
        match=r"TFDS 'mnist' is not prepared in `data_dir`=.*, and `download=False` "
              r"forbids downloading it\. Pass `download=True`, or the `data_dir` where it "
              r"was prepared\.",
    ):
        km.data.from_tfds("mnist", "train", data_dir=str(tmp_path), download=False)


# ----------------------------------------------------------------------
# The rest of the prepare path, from a local archive (no network needed).

TINY_ZIP = None  # set by the test: the archive the builder "downloads"


class KerasMetaTinyFolders(tfds.core.GeneratorBasedBuilder):
    """Three classes of four 8x8 grayscale PNGs, from a zip file on disk."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 1)),
                "label": tfds.features.ClassLabel(names=["circle", "square", "star"]),
            }),
        )

    def _split_generators(self, dl_manager):
        path = dl_manager.download_and_extract(TINY_ZIP)  # a local path: copied
        return {"train": self._generate_examples(path / "tiny")}

    def _generate_examples(self, path):
        for folder in sorted(path.iterdir()):
            for image in sorted(folder.iterdir()):
                yield f"{folder.name}/{image.name}", {"image": image, "label": folder.name}


def test_tfds_prepare_path_runs_with_the_installed_dependencies(tmp_path, monkeypatch):
    archive = tmp_path / "tiny.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for c, name in enumerate(["circle", "square", "star"]):
            for i in range(4):
                image = np.full((8, 8, 1), 60 * c + 10 * i, np.uint8)
                zipped.writestr(f"tiny/{name}/{i}.png", tf.io.encode_png(image).numpy())
    monkeypatch.setattr(f"{__name__}.TINY_ZIP", str(archive))
    source = km.data.from_tfds(
        "keras_meta_tiny_folders", "train", data_dir=str(tmp_path / "tfds"), image_size=4
    )
    assert (tmp_path / "tfds" / "keras_meta_tiny_folders" / "1.0.0").is_dir()
    assert source.class_names == ("circle", "square", "star")
    assert source.x.shape == (12, 4, 4, 1)
    np.testing.assert_array_equal(source.examples_per_class, [4, 4, 4])
    # each image is constant: 60 * class + 10 * drawing, scaled to [0, 1]
    values = sorted(np.round(source.x[:, 0, 0, 0] * 255).astype(int).tolist())
    assert values == sorted(60 * c + 10 * i for c in range(3) for i in range(4))
    for image, label in zip(source.x, source.y):
        assert (round(float(image[0, 0, 0]) * 255) - 60 * label) in (0, 10, 20, 30)
