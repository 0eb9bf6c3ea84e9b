"""Runs the ```python blocks of README.md and docs/*.md at small sizes.

Used by `tests/test_docs.py`. The blocks show realistic sizes (1,000 steps per
epoch, meta-batches of 32, 600 evaluation tasks); the harness runs their real
code end to end, unchanged, with the size arguments of a few functions capped
while a block runs (`small_sizes`):

| call | argument: cap |
|---|---|
| `keras.Model.fit` | `epochs`: 2, `steps_per_epoch`: 2, `validation_steps`: 1 |
| `keras.Model.evaluate`, `keras.Model.predict` | `steps`: 2 |
| `km.data.episodes`, `km.data.sinusoid` | `meta_batch_size`: 4, `q_query`: 5 |
| `km.models.conv4` | `filters`: 8 |
| `km.callbacks.MetaEvaluation`, `km.callbacks.AdaptationCurve` | `num_episodes`: 4; `max_steps`: 2 |
| `km.evaluation.evaluate_episodes` | `num_tasks`: 4; `steps`: 2 |
| every learner's constructor (`km.MAML`, `km.IMAML`, ...) | `inner_steps`: 2, `eval_inner_steps`: 2 |
| `evaluate_tasks`, `adapt`, `km.export_adaptive` | `steps`: 2 |
| `km.callbacks.MetaEvaluation` | `inner_steps`: 2 |

A list of step counts (`steps=[0, 1, 10]`) is capped element by element
(`[0, 1, 2]`) when its values stay distinct, and runs as written otherwise.

Every other argument, and every other function, runs as written. Around the
caps the harness checks what is cheap to check: `fit` on an infinite dataset
must be given `steps_per_epoch` (it would never end otherwise), and the
numbers `fit`, `evaluate`, `predict`, `evaluate_episodes` and `evaluate_tasks`
return must be finite, as must every float array or number a block leaves in
its namespace.

Environment of a block: the blocks of one Markdown file run in order in one
namespace (a block may use what an earlier block of the same file defined),
in a fresh temporary working directory that holds `omniglot/`, a small
generated folder in the layout of the official Omniglot zips
(`images_background/<alphabet>/characterNN/*.png` and `images_evaluation/...`:
8 alphabets, 80 characters, 20 drawings of 105x105 pixels each). Blocks that
need Omniglot on disk read it with `data_dir="omniglot"`. Blocks must not
download: `km.data.from_tfds` (and `km.data.omniglot` without `data_dir`)
raise while a block runs; show downloads in ```bash blocks instead.
`km.configure_cpu_threads()` runs for real but cannot change TensorFlow's pools
once the runtime has started (it has, in the test process), so there its
"too late" RuntimeError is ignored.
"""

import ast
import functools
import inspect
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

import keras_meta as km

REPO = Path(__file__).resolve().parent.parent
PYTHON_LANGUAGES = {"python", "py", "python3"}

# Python blocks that the test does not run, as {(file, first line of the
# block's code): why}. Keep empty: every block of the docs runs.
EXCLUDED = {}

# Seconds each block took, `{where: s}` (for `pytest --durations` follow-ups).
BLOCK_SECONDS = {}

# Python blocks that show non-finite values on purpose (how keras_meta skips
# and counts them), as {(file, first line of the block's code): why}. They run
# like every block; only the finiteness checks are off for them.
NON_FINITE_SHOWN = {
    ("errors.md", "# A diverging inner loop: every update is skipped."): "shows a diverging inner loop: the logged loss is NaN",
}
_FINITE_CHECKS = [True]

CAPS = {
    "fit": {"epochs": 2, "steps_per_epoch": 2, "validation_steps": 1},
    "evaluate": {"steps": 2},
    "predict": {"steps": 2},
    "episodes": {"meta_batch_size": 4, "q_query": 5},
    "sinusoid": {"meta_batch_size": 4, "q_query": 5},
    "conv4": {"filters": 8},
    "MetaEvaluation": {"num_episodes": 4, "inner_steps": 2},
    "AdaptationCurve": {"num_episodes": 4, "max_steps": 2},
    "evaluate_episodes": {"num_tasks": 4, "steps": 2},
    # Inner steps: their loops are unrolled into the traced graphs, so each
    # step adds tracing time (10-step blocks traced for 10-19 s each).
    "MetaLearner": {"inner_steps": 2, "eval_inner_steps": 2},
    "evaluate_tasks": {"steps": 2},
    "adapt": {"steps": 2},
    "export_adaptive": {"steps": 2},
}

OMNIGLOT_ALPHABETS = {
    "images_background": ["Balinese", "Greek", "Korean", "Latin", "Tagalog"],
    "images_evaluation": ["Atlantean", "Kannada", "Tibetan"],
}
OMNIGLOT_CHARACTERS_PER_ALPHABET = 10
OMNIGLOT_DRAWERS = 20


# ----------------------------------------------------------------------
# Collecting the blocks.


