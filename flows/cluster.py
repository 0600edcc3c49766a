"""A Dask or Ray cluster given by address (`run.dask_address`, `run.ray_address`), checked before any stage runs.

The shards of ingest, NSFW, faces, the dedup stage's descriptors and the embeddings run on the cluster's workers,
which read and write the run's folder and read the images and model files by the paths the flow gives them, and
run their own copy of this project's code. A worker on another machine that does not mount the run's storage failed
only once ingest had planned (``FileNotFoundError: .../plan/inputs/00000.parquet``); a worker started before the
code was edited, or from another checkout, would compute shards with other code than the stage's key records, and
nothing would say so. Here every worker is asked, before the run starts, what it sees:

- the run's folder: a file the flow writes there (a random token) must read back the same on the worker, and the
  worker must be able to create a file beside it;
- the images and model files its shards read (`ingest.local_roots`, the NSFW, face, SSCD and embedding models, the
  seed and evaluation sets), by the same paths: present, and the same size;
- the same code: the digest of the project's source files, and no project module loaded before its file changed
  (a long-lived worker keeps the code it imported);
- the same Python and versions of the libraries that compute (torch, numpy, onnxruntime, FAISS, Pillow, ...).

Each problem names the worker (host and address) and the fix. The check costs a connection and one small function
per worker (about a second); a cluster that cannot be reached, or has no worker, is refused with the address.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import logging
import os
import secrets
import socket
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.code import PACKAGES, REPO_ROOT, file_digest
from infra.config import PipelineConfig
from infra.config.run import RunConfig
from infra.config.schema import path_values

# The stages whose shards run on the cluster's workers (flows.stages: prefect_mapper).
FANNED_OUT = frozenset({"ingest", "nsfw", "faces", "dedup", "embed"})
# The configuration sections whose files those shards read.
WORKER_INPUTS = ("ingest.local_roots", "nsfw.", "faces.", "dedup.", "embed.", "data.seed_sets", "data.eval_sets")
# Distributions whose version changes what a shard computes or writes.
LIBRARIES = ("torch", "numpy", "onnxruntime", "faiss-cpu", "faiss-gpu", "pillow", "pillow-simd", "opencv-python",
             "opencv-python-headless", "pyarrow", "img2dataset", "webdataset", "timm", "facenet-pytorch", "prefect")
PROBE = ".lvd-cluster-probe-"
CONNECT_TIMEOUT_S = 15.0


def code_digest(root: Path = REPO_ROOT) -> str:
    """sha256 of the project's source files (path and content), as this process finds them on disk (each file read
    once per version: `infra.code.file_digest`)."""
    h = hashlib.sha256()
    for package in sorted(PACKAGES):
        for path in sorted((root / package).rglob("*.py")):
            h.update(f"{path.relative_to(root).as_posix()}:{file_digest(path)}\n".encode())
    return h.hexdigest()[:16]


def stale_modules(root: Path = REPO_ROOT) -> list[str]:
    """Project modules this process imported before their file changed: it runs other code than its files say (a
    long-lived worker keeps the code it imported). A module whose file changed after the process started is compiled
    again and compared with what is loaded: every function's code and constants, and the module's literal constants;
    an edit that changes no code (a comment) does not count."""
    import psutil

    started = psutil.Process().create_time()
    stale = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or name.partition(".")[0] not in PACKAGES or not file.endswith(".py"):
            continue
        try:
            path = Path(file).resolve()
            if path.is_relative_to(root) and path.stat().st_mtime > started and _differs(module, path):
                stale.append(path.relative_to(root).as_posix())
        except (OSError, SyntaxError, ValueError):
            continue
    return sorted(stale)


def _signature(code: types.CodeType) -> tuple[Any, ...]:
    consts = tuple(_signature(c) if isinstance(c, types.CodeType) else repr(c) for c in code.co_consts)
    return code.co_code, consts, code.co_names


def _functions(module: types.ModuleType) -> dict[str, types.CodeType]:
    """The code of the functions and methods ``module`` defines, by qualified name (decorators unwrapped)."""
    out: dict[str, types.CodeType] = {}

    def add(obj: Any) -> None:
        for _ in range(4):  # functools.wraps / cache, Prefect's task and flow objects
            obj = getattr(obj, "__wrapped__", None) or getattr(obj, "fn", None) or obj
        code = getattr(obj, "__code__", None)
        if isinstance(code, types.CodeType) and getattr(obj, "__module__", None) == module.__name__:
            out[code.co_qualname] = code

    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == module.__name__:
            for member in vars(value).values():
                add(getattr(member, "__func__", member))
        else:
            add(value)
    return out


def _differs(module: types.ModuleType, path: Path) -> bool:
    source = path.read_text()
    compiled: dict[str, tuple[Any, ...]] = {}
    pending = [compile(source, str(path), "exec")]
    while pending:
        code = pending.pop()
        compiled[code.co_qualname] = _signature(code)
        pending += [c for c in code.co_consts if isinstance(c, types.CodeType)]
    if any(compiled.get(q) != _signature(c) for q, c in _functions(module).items()):
        return True
    for node in ast.parse(source).body:  # NAME = literal at module level
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            simple = isinstance(value, int | float | str | bytes | tuple | None)
            if simple and name in vars(module) and vars(module)[name] != value:
                return True
    return False


def require_worker(expected: dict[str, Any]) -> None:
    """On a worker, before a shard: raise unless it is what the start-up check asked of the workers present then (a
    worker that joined later, e.g. by autoscaling, or was restarted): it runs the code whose digest is
    ``expected["code"]`` (the files on disk, and no module imported before its file changed), sees the runs folder
    ``expected["root"]``, and has the Python and libraries ``expected["libraries"]``. 3-4 ms once its files were read
    (docs/prefect.md)."""
    host = f"{socket.gethostname()} (pid {os.getpid()})"
    if (mine := code_digest()) != expected["code"]:
        raise RuntimeError(f"worker {host} runs other code than lvd (source digest {mine} vs {expected['code']}): "
                           "install the same checkout or version on every worker")
    if stale := stale_modules():
        raise RuntimeError(f"worker {host} imported {_some(stale)} before the file changed, and runs the older code: "
                           "restart the workers")
    if not Path(expected["root"]).is_dir():
        raise RuntimeError(f"worker {host} does not see the runs folder {expected['root']} (run.root): it must be on "
                           "storage every worker mounts at the same path")
    if versions := version_differences(libraries(), expected["libraries"]):
        raise RuntimeError(f"worker {host} has other libraries: {versions}: the same versions on every worker keep "
                           "what a stage computes the same")


def worker_expectation(run: RunConfig) -> dict[str, Any]:
    """What :func:`require_worker` checks on a worker of the cluster at ``run``'s address, as this process has it."""
    return {"code": code_digest(), "root": str(Path(run.root).absolute()), "libraries": libraries()}


