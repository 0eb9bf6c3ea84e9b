"""A restricted unpickler for the pickled data sets found on shared drives.

Few-shot benchmarks circulate as pickles (`mini-imagenet-cache-train.pkl`,
tiered-ImageNet's `train_images_png.pkl`, CIFAR-100's `cifar-100-python`),
and loading a pickle with `pickle.load` runs whatever code it names. `load`
rebuilds only what a data set needs: numpy arrays (and their dtypes and
scalars), dicts, lists, tuples, strings, bytes and numbers, from pickles of
protocol 0 to 5, Python 2 pickles included (their `str` is read as Latin-1,
numpy's convention). Any other object the pickle asks for (a function such
as `os.system`, a class, an extension code, a persistent id) raises
`UnsafePickleError`, naming the file and what it asked for, before anything
runs.

Large arrays need not be read at all: with `lazy_from=n`, the raw data of
every array of at least `n` bytes that the pickle stores as one contiguous
run of bytes (protocol 2 from Python 2, protocols 3 to 5) comes back as a
`LazyArray` (the file, the offset, shape and dtype), which `memmap()` maps
and `read()` reads. A 2.4 GB pickle of images then loads in a fraction of a
second and a few megabytes.
"""

import io
import os
import pickle
import struct

import numpy as np

__all__ = ["LazyArray", "UnsafePickleError", "load"]

ALLOWED = (
    "numpy arrays, dicts, lists, tuples, strings, bytes and numbers"
)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something other than plain data, and was refused."""


class LazyArray:
    """An array whose data lies in a file, not yet read.

    Attributes:
        path: the file.
        offset: byte offset of the first element.
        shape, dtype: of the array.
        order: `"C"` or `"F"` (the element order in the file).
    """

    def __init__(self, path, offset, shape, dtype, order="C"):
        self.path = os.fspath(path)
        self.offset = int(offset)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self.order = order

    @property
    def nbytes(self):
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    def __len__(self):
        return self.shape[0] if self.shape else 0

    def memmap(self):
        """A read-only `np.memmap` of the data (pages are read when touched)."""
        return np.memmap(
            self.path, dtype=self.dtype, mode="r", offset=self.offset,
            shape=self.shape, order=self.order,
        )

    def read(self):
        """The data as an array in memory."""
        count = int(np.prod(self.shape, dtype=np.int64))
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            flat = np.fromfile(file, dtype=self.dtype, count=count)
        if flat.size != count:
            raise ValueError(
                f"{self.path!r} ends before the array it holds at byte "
                f"{self.offset} ({count} elements of {self.dtype}): the file is truncated."
            )
        return flat.reshape(self.shape, order=self.order)

    def __repr__(self):
        return (f"<LazyArray {self.shape} {self.dtype} at byte {self.offset} of "
                f"{self.path!r}>")


def load(path, lazy_from=None, name=None):
    """Unpickles `path`, rebuilding only plain data.

    Args:
        path: a pickle file, or a seekable binary file object (then
            `lazy_from` must be None).
        lazy_from: `None` (read everything) or a byte count: arrays whose data
            is at least this large and is stored as one run of bytes are not
            read; they come back as `LazyArray`s.
        name: how errors name the file (default: `path`).

    Returns:
        The unpickled object: dicts, lists, tuples, strings, bytes, numbers,
        numpy arrays (read-only views of the pickle's bytes) and, with
        `lazy_from`, `LazyArray`s.

    Raises:
        UnsafePickleError: the pickle asks for anything else (a function, a
            class, a persistent id), which could run code.
        ValueError: the file is not a pickle, is truncated, or is an HTML
            page saved in its place (a failed download).

    Example:

    >>> import pickle, tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "data.pkl")
    >>> with open(path, "wb") as f:
    ...     pickle.dump({"labels": [3, 1], "x": np.eye(2)}, f)
    >>> load(path)["labels"]
    [3, 1]
    """
    if hasattr(path, "read"):
        if lazy_from is not None:
            raise ValueError(
                "`lazy_from` needs a file path (arrays are read from it later); "
                f"received a file object {path!r}."
            )
        return _load(path, name or getattr(path, "name", repr(path)), None)
    path = os.fspath(path)
    if lazy_from is not None and (
        isinstance(lazy_from, bool) or not isinstance(lazy_from, (int, np.integer))
        or lazy_from < 1
    ):
        raise ValueError(
            "`lazy_from` must be None or a positive number of bytes. Received: "
            f"lazy_from={lazy_from!r}"
        )
    with open(path, "rb") as file:
        return _load(file, name or path, lazy_from, path)


def _load(file, name, lazy_from, path=None):
    head = file.read(64)
    _check_head(name, head)
    file.seek(0)
    unpickler = _Unpickler(file, name, lazy_from)
    try:
        result = unpickler.load()
    except UnsafePickleError:
        raise
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError,
            TypeError, IndexError, KeyError, AttributeError) as error:
        raise ValueError(
            f"Could not unpickle {name!r}: {type(error).__name__}: {error}. "
            "The file is damaged or truncated (compare its size with the "
            "original), or is not a pickle."
        ) from error
    return _Finisher(path or name).finish(result)


def _check_head(path, head):
    if not head:
        raise ValueError(f"{path!r} is empty (0 bytes): it is not a pickle.")
    if head.lstrip()[:1] == b"<":
        raise ValueError(
            f"{path!r} is an HTML page, not a pickle (it starts with "
            f"{head[:40]!r}): a download that failed (e.g. a Google Drive quota "
            "or confirmation page) saved the page in place of the file. Delete it "
            "and copy the real file."
        )
    for magic, what in ((b"\x1f\x8b", "a gzip archive"), (b"PK\x03\x04", "a zip archive"),
                        (b"\x93NUMPY", "a NumPy .npy file")):
        if head.startswith(magic):
            raise ValueError(
                f"{path!r} is {what}, not a pickle (it starts with {head[:8]!r}). "
                "Extract or convert it first."
            )


# ----------------------------------------------------------------------
# The unpickler: the pure-Python one of the standard library, with
# `find_class` and the instance-building opcodes restricted.


class _Span:
    """Bytes of the file not read: `length` bytes from `offset`."""

    def __init__(self, offset, length, kind):
        self.offset, self.length, self.kind = offset, length, kind


class _Refuse:
    """`numpy.ndarray`, usable only as `_reconstruct`'s first argument."""

    def __init__(self, path, what):
        self.path, self.what = path, what

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError(
            f"Refusing to unpickle {self.path!r}: it calls `{self.what}` directly, "
            f"which keras_meta's restricted unpickler does not do (it rebuilds "
            f"only {ALLOWED})."
        )


