"""The one configuration schema of the pipeline, and how it is loaded, overridden, validated and hashed."""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path, PurePath
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from infra.config.base import Section
from infra.config.curation import CorpusConfig, DedupConfig, EmbedConfig, RebalanceConfig, RetrieveConfig
from infra.config.data import DataConfig, DemoConfig
from infra.config.evaluate import EvaluateConfig
from infra.config.ingest import FacesConfig, IngestConfig, NsfwConfig
from infra.config.run import RunConfig
from infra.config.train import TrainConfig


class PipelineConfig(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    demo: DemoConfig = Field(default_factory=DemoConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    nsfw: NsfwConfig = Field(default_factory=NsfwConfig)
    faces: FacesConfig = Field(default_factory=FacesConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    rebalance: RebalanceConfig = Field(default_factory=RebalanceConfig)
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)

    @model_validator(mode="after")
    def _face_boxes_survive_resizing(self) -> PipelineConfig:
        if self.data.face_boxes_col and self.ingest.resize_mode in ("center_crop", "border"):
            raise ValueError(f"data.face_boxes_col: boxes relative to the original image stay valid under "
                             f"ingest.resize_mode keep_ratio, keep_ratio_largest or no, not {self.ingest.resize_mode}")
        return self


# A password in a URL's user info (a Path value keeps one slash of `scheme://`), or a query parameter carrying a secret.
_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*:/{1,2})([^/\s:@]*):([^/\s@]+)@", re.IGNORECASE)
_SECRET_PARAM = re.compile(r"([?&](?:access_token|token|api_key|apikey|key|password|passwd|secret|sig|signature|"
                           r"x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&#\s]+", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the credentials of any URL in it replaced by ``***``."""
    return _SECRET_PARAM.sub(r"\1***", _USERINFO.sub(r"\1\2:***@", text))


def credential_problems(tree: Any, path: str = "") -> list[str]:
    """Every value of a (raw) config tree that embeds a credential in a URL. The resolved configuration is written into
    the run directory (and hashed into the run id), so secrets must come from the environment or settings instead."""
    if isinstance(tree, Mapping):
        return [p for k, v in tree.items() for p in credential_problems(v, f"{path}.{k}" if path else str(k))]
    if isinstance(tree, list | tuple):
        return [p for i, v in enumerate(tree) for p in credential_problems(v, f"{path}.{i}")]
    text = str(tree) if isinstance(tree, str | Path) else ""
    if redact(text) == text:
        return []
    return [f"{path}: a credential inside a URL ({redact(text)}) would be written into the run directory's "
            "config.yaml; give it through the environment or the tool's own settings (e.g. PREFECT_API_KEY, "
            "AWS_SECRET_ACCESS_KEY, ~/.netrc, a Dask security config) and leave it out of the URL"]


class ConfigError(ValueError):
    """Every problem of a configuration, listed at once (credentials inside URLs redacted)."""

    def __init__(self, problems: list[str], source: str = "configuration", verdict: str = "is invalid"):
        problems = [redact(p) for p in problems]
        self.problems = problems
        body = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{source} {verdict} ({len(problems)} problem{'s' * (len(problems) != 1)}):\n{body}")


def deep_merge(base: dict[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into a copy of ``base``; mappings merge recursively, everything else replaces."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml where PyYAML has it


def parse_yaml(text: str) -> Any:
    """``yaml.safe_load`` through libyaml's C parser when available: ~5x faster on a run's config.yaml, which a run
    reads ~40 times (stage cache keys and contexts, the report): 1.7 s of a cached run's 26 s in pure Python."""
    return yaml.load(text, Loader=_YAML_LOADER)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML overlay; a top-level ``base:`` (path or list of paths, relative to the file) is merged first."""
    path = path.resolve()
    if path in seen:
        raise ConfigError([f"base chain loops back to {path}"], str(path))
    if not path.is_file():
        raise ConfigError([f"config file not found: {path}"], str(path))
    try:
        data = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError([f"not valid YAML: {err}"], str(path)) from err
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], str(path))
    bases = data.pop("base", None) or []
    merged: dict[str, Any] = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = deep_merge(merged, _read_yaml(path.parent / base, (*seen, path)))
    return deep_merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``train.max_steps=50`` -> (["train", "max_steps"], 50). Values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError([f"override {text!r} is not of the form key.path=value"])
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError([f"override {text!r} has an empty key"])
    try:
        value = parse_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


def _set_path(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = node[int(part)]
            continue
        nxt = node.get(part)
        if nxt is None:
            nxt = [] if parts[i + 1].isdigit() else {}
            node[part] = nxt
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        if e["type"] == "extra_forbidden":
            problems.append(f"{loc}: unknown key")
        else:
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) else f" (got {got!r})"
            problems.append(f"{loc}: {e['msg'].removeprefix('Value error, ')}{shown}")
    return problems


def validate(tree: Mapping[str, Any], source: str = "configuration") -> PipelineConfig:
    problems = credential_problems(tree)
    try:
        cfg = PipelineConfig.model_validate(dict(tree))
    except ValidationError as err:
        raise ConfigError(problems + _format_errors(err), source) from None
    if problems:
        raise ConfigError(problems, source)
    return cfg


def load_config(path: Path | str | None = None, overrides: Iterable[str] = ()) -> PipelineConfig:
    """Defaults in code <- YAML file (and its ``base:`` chain) <- dotted overrides; validated once, all errors at once."""
    tree = PipelineConfig().model_dump(mode="json")
    source = "defaults"
    if path is not None:
        tree = deep_merge(tree, _read_yaml(Path(path)))
        source = str(path)
    problems = []
    for text in overrides:
        try:
            parts, value = parse_override(text)
            _set_path(tree, parts, value)
        except ConfigError as err:
            problems.extend(err.problems)
        except (IndexError, ValueError, TypeError, AttributeError):
            problems.append(f"override {text!r} does not address a config entry")
    try:
        cfg = validate(tree, source)
    except ConfigError as err:
        problems.extend(err.problems)
    if problems:
        raise ConfigError(problems, source)
    return cfg


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


# How a curation stage executes, not what it computes: outside the stages' keys (config_hash of sections), so a run
# that changes them reuses (links) what another run computed, and `lvd resume` may change them (infra.runs).
# Threads and processes do not change what a shard produces; nor does the planner's chunking of the URL list or its
# spill buckets. (The training stages' share is `train.EXECUTION_KEYS`.)
EXECUTION_KEYS = ("ingest.threads", "ingest.processes", "ingest.chunk_rows", "ingest.url_dedup_buckets",
                  "nsfw.threads", "faces.threads", "dedup.descriptor.threads", "embed.decode_threads")  # fmt: skip


def _without_execution(dumped: dict[str, Any]) -> dict[str, Any]:
    for key in EXECUTION_KEYS:
        *parents, leaf = key.split(".")
        node = dumped
        for part in parents:
            node = node[part]
        node.pop(leaf, None)
    return dumped


def select(cfg: PipelineConfig, paths: Iterable[str], dumped: dict[str, Any] | None = None) -> dict[str, Any]:
    """The named parts of the config as JSON-able data; a path is a section or a dotted key ("run.seed")."""
    dumped = cfg.model_dump(mode="json") if dumped is None else dumped
    out = {}
    for path in sorted(paths):
        node: Any = dumped
        for part in path.split("."):
            node = node[part]
        out[path] = node
    return out


def config_hash(cfg: PipelineConfig, paths: Iterable[str] | None = None) -> str:
    """sha256 of the canonical JSON of the named sections or dotted keys, without :data:`EXECUTION_KEYS` (a stage's
    configuration); the whole config, those included, when None (a run's)."""
    data = cfg.model_dump(mode="json") if paths is None else select(cfg, paths, _without_execution(
        cfg.model_dump(mode="json")))
    return hashlib.sha256(canonical_json(data).encode()).hexdigest()


def absolute_paths(cfg: PipelineConfig, base: Path | None = None) -> PipelineConfig:
    """A copy of ``cfg`` whose every path is absolute: a relative one is taken from ``base`` (default: the working
    directory of the command that gave it), ``~`` is expanded and ``..`` resolved. A run's saved configuration then
    names the same files whatever directory ``lvd resume`` is typed in, and on every worker of a Dask or Ray cluster
    (whose working directory is its own)."""
    base = Path.cwd() if base is None else Path(base)
    out = cfg.model_copy(deep=True)
    _absolute_section(out, base)
    return out


def path_values(cfg: PipelineConfig) -> dict[str, str]:
    """Every path of ``cfg`` by its dotted key (``data.seed_sets.0.path``), as written."""
    out: dict[str, str] = {}

    def walk(value: Any, key: str) -> None:
        if isinstance(value, PurePath):
            out[key] = str(value)
        elif isinstance(value, Section):
            for name in type(value).model_fields:
                walk(getattr(value, name), f"{key}.{name}" if key else name)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, f"{key}.{i}")

    walk(cfg, "")
    return out


def _absolute(value: Any, base: Path) -> Any:
    if isinstance(value, PurePath):
        return Path(os.path.normpath(base / Path(value).expanduser()))  # (base / an absolute path: that path)
    if isinstance(value, Section):
        _absolute_section(value, base)
        return value
    if isinstance(value, list):
        return [_absolute(item, base) for item in value]
    return value


def _absolute_section(section: Section, base: Path) -> None:
    for name in type(section).model_fields:
        value = getattr(section, name)
        new = _absolute(value, base)
        if new != value:
            setattr(section, name, new)