def version_differences(theirs: dict[str, str], ours: dict[str, str]) -> str:
    """`numpy 1.26.4 (here 2.1.0), ...` for every version that differs; empty where none does."""
    return ", ".join(f"{name} {theirs.get(name, 'missing')} (here {ours.get(name, 'missing')})"
                     for name in sorted(ours.keys() | theirs.keys()) if theirs.get(name) != ours.get(name))


def libraries() -> dict[str, str]:
    """The Python and library versions of this process (read once per process: ~1 ms each)."""
    return dict(_libraries())


@functools.cache
def _libraries() -> dict[str, str]:
    found = {"python": sys.version.split()[0]}
    for name in LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def worker_facts(probe: str, token: str, files: dict[str, int | None]) -> dict[str, Any]:
    """What a worker sees (run on each worker): the probe file's token, whether it can write beside it, the size of
    each file (None: a folder, which must exist), its code and its libraries."""
    facts: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "code": code_digest(),
                             "stale": stale_modules(), "libraries": libraries()}
    try:
        facts["token"] = Path(probe).read_text()
    except OSError as err:
        facts["token"] = None
        facts["probe_error"] = err.strerror or type(err).__name__
    if facts["token"] == token:
        mine = Path(f"{probe}.{socket.gethostname()}.{os.getpid()}")
        try:
            mine.write_text(token)
            mine.unlink()
            facts["writable"] = None
        except OSError as err:
            facts["writable"] = err.strerror or type(err).__name__
    seen: dict[str, int | bool | None] = {}
    for path, size in files.items():
        p = Path(path)
        seen[path] = (p.stat().st_size if p.is_file() else None) if size is not None else p.is_dir()
    facts["files"] = seen
    return facts


