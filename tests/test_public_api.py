"""The public door: ``graphexec/__init__.py``, its ``__all__`` and its docstrings."""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pickle

import pytest

import graphexec as gx

# What SPEC §1-§3 promises; later issues may add names, never remove these.
REQUIRED = {
    "Graph",
    "Node",
    "Task",
    "task",
    "allow_failure",
    "unmapped",
    "exponential_backoff",
    "Pool",
    "Run",
    "State",
    "Attempt",
    "Observer",
    "observe",
    "GraphexecError",
    "GraphFailed",
    "TaskFailure",
    "WorkerCrashed",
    "TaskTimeout",
    "MemoryLimitExceeded",
    "SerializationError",
    "RemoteError",
    "UpstreamFailed",
    "Cancelled",
    "Terminated",
    "ResultReleased",
}

# Classes whose public members are documented API (SPEC §1-§3).
DOCUMENTED_CLASSES = ("Graph", "Node", "Task", "Run", "State", "Attempt")

# Pool methods that form the executor protocol the scheduler calls (see _call).
EXECUTOR_PROTOCOL = {"submit", "poll", "cancel_running"}


def _public_names(module):
    # dir(), not vars(): some names load on first use (graphexec's __getattr__, PEP 562).
    return {
        name
        for name in dir(module)
        if not name.startswith("_") and not inspect.ismodule(getattr(module, name))
    }


def test_all_matches_the_exported_names():
    assert len(gx.__all__) == len(set(gx.__all__)), "duplicates in __all__"
    assert set(gx.__all__) == _public_names(gx)


def test_required_names_are_exported():
    assert set(gx.__all__) >= REQUIRED


def test_star_import_gives_exactly_all():
    namespace: dict = {}
    exec("from graphexec import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(gx.__all__)


def test_implementation_lives_in_private_modules():
    for name in gx.__all__:
        module = getattr(gx, name).__module__
        assert module.startswith("graphexec._"), f"{name} is defined in {module}"
    assert gx.__version__


@pytest.mark.parametrize("name", sorted(gx.__all__))
def test_every_public_name_has_a_docstring(name):
    obj = getattr(gx, name)
    doc = inspect.getdoc(obj)
    assert doc and doc.strip(), f"gx.{name} has no docstring"
    if isinstance(obj, type) and issubclass(obj, BaseException):
        # an exception's docstring must not be just the inherited one
        assert obj.__doc__ is not None and obj.__doc__ is not BaseException.__doc__


def _undocumented_members(cls, skip=frozenset()):
    missing = []
    for name, value in vars(cls).items():
        if name.startswith("_") or name in skip:
            continue
        if isinstance(value, (staticmethod, classmethod)):
            value = value.__func__
        documentable = isinstance(value, property) or callable(value)
        if documentable and not (value.__doc__ or "").strip():
            missing.append(f"{cls.__name__}.{name}")
    return missing


@pytest.mark.parametrize("name", DOCUMENTED_CLASSES)
def test_public_members_of_api_classes_have_docstrings(name):
    assert _undocumented_members(getattr(gx, name)) == []


def test_pool_public_members_have_docstrings():
    assert _undocumented_members(gx.Pool, EXECUTOR_PROTOCOL) == []


def test_key_entry_points_document_args_and_examples():
    for obj in (gx.task, gx.Graph, gx.Graph.compute, gx.Pool, gx.exponential_backoff):
        doc = inspect.getdoc(obj)
        assert "Example" in doc or "Args" in doc, obj
    compute_doc = inspect.getdoc(gx.Graph.compute)
    for argument in (
        "targets",
        "workers",
        "scheduler",
        "fail_fast",
        "raise_on_failure",
        "keep",
        "pool",
    ):
        assert argument in compute_doc


def test_exception_hierarchy():
    assert issubclass(gx.GraphFailed, gx.GraphexecError)
    for kind in (
        gx.WorkerCrashed,
        gx.TaskTimeout,
        gx.MemoryLimitExceeded,
        gx.SerializationError,
        gx.RemoteError,
    ):
        assert issubclass(kind, gx.TaskFailure)
        assert issubclass(kind, gx.GraphexecError)
    assert issubclass(gx.RemoteError, gx.SerializationError)  # stage "exception"
    assert issubclass(gx.TaskTimeout, TimeoutError)
    assert issubclass(gx.MemoryLimitExceeded, MemoryError)
    assert issubclass(gx.ResultReleased, KeyError)
    for kind in (gx.UpstreamFailed, gx.Cancelled, gx.ResultReleased):
        assert issubclass(kind, gx.GraphexecError)


@pytest.mark.parametrize(
    "error",
    [
        gx.UpstreamFailed("skipped", node="b-0", upstream="a-0"),
        gx.Cancelled("cancelled", node="c-0"),
        gx.WorkerCrashed("died", node="w-0", exitcode=-9, signal_name="SIGKILL"),
        gx.TaskTimeout("slow", node="t-0", timeout=1.5),
        gx.RemoteError("gone", node="r-0", type_name="m.E", original_message="x"),
        gx.ResultReleased("freed"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_errors_pickle_with_their_attributes(error):
    clone = pickle.loads(pickle.dumps(error))
    assert type(clone) is type(error)
    assert str(clone) == str(error)
    assert clone.__dict__ == error.__dict__


def test_states_pickle_and_keep_their_meaning():
    graph = gx.Graph()
    with graph:
        a = gx.task(lambda: 1)()
        b = gx.task(lambda x: x + 1)(a)
        bad = gx.task(lambda: 1 / 0)()
        gx.task(lambda x: x)(bad)
    run = graph.compute(workers=0, raise_on_failure=False)
    for node in (a, b, bad):
        clone = pickle.loads(pickle.dumps(run.state(node)))
        original = run.state(node)
        assert clone.name == original.name
        assert clone.is_completed() == original.is_completed()
        assert clone.is_failed() == original.is_failed()
        assert clone.released == original.released
        assert clone.attempts == original.attempts
    assert pickle.loads(pickle.dumps(run.state(b))).result() == 2
    with pytest.raises(gx.ResultReleased):
        pickle.loads(pickle.dumps(run.state(a))).result()


LAYERS = ("_model", "_data", "_executors", "_engine", "_surfaces")


def test_the_folder_list_shows_the_layers():
    package = pathlib.Path(gx.__file__).parent
    folders = sorted(
        p.name for p in package.iterdir() if p.is_dir() and (p / "__init__.py").exists()
    )
    assert folders == sorted(LAYERS)
    loose = sorted(p.name for p in package.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "_version.py"] or loose == [
        "__init__.py",
        "_version.py",
    ]


def test_every_private_module_says_what_it_holds():
    package = pathlib.Path(gx.__file__).parent
    for path in sorted(package.rglob("*.py")):
        module = ".".join(("graphexec", *path.relative_to(package).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        doc = importlib.import_module(module).__doc__
        assert doc and doc.strip(), f"{module} has no module docstring"
