"""A stage's code in its key: the source its function reaches, so that an edit elsewhere leaves it complete."""

from __future__ import annotations

import ast
import shutil
from itertools import pairwise
from pathlib import Path

import pytest

from flows.stages import SPECS
from infra.code import PACKAGES, REPO_ROOT, StageCode, changed, function_code, module_closure, module_file

STAGE_MODULE = '''"""Stages of a tiny project."""
from curation.a import score
from infra import c
from training.x import train  # used by g only

LIMIT = 3  # f's constant


def _helper(v):
    return min(v, LIMIT)


def f(ctx):
    from infra.lazy import later  # imported where it runs
    return _helper(score(ctx)) + c.VALUE + later()


def g(ctx):
    return train(ctx)
'''
FILES = {
    "curation/__init__.py": "",
    "curation/a.py": "from .b import base\n\n\ndef score(x):\n    return base(x)\n",
    "curation/b.py": "def base(x):\n    return x\n",
    "infra/__init__.py": "",
    "infra/c.py": "VALUE = 1\n",
    "infra/lazy.py": "def later():\n    return 0\n",
    "infra/unused.py": "X = 0\n",
    "training/__init__.py": "",
    "training/x.py": "from infra.c import VALUE\n\n\ndef train(x):\n    return VALUE\n",
    "flows/__init__.py": "",
    "flows/st.py": STAGE_MODULE,
}


def _project(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _fn(name: str):
    """A stand-in carrying the tiny project's function name (its code is read from `root`, never imported)."""
    def stand_in():
        pass
    stand_in.__module__, stand_in.__qualname__ = "flows.st", name
    return stand_in


def test_a_functions_code_is_what_it_reaches_through_its_names_and_imports(tmp_path):
    _project(tmp_path, FILES)
    f, g = function_code(_fn("f"), tmp_path), function_code(_fn("g"), tmp_path)
    assert sorted(f.files) == ["curation/__init__.py", "curation/a.py", "curation/b.py", "flows/__init__.py",
                               "flows/st.py::f", "infra/__init__.py", "infra/c.py", "infra/lazy.py"]
    assert sorted(g.files) == ["flows/__init__.py", "flows/st.py::g", "infra/__init__.py", "infra/c.py",
                               "training/__init__.py", "training/x.py"]

    def versions(edits: dict[str, str] | None = None) -> tuple[str, str]:
        _project(tmp_path, {**FILES, **(edits or {})})
        return function_code(_fn("f"), tmp_path).version, function_code(_fn("g"), tmp_path).version

    start = versions()
    # Outside both: no change. The module's other function, or a comment outside f: f keeps its version.
    assert versions({"infra/unused.py": "X = 1\n"}) == start
    assert versions({"flows/st.py": STAGE_MODULE.replace("return train(ctx)", "return train(ctx) + 1")})[0] == start[0]
    assert versions({"flows/st.py": STAGE_MODULE.replace("# used by g only", "# g's")})[0] == start[0]
    # Reached through a relative import, a lazy import, a module-level helper, a constant: f changes, g does not.
    for edit in [{"curation/b.py": "def base(x):\n    return -x\n"}, {"infra/lazy.py": "def later():\n    return 1\n"},
                 {"flows/st.py": STAGE_MODULE.replace("min(v, LIMIT)", "max(v, LIMIT)")},
                 {"flows/st.py": STAGE_MODULE.replace("LIMIT = 3", "LIMIT = 4")}]:
        now = versions(edit)
        assert now[0] != start[0] and now[1] == start[1], edit
    # Shared by both.
    now = versions({"infra/c.py": "VALUE = 2\n"})
    assert now[0] != start[0] and now[1] != start[1]
    assert changed(f.files, function_code(_fn("f"), tmp_path).files) == ["infra/c.py"]


def test_a_function_defined_elsewhere_than_a_modules_top_level_counts_as_its_whole_module():
    def local():
        pass
    code = function_code(local)
    assert "tests/infra/test_code.py" in code.files and "infra/code.py" in code.files  # this file imports it


@pytest.fixture(scope="module")
def project_copy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("project")
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, root / package, ignore=lambda d, names: [
            n for n in names if not (n.endswith(".py") or (Path(d) / n).is_dir()) or n == "__pycache__"])
    return root


def _stage_versions(root: Path) -> dict[str, str]:
    return {name: function_code(spec.fn, root).version for name, spec in SPECS.items()}