def worker_files(cfg: PipelineConfig) -> dict[str, int | None]:
    """The existing files (path -> size) and folders (path -> None) that the fanned-out shards read."""
    out: dict[str, int | None] = {}
    for key, value in path_values(cfg).items():
        if not key.startswith(WORKER_INPUTS):
            continue
        p = Path(value)
        if p.is_file():
            out[value] = p.stat().st_size
        elif p.is_dir():
            out[value] = None
    return out


def address(run: RunConfig) -> str | None:
    """The cluster a run's shards go to by address (None: threads, or a local cluster on this machine)."""
    return run.dask_address if run.task_runner == "dask" else run.ray_address if run.task_runner == "ray" else None


def cluster_problems(cfg: PipelineConfig, run_path: Path, stages: set[str]) -> list[str]:
    """Problems of the cluster at `run.dask_address` / `run.ray_address` for a run at ``run_path`` that will compute
    ``stages`` (none where no stage fans out, or no address is given: a local cluster is this machine)."""
    where_to = address(cfg.run)
    if where_to is None or not stages & FANNED_OUT:
        return []
    key = f"run.{cfg.run.task_runner}_address"
    where = next(p for p in (Path(run_path), *Path(run_path).parents) if p.is_dir())
    token = secrets.token_hex(16)
    probe = where / f"{PROBE}{token}"
    try:
        probe.write_text(token)
    except OSError:
        return []  # an unwritable run folder is reported by infra.runs
    try:
        files = worker_files(cfg)
        answers = ask_workers(cfg.run, worker_facts, str(probe), token, files)
    except Unreachable as err:
        return [f"{key}: {where_to}: {err}"]
    finally:
        probe.unlink(missing_ok=True)
    mine = {"code": code_digest(), "libraries": libraries()}
    problems = []
    for worker, facts in sorted(answers.items()):
        problems += [f"{key}: worker {worker}: {p}" for p in _differences(facts, mine, token, where, files)]
    if not problems:
        hosts = sorted({f["host"] for f in answers.values() if isinstance(f, dict)})
        logging.getLogger("lvd").info("%s: %d worker%s on %s (%s) see the run and its files and run this code", where_to,
                                      len(answers), "s" * (len(answers) != 1), _some(hosts), cfg.run.task_runner)
    return problems