class _ArrayState:
    """An ndarray under construction (`_reconstruct` + BUILD, or `_frombuffer`)."""

    def __init__(self):
        self.state = None

    def __setstate__(self, state):
        self.state = state


class _Unpickler(pickle._Unpickler):
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, path, lazy_from):
        super().__init__(file, encoding="latin1", errors="strict")
        self._file = file
        self._path = path
        self._lazy_from = lazy_from
        self._frame_start = 0
        numpy_array = _Refuse(path, "numpy.ndarray")
        self._numpy_array = numpy_array
        rebuild = {
            "_reconstruct": self._reconstruct,
            "scalar": self._scalar,
            "_frombuffer": self._frombuffer,
        }
        self._globals = {
            ("numpy", "ndarray"): numpy_array,
            ("numpy", "dtype"): self._dtype,
            ("_codecs", "encode"): self._encode,
            ("collections", "OrderedDict"): self._ordered_dict,
        }
        for module in ("numpy.core.multiarray", "numpy._core.multiarray",
                       "numpy.core.numeric", "numpy._core.numeric"):
            for name, function in rebuild.items():
                self._globals[(module, name)] = function

    # -- what the pickle may name ---------------------------------------

    def find_class(self, module, name):
        function = self._globals.get((module, name))
        if function is None:
            raise UnsafePickleError(
                f"Refusing to unpickle {self._path!r}: it asks for the Python "
                f"object `{module}.{name}`, and loading it could run code. "
                f"keras_meta's restricted unpickler rebuilds only {ALLOWED}. "
                "If the file should hold only data, it has been tampered with "
                "or is not the data set it claims to be; do not open it with "
                "pickle.load."
            )
        return function

    def persistent_load(self, pid):
        raise UnsafePickleError(
            f"Refusing to unpickle {self._path!r}: it holds a persistent id "
            f"({pid!r}), which only the program that wrote it can resolve; "
            f"keras_meta's restricted unpickler rebuilds only {ALLOWED}."
        )

    def _reconstruct(self, subtype, shape, typecode):
        if subtype is not self._numpy_array:
            raise UnsafePickleError(
                f"Refusing to unpickle {self._path!r}: it rebuilds an array of "
                f"type {subtype!r}; only numpy.ndarray is rebuilt."
            )
        return _ArrayState()

    def _dtype(self, obj, align=False, copy=False):
        if not isinstance(obj, str):
            raise UnsafePickleError(
                f"Refusing to unpickle {self._path!r}: it builds a numpy dtype "
                f"from {type(obj).__name__} {obj!r}; only type codes such as "
                "'u1' or 'f4' are accepted."
            )
        return np.dtype(obj, align=bool(align), copy=bool(copy))

    def _scalar(self, dtype, data=None):
        if not isinstance(dtype, np.dtype):
            raise UnsafePickleError(
                f"Refusing to unpickle {self._path!r}: a numpy scalar with "
                f"dtype {dtype!r}."
            )
        if dtype.hasobject:
            return data
        return np.frombuffer(_as_bytes(data), dtype=dtype, count=1)[0]

    def _frombuffer(self, buffer, dtype, shape, order):
        array = _ArrayState()
        array.state = (1, tuple(shape), dtype, order == "F", buffer)
        return array

    def _encode(self, text, encoding="utf-8", errors="strict"):
        if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8", "utf8"):
            raise UnsafePickleError(
                f"Refusing to unpickle {self._path!r}: `_codecs.encode` with "
                f"{type(text).__name__} and encoding {encoding!r}; only the "
                "Latin-1 or UTF-8 encoding of a string (how protocol 2 stores bytes) "
                "is accepted."
            )
        return text.encode(encoding, errors)

    @staticmethod
    def _ordered_dict(items=()):
        return dict(items)

    # -- opcodes that build objects -------------------------------------

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, (_ArrayState, np.dtype)):
            inst.__setstate__(state)
            return
        raise UnsafePickleError(
            f"Refusing to unpickle {self._path!r}: it sets the state of a "
            f"{type(inst).__name__}, which plain data never needs; keras_meta's "
            f"restricted unpickler rebuilds only {ALLOWED}."
        )

    dispatch[pickle.BUILD[0]] = load_build

    def _refuse_opcode(self, name):
        raise UnsafePickleError(
            f"Refusing to unpickle {self._path!r}: it uses the {name} opcode, "
            "which creates instances of classes; keras_meta's restricted "
            f"unpickler rebuilds only {ALLOWED}."
        )

    def load_newobj(self):
        self._refuse_opcode("NEWOBJ")

    def load_newobj_ex(self):
        self._refuse_opcode("NEWOBJ_EX")

    def load_inst(self):
        module = self.readline()[:-1].decode("ascii")
        name = self.readline()[:-1].decode("ascii")
        self.find_class(module, name)  # names what it asks for
        self._refuse_opcode("INST")

    def load_obj(self):
        self._refuse_opcode("OBJ")

    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj

    # -- large runs of bytes: left in the file when `lazy_from` allows ---

    def _position(self):
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            return self._frame_start + frame.tell()
        return self._file.tell()

    def _skip(self, length):
        frame = self._unframer.current_frame
        if frame is not None and frame.tell() < len(frame.getbuffer()):
            if frame.tell() + length > len(frame.getbuffer()):
                raise pickle.UnpicklingError("pickle exhausted before end of frame")
            frame.seek(length, io.SEEK_CUR)
        else:
            self._unframer.current_frame = None
            self._file.seek(length, io.SEEK_CUR)

    def _counted(self, length, kind):
        if self._lazy_from is not None and length >= self._lazy_from:
            span = _Span(self._position(), length, kind)
            self._skip(length)
            return span
        data = self.read(length)
        if len(data) != length:
            raise EOFError(f"expected {length} bytes, found {len(data)}")
        if kind == "str":
            return self._decode_string(data)
        return bytearray(data) if kind == "bytearray" else data

    def load_frame(self):
        (frame_size,) = struct.unpack("<Q", self.read(8))
        self._frame_start = self._file.tell()
        self._unframer.load_frame(frame_size)

    def load_binstring(self):
        (length,) = struct.unpack("<i", self.read(4))
        if length < 0:
            raise pickle.UnpicklingError("BINSTRING pickle has negative byte count")
        self.append(self._counted(length, "str"))

    def load_binbytes(self):
        (length,) = struct.unpack("<I", self.read(4))
        self.append(self._counted(length, "bytes"))

    def load_binbytes8(self):
        (length,) = struct.unpack("<Q", self.read(8))
        self.append(self._counted(length, "bytes"))

    def load_bytearray8(self):
        (length,) = struct.unpack("<Q", self.read(8))
        self.append(self._counted(length, "bytearray"))

    dispatch[pickle.FRAME[0]] = load_frame
    dispatch[pickle.BINSTRING[0]] = load_binstring
    dispatch[pickle.BINBYTES[0]] = load_binbytes
    dispatch[pickle.BINBYTES8[0]] = load_binbytes8
    dispatch[pickle.BYTEARRAY8[0]] = load_bytearray8