@pytest.mark.parametrize(("edited", "old", "stale"), [
    # The training loop: the training stages; the curated pool, its embeddings and evaluation stay.
    ("training/module.py", None, {"pretrain", "pretrain_highres", "distill"}),
    # Rebalancing: itself and the corpus (which reads its output's name); downloads, safety filters, descriptors
    # and embeddings stay.
    ("curation/rebalance.py", None, {"rebalance", "corpus"}),
    # The k-NN protocol: evaluation, and the embeddings (flows/models.py builds the embedder and the evaluated
    # models; a module is read whole).
    ("evaluation/knn.py", None, {"embed", "evaluate"}),
    # The console's run history (`lvd status`): nothing a stage computes.
    ("infra/history.py", None, set()),
    # The downloader: ingest and the stages whose code imports it.
    ("curation/netguard.py", None, {"ingest", "nsfw", "faces"}),
    # One stage's function in the module that defines them all: that stage only.
    ("flows/stages.py", "    return ingest(ctx.cfg.data,", {"ingest"}),
    # Shared by every stage: the stage runner.
    ("infra/stage.py", None, set(SPECS)),
])
def test_an_edit_makes_stale_only_the_stages_whose_code_reaches_it(project_copy, edited, old, stale):
    before = _stage_versions(project_copy)
    assert before == {name: spec.code().version for name, spec in SPECS.items()}  # the copy is the project
    path = project_copy / edited
    text = path.read_text()
    assert old is None or old in text
    try:
        path.write_text(text + "\n# an edit\n" if old is None else text.replace(old, f"    # an edit\n{old}"))
        after = _stage_versions(project_copy)
    finally:
        path.write_text(text)
    assert {n for n in SPECS if after[n] != before[n]} == stale


def test_each_stage_reaches_the_modules_that_compute_it():
    def files(stage: str) -> set[str]:
        return set(SPECS[stage].code().files)
    assert {"curation/ingest.py", "curation/netguard.py", "flows/fanout.py", "infra/storage.py"} <= files("ingest")
    assert not any(f.startswith(("training/", "evaluation/")) for f in files("ingest"))
    assert {"curation/nsfw.py", "curation/models/open_nsfw.py"} <= files("nsfw")
    assert {"curation/embed.py", "flows/models.py", "training/vision_transformer.py"} <= files("embed")
    # `python -m training.pretrain` runs in processes of their own; the stage function imports the module too.
    assert {"training/pretrain.py", "training/module.py", "training/meta_arch.py", "flows/export.py"} <= files("pretrain")
    assert {"evaluation/knn.py", "evaluation/linear.py"} <= files("evaluate")
    assert module_closure(["curation.rebalance"]) >= {"curation.kmeans", "infra.stage"}


def test_a_code_version_is_the_digest_of_its_files_in_any_order():
    a = StageCode({"x.py": "1", "y.py": "2"})
    assert a.version == StageCode({"y.py": "2", "x.py": "1"}).version != StageCode({"x.py": "1", "y.py": "3"}).version
    assert changed({"x.py": "1", "y.py": "2"}, {"y.py": "3", "z.py": "4"}) == ["x.py", "y.py", "z.py"]


def test_no_project_module_is_loaded_by_a_name_the_imports_do_not_show():
    """The code of a stage is read from its imports; that holds while nothing loads a project module by a computed
    name. A module started as a process (`python -m training.pretrain`, the way torchrun launches training) must be
    in the code of every stage whose code starts it."""
    for name, spec in SPECS.items():
        files = spec.code().files
        for rel in [f for f in files if "::" not in f]:
            tree = ast.parse((REPO_ROOT / rel).read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    called = ast.unparse(node.func)
                    assert called not in ("importlib.import_module", "import_module", "__import__"), (rel, called)
                if isinstance(node, ast.List | ast.Tuple):
                    items = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
                    for flag, target in pairwise(items):
                        path = module_file(target) if flag == "-m" and isinstance(target, str) else None
                        if path is not None:
                            assert path.relative_to(REPO_ROOT).as_posix() in files, (name, rel, target)


def test_changed_since_names_the_recorded_files_whose_source_differs_now(tmp_path):
    """What `lvd status` tells of a complete stage, read without importing anything."""
    from infra.code import changed_since

    _project(tmp_path, FILES)
    recorded = function_code(_fn("f"), tmp_path).files
    assert changed_since(recorded, tmp_path) == []
    _project(tmp_path, {"infra/c.py": "VALUE = 2\n", "flows/st.py": STAGE_MODULE.replace("train(ctx)", "train(1)")})
    assert changed_since(recorded, tmp_path) == ["infra/c.py"]  # g's edit is not f's code
    _project(tmp_path, {"flows/st.py": STAGE_MODULE.replace("LIMIT = 3", "LIMIT = 4")})
    (tmp_path / "infra" / "lazy.py").unlink()
    assert changed_since(recorded, tmp_path) == ["flows/st.py::f", "infra/c.py", "infra/lazy.py"]