def _differences(facts: dict[str, Any] | BaseException, mine: dict[str, Any], token: str, where: Path,
                 files: dict[str, int | None]) -> list[str]:
    """A worker's problems, from its facts (or the exception it raised) and this process's: `mine` (code digest and
    libraries) and the sizes of the `files` it was asked about."""
    if isinstance(facts, BaseException):
        text = str(facts).strip().splitlines()[0] if str(facts).strip() else ""
        return [f"could not run this project's check ({type(facts).__name__}: {text[:300]}): start the workers from "
                "the environment lvd runs in (the same virtual environment, this project installed)"]
    problems = []
    if facts["token"] != token:
        why = facts.get("probe_error") or "another file"
        problems.append(f"does not see the run's folder ({where}: {why} there): the runs folder (run.root) must be on "
                        "storage every worker mounts at the same path")
    elif facts.get("writable"):
        problems.append(f"cannot write in the run's folder ({where}: {facts['writable']}): run the workers as a user "
                        "that may write there")
    missing = [p for p, seen in facts["files"].items() if seen in (None, False)]
    other = [p for p, seen in facts["files"].items() if not isinstance(seen, bool) and seen is not None
             and seen != files.get(p)]
    if missing:
        problems.append(f"does not see {_some(missing)}, which its shards read: the same paths must reach the same "
                        "files on every worker")
    if other:
        problems.append(f"sees another {_some(other)} (another size than here)")
    if facts["code"] != mine["code"]:
        problems.append(f"runs other code than this lvd (source digest {facts['code']} vs {mine['code']}): install "
                        "the same checkout or version on every worker")
    if facts["stale"]:
        problems.append(f"imported {_some(facts['stale'])} before the file changed, and runs the older code: restart "
                        "the workers")
    if versions := version_differences(facts["libraries"], mine["libraries"]):
        problems.append(f"has other libraries: {versions}: the same versions on every worker keep what a stage "
                        "computes the same")
    return problems


def _some(items: list[str], most: int = 3) -> str:
    return ", ".join(items[:most]) + (f" and {len(items) - most} more" if len(items) > most else "")


class Unreachable(Exception):
    """The cluster at the run's address cannot be reached, or has no worker."""


def ask_workers(run: RunConfig, fn: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` once on every worker of the cluster at :func:`address` (a Ray cluster: once per node), by worker
    name (host and address); an exception a worker raised is its answer."""
    where_to = address(run)
    assert where_to is not None
    return (_ask_dask if run.task_runner == "dask" else _ask_ray)(where_to, fn, args)


def _ask_dask(address: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Any]:
    from distributed import Client

    try:
        client = Client(address, timeout=CONNECT_TIMEOUT_S, set_as_default=False)
    except (OSError, TimeoutError) as err:
        raise Unreachable(f"no Dask scheduler answers there ({type(err).__name__}: {err}); start one with "
                           "`dask scheduler` and workers with `dask worker ADDRESS`, or leave run.dask_address "
                           "empty for a local cluster") from err
    try:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT_S)
        except TimeoutError as err:
            raise Unreachable(f"the scheduler has no workers (waited {CONNECT_TIMEOUT_S:.0f} s): start them with "
                               f"`dask worker {address}`") from err
        info = client.scheduler_info()["workers"]
        answers = client.run(fn, *args, on_error="return")
        return {f"{info.get(w, {}).get('host', w)} ({w})": facts for w, facts in answers.items()}
    finally:
        client.close()


def _ask_ray(address: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    fix = ("start one with `ray start --head`, or leave run.ray_address empty for a local Ray; a cluster that `ray "
           "start` said uses token authentication also needs RAY_AUTH_MODE=token in lvd's environment")
    if (refused := _refused(address)) is not None:  # ray.init retries an address nobody listens on for minutes
        raise Unreachable(f"no Ray cluster answers there ({refused}); {fix}")
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    except (ConnectionError, RuntimeError, ValueError) as err:
        raise Unreachable(f"no Ray cluster answers there ({type(err).__name__}: {err}); {fix}") from err
    try:
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        facts = ray.remote(num_cpus=0)(fn)
        refs = {f"{n.get('NodeManagerAddress')} (node {n['NodeID'][:8]})":
                facts.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(*args)
                for n in nodes}
        answers: dict[str, Any] = {}
        deadline = time.monotonic() + 60
        for name, ref in refs.items():
            try:
                answers[name] = ray.get(ref, timeout=max(1.0, deadline - time.monotonic()))
            except Exception as err:  # a node that cannot import the project, or does not answer: reported per node
                answers[name] = err
        return answers
    finally:
        ray.shutdown()


def _refused(address: str) -> str | None:
    """Why a TCP connection to ``host:port`` (``ray://host:port``) fails within a few seconds; None when it opens, or
    when the address is not of that form (``auto``)."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        return None
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as err:
        return f"{type(err).__name__}: {err.strerror or err}"
    return None