def _as_bytes(data):
    if isinstance(data, str):  # Python 2 str, read as Latin-1
        return data.encode("latin1")
    return data


class _Finisher:
    """Turns array states into arrays and unread spans into bytes, in place."""

    def __init__(self, path):
        self.path = path
        self.done = {}

    def finish(self, obj):
        key = id(obj)
        if key in self.done:
            return self.done[key]
        if isinstance(obj, _ArrayState):
            result = self._array(obj)
        elif isinstance(obj, _Span):
            result = self._read_span(obj)
        elif isinstance(obj, dict):
            result = obj
            items = list(obj.items())
            obj.clear()
            for k, v in items:
                obj[self.finish(k)] = self.finish(v)
        elif isinstance(obj, list):
            result = obj
            for i, item in enumerate(obj):
                if isinstance(item, (_ArrayState, _Span, dict, list, tuple)):
                    obj[i] = self.finish(item)
        elif isinstance(obj, tuple):
            result = tuple(self.finish(item) for item in obj)
        else:
            return obj
        self.done[key] = result
        return result

    def _read_span(self, span):
        with open(self.path, "rb") as file:
            file.seek(span.offset)
            data = file.read(span.length)
        if span.kind == "str":
            return data.decode("latin1")
        return bytearray(data) if span.kind == "bytearray" else data

    def _array(self, builder):
        state = builder.state
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise ValueError(f"Could not unpickle {self.path!r}: a numpy array with "
                             f"an unknown state {type(state).__name__}.")
        if len(state) == 5:
            state = state[1:]
        shape, dtype, fortran, data = state
        if not isinstance(dtype, np.dtype):
            raise UnsafePickleError(f"Refusing to unpickle {self.path!r}: an array "
                                    f"with dtype {dtype!r}.")
        shape = tuple(int(s) for s in shape)
        order = "F" if fortran else "C"
        count = int(np.prod(shape, dtype=np.int64))
        if dtype.hasobject:
            if not isinstance(data, list) or len(data) != count:
                raise ValueError(f"Could not unpickle {self.path!r}: an object "
                                 f"array of shape {shape} without its {count} items.")
            array = np.empty(count, dtype=object)
            for i, item in enumerate(data):
                array[i] = self.finish(item)
            return array.reshape(shape, order=order)
        if isinstance(data, _Span):
            if data.length != count * dtype.itemsize:
                raise ValueError(
                    f"Could not unpickle {self.path!r}: an array of shape {shape} "
                    f"{dtype} needs {count * dtype.itemsize} bytes, the file holds "
                    f"{data.length}."
                )
            return LazyArray(self.path, data.offset, shape, dtype, order)
        data = _as_bytes(data)
        if not isinstance(data, (bytes, bytearray)):
            raise ValueError(f"Could not unpickle {self.path!r}: array data of type "
                             f"{type(data).__name__}.")
        if len(data) != count * dtype.itemsize:
            raise ValueError(
                f"Could not unpickle {self.path!r}: an array of shape {shape} "
                f"{dtype} needs {count * dtype.itemsize} bytes, the file holds "
                f"{len(data)}."
            )
        return np.frombuffer(data, dtype=dtype, count=count).reshape(shape, order=order)
