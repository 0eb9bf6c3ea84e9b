"""Every ```python block of README.md and docs/*.md runs, so none goes stale.

The files are found by a glob when the tests are collected (README.md and
docs/*.md, including files added later); each file is one test whose blocks
run in order in one namespace, in a temporary working directory holding a
small generated Omniglot folder (`omniglot/`). Sizes are capped while the
blocks run: `tests/docs_fixtures.py` lists the caps and the checks.

No block is excluded (`docs_fixtures.EXCLUDED` is empty); a block that is
neither run nor listed there fails its file's test.
"""

import keras
import pytest

from tests import docs_fixtures
from tests.docs_fixtures import REPO, doc_files, make_omniglot, python_blocks, run_blocks

DOC_FILES = doc_files()


@pytest.fixture(scope="module")
def omniglot_folder(tmp_path_factory):
    return make_omniglot(tmp_path_factory.mktemp("docs_data") / "omniglot")


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(REPO)) for p in DOC_FILES])
def test_python_blocks_run(path, tmp_path, monkeypatch, omniglot_folder):
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no python blocks")
    (tmp_path / "omniglot").symlink_to(omniglot_folder, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    docs_fixtures.small_sizes(monkeypatch)
    keras.backend.clear_session()
    try:
        ran = run_blocks(blocks)
    finally:
        keras.backend.clear_session()
    not_run = [
        b.where for b in blocks if b not in ran and not docs_fixtures.is_excluded(b)
    ]
    assert not not_run, f"python blocks neither run nor excluded: {not_run}"


def test_the_docs_are_collected():
    names = {p.relative_to(REPO).as_posix() for p in DOC_FILES}
    assert "README.md" in names
    assert {"docs/maml.md", "docs/data.md"} <= names
    assert sum(len(python_blocks(p)) for p in DOC_FILES) > 0


def test_exclusions_name_existing_blocks():
    blocks = {(b.path.name, b.first_line) for p in DOC_FILES for b in python_blocks(p)}
    stale = [key for key in docs_fixtures.EXCLUDED if key not in blocks]
    assert not stale, f"EXCLUDED lists blocks that no longer exist: {stale}"
    stale = [key for key in docs_fixtures.NON_FINITE_SHOWN if key not in blocks]
    assert not stale, f"NON_FINITE_SHOWN lists blocks that no longer exist: {stale}"


def test_block_parser(tmp_path):
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n"
        "```python\nx = 1\n```\n"
        "- item\n\n  ```py\n  y = x + 1\n  ```\n"
        "````markdown\n```python\nnot a block\n```\n````\n"
        "```bash\nmake test\n```\n",
        encoding="utf-8",
    )
    blocks = python_blocks(doc)
    assert [(b.line, b.code) for b in blocks] == [(3, "x = 1\n"), (8, "y = x + 1\n")]
    namespace = {}
    assert run_blocks(blocks, namespace) == blocks and namespace["y"] == 2
    broken = tmp_path / "broken.md"
    broken.write_text("```python\n\n1 / 0\n```\n", encoding="utf-8")
    with pytest.raises(AssertionError, match=r"broken.md:2: the python block failed: ZeroDivisionError"):
        run_blocks(python_blocks(broken))


def test_small_sizes_caps_the_documented_arguments(monkeypatch):
    docs_fixtures.small_sizes(monkeypatch)
    import keras_meta as km

    episodes = km.data.sinusoid(meta_batch_size=25, q_query=10, seed=0)
    batch = next(iter(episodes))
    assert batch["support_x"].shape == (4, 10, 1) and batch["query_x"].shape == (4, 5, 1)
    assert km.models.conv4(5).get_layer("conv0").filters == 8
    maml = km.MAML(km.models.mlp(hidden_units=(4,)), inner_learning_rate=0.01)
    maml.compile(optimizer="adam", loss="mse")
    history = maml.fit(episodes, epochs=5, steps_per_epoch=1000, verbose=0)
    assert len(history.history["loss"]) == 2
    assert km.evaluation.evaluate_episodes(maml, episodes, num_tasks=600)["loss"].shape == (4, 1)
    ten = km.MAML(km.models.mlp(hidden_units=(4,)), inner_steps=10, eval_inner_steps=10)
    assert (ten.inner_steps, ten.eval_inner_steps) == (2, 2)
    ten.compile(optimizer="adam", loss="mse")
    assert ten.evaluate_tasks(batch, steps=[0, 1, 10])["loss"].shape == (4, 3)
    assert docs_fixtures._capped([0, 1, 10], 2) == [0, 1, 2]
    assert docs_fixtures._capped((0, 5, 10), 2) == (0, 5, 10)  # would repeat 2: as written
    assert docs_fixtures._capped(True, 2) is True
    with pytest.raises(AssertionError, match="without steps_per_epoch never ends"):
        maml.fit(episodes, epochs=1, verbose=0)
    with pytest.raises(AssertionError, match="runs offline"):
        km.data.omniglot("train")