def doc_files():
    """README.md and every docs/*.md, found when the tests are collected."""
    return [REPO / "README.md"] + sorted((REPO / "docs").glob("*.md"))


@dataclass
class Block:
    path: Path
    line: int  # 1-based line of the block's first line of code
    language: str
    code: str

    @property
    def where(self):
        path = self.path.relative_to(REPO) if self.path.is_relative_to(REPO) else self.path
        return f"{path}:{self.line}"

    @property
    def first_line(self):
        return next((l.strip() for l in self.code.splitlines() if l.strip()), "")


_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


def fenced_blocks(path):
    """Every fenced code block of a Markdown file, with its language."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = _FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence = len(match["indent"]), match["fence"]
        language = (match["info"].strip().split() or [""])[0].strip("{}.").lower()
        body, j = [], i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (
                closing
                and closing["fence"][0] == fence[0]
                and len(closing["fence"]) >= len(fence)
                and not closing["info"].strip()
            ):
                break
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j])
            j += 1
        else:
            raise ValueError(f"{path}:{i + 1}: code fence {fence!r} is never closed")
        blocks.append(Block(Path(path), i + 2, language, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def python_blocks(path):
    return [b for b in fenced_blocks(path) if b.language in PYTHON_LANGUAGES]


def is_excluded(block):
    return (block.path.name, block.first_line) in EXCLUDED


# ----------------------------------------------------------------------
# Small sizes.


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def _capped(value, cap):
    """`min(value, cap)` for an int; element by element for a list of ints
    whose capped values stay distinct; anything else unchanged."""
    if _is_int(value):
        return min(value, cap)
    if isinstance(value, (list, tuple)) and value and all(_is_int(v) for v in value):
        capped = [min(v, cap) for v in value]
        if len(set(capped)) == len(capped):
            return type(value)(capped)
    return value


def _capping(function, caps, name):
    signature = inspect.signature(function)

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()  # defaults are capped too (conv4's 64 filters, 600 episodes)
        for key, cap in caps.items():
            if key in bound.arguments:
                bound.arguments[key] = _capped(bound.arguments[key], cap)
        return function(*bound.args, **bound.kwargs)

    wrapper.__wrapped_by_docs_harness__ = name
    return wrapper


def _check_finite(value, what):
    """Asserts that every float in `value` (nests, arrays, tensors) is finite."""
    if not _FINITE_CHECKS[0]:
        return
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{what}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_finite(item, f"{what}[{index}]")
    elif isinstance(value, float):
        assert math.isfinite(value), f"{what} is not finite: {value}"
    elif isinstance(value, (np.ndarray, np.generic, tf.Tensor)) and not isinstance(value, bool):
        array = np.asarray(value)
        if array.dtype.kind in "fc" and array.size:
            assert np.all(np.isfinite(array)), f"{what} has non-finite values"


def _is_infinite_dataset(x):
    return isinstance(x, tf.data.Dataset) and int(x.cardinality()) == int(tf.data.INFINITE_CARDINALITY)


def _checked_fit(fit):
    signature = inspect.signature(fit)

    @functools.wraps(fit)
    def wrapper(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs).arguments
        assert arguments.get("steps_per_epoch") is not None or not _is_infinite_dataset(
            arguments.get("x")
        ), "fit() on an infinite dataset without steps_per_epoch never ends"
        history = fit(*args, **kwargs)
        _check_finite(history.history, "fit().history")
        return history

    return wrapper


def _checked_result(function, what):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        result = function(*args, **kwargs)
        _check_finite(result, what)
        return result

    return wrapper


def _no_download(*args, **kwargs):
    raise AssertionError(
        "A python block of the docs tried to load TensorFlow Datasets: the docs test runs "
        "offline. Read a local folder (`data_dir=...`) in python blocks and show downloads "
        "in ```bash blocks."
    )


def _tolerant_configure_cpu_threads(configure):
    @functools.wraps(configure)
    def wrapper(*args, **kwargs):
        try:
            return configure(*args, **kwargs)
        except RuntimeError as error:
            if "must run before TensorFlow's runtime starts" not in str(error):
                raise
            return None

    return wrapper


def small_sizes(monkeypatch):
    """Caps the size arguments listed in `CAPS` (see the module docstring)."""
    from keras_meta.algorithms import base

    # `keras_meta.data.omniglot` is also the name of the function: take the module.
    omniglot_module = sys.modules["keras_meta.data.omniglot"]

    fit = _capping(keras.Model.fit, CAPS["fit"], "fit")
    monkeypatch.setattr(keras.Model, "fit", _checked_fit(fit))
    for method in ("evaluate", "predict"):
        capped = _capping(getattr(keras.Model, method), CAPS[method], method)
        monkeypatch.setattr(keras.Model, method, _checked_result(capped, f"{method}()"))
    monkeypatch.setattr(
        base.MetaLearner, "__init__",
        _capping(base.MetaLearner.__init__, CAPS["MetaLearner"], "MetaLearner"),
    )
    evaluate_tasks = _capping(base.MetaLearner.evaluate_tasks, CAPS["evaluate_tasks"],
                              "evaluate_tasks")
    monkeypatch.setattr(
        base.MetaLearner, "evaluate_tasks", _checked_result(evaluate_tasks, "evaluate_tasks()")
    )
    monkeypatch.setattr(
        base.MetaLearner, "adapt", _capping(base.MetaLearner.adapt, CAPS["adapt"], "adapt")
    )
    export_module = sys.modules["keras_meta.export"]
    export_adaptive = _capping(km.export_adaptive, CAPS["export_adaptive"], "export_adaptive")
    monkeypatch.setattr(km, "export_adaptive", export_adaptive)
    monkeypatch.setattr(export_module, "export_adaptive", export_adaptive)
    for name in ("episodes", "sinusoid"):
        monkeypatch.setattr(km.data, name, _capping(getattr(km.data, name), CAPS[name], name))
    monkeypatch.setattr(km.models, "conv4", _capping(km.models.conv4, CAPS["conv4"], "conv4"))
    for name in ("MetaEvaluation", "AdaptationCurve"):
        cls = getattr(km.callbacks, name)
        monkeypatch.setattr(cls, "__init__", _capping(cls.__init__, CAPS[name], name))
    evaluate_episodes = _capping(
        km.evaluation.evaluate_episodes, CAPS["evaluate_episodes"], "evaluate_episodes"
    )
    evaluate_episodes = _checked_result(evaluate_episodes, "evaluate_episodes()")
    monkeypatch.setattr(km.evaluation, "evaluate_episodes", evaluate_episodes)
    monkeypatch.setattr(km.callbacks, "evaluate_episodes", evaluate_episodes)
    monkeypatch.setattr(km.data, "from_tfds", _no_download)
    monkeypatch.setattr(omniglot_module, "from_tfds", _no_download)
    monkeypatch.setattr(
        km, "configure_cpu_threads", _tolerant_configure_cpu_threads(km.configure_cpu_threads)
    )


# ----------------------------------------------------------------------
# A small Omniglot folder.


def make_omniglot(root, seed=0):
    """Writes a small folder in the layout of the official Omniglot zips.

    `root/images_background/<alphabet>/characterNN/<id>_<drawer>.png` (and
    `images_evaluation`): 105x105 1-bit PNGs, black strokes on white. Each
    character is a few random strokes; each drawer jitters them.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    root = Path(root)
    image_id = 0
    for part, alphabets in OMNIGLOT_ALPHABETS.items():
        for alphabet in alphabets:
            for c in range(1, OMNIGLOT_CHARACTERS_PER_ALPHABET + 1):
                folder = root / part / alphabet / f"character{c:02d}"
                folder.mkdir(parents=True)
                image_id += 1
                strokes = rng.uniform(15, 90, size=(rng.integers(2, 5), 2, 2))
                for drawer in range(1, OMNIGLOT_DRAWERS + 1):
                    image = Image.new("1", (105, 105), 1)
                    draw = ImageDraw.Draw(image)
                    for stroke in strokes + rng.normal(0, 2.5, size=strokes.shape):
                        draw.line([tuple(p) for p in stroke], fill=0, width=4)
                    image.save(folder / f"{image_id:04d}_{drawer:02d}.png")
    return root


# ----------------------------------------------------------------------
# Running one file's blocks.


def _namespace_values(namespace, before):
    for key, value in namespace.items():
        if key.startswith("__") or (key in before and before[key] is value):
            continue
        yield key, value


def run_blocks(blocks, namespace=None):
    """Runs `blocks` in order in one namespace; returns the blocks that ran."""
    namespace = {"__name__": "__docs__"} if namespace is None else namespace
    ran = []
    for block in blocks:
        if is_excluded(block):
            continue
        # Pad so that tracebacks give the line numbers of the Markdown file.
        source = "\n" * (block.line - 1) + block.code
        try:
            code = compile(ast.parse(source, filename=str(block.path)), str(block.path), "exec")
        except SyntaxError as error:
            raise AssertionError(f"{block.where}: the python block does not parse: {error}") from error
        before = dict(namespace)
        _FINITE_CHECKS[0] = (block.path.name, block.first_line) not in NON_FINITE_SHOWN
        started = time.perf_counter()
        try:
            exec(code, namespace)  # noqa: S102 - the docs' own code
        except Exception as error:
            raise AssertionError(
                f"{block.where}: the python block failed: {type(error).__name__}: {error}"
            ) from error
        finally:
            _FINITE_CHECKS[0] = True
            BLOCK_SECONDS[block.where] = time.perf_counter() - started
        for key, value in _namespace_values(namespace, before):
            try:
                _check_finite(value, f"{block.where}: `{key}`")
            except AssertionError:
                raise
            except Exception:  # values that are not numbers
                pass
        ran.append(block)
    return ran
