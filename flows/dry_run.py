"""What `lvd run` or `lvd resume` would compute, and why, without computing or writing anything (`--dry-run`).

Each stage the configuration runs is, in pipeline order: complete (reused as it is), complete in another run under the
same root (linked), partly done (resumed: shards, k-means steps or a training checkpoint kept), computed for the first
time, or computed again, with what changed since (`infra.stage.why_again`: configuration, code files, upstream
stages, outside files). A stage after one that will be computed cannot be keyed before that one's outputs exist:
it is shown as waiting, complete now or not, since a stage computed again whose outputs come out the same leaves it
complete (`StageManifest.digest`).
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.resume_points import stage_progress
from flows.stages import active_stages, missing_exports, training_stages
from infra import plan
from infra.config import PipelineConfig
from infra.manifest import StageManifest, cache_key, read_manifest
from infra.run import RunDir
from infra.stage import KEY_FILE, completed_elsewhere, why_again
from infra.storage import read_json


@dataclass(frozen=True)
class Planned:
    stage: str
    action: str  # "reuse" | "link" | "resume" | "compute" | "wait"
    detail: str


def dry_run(run: RunDir, cfg: PipelineConfig) -> list[Planned]:
    out: list[Planned] = []
    computed: set[str] = set()  # stages this run would compute: what follows them waits for their outputs
    manifests: dict[str, StageManifest] = {}  # the others': this run's, or the run's they would be linked from
    for spec in active_stages(cfg):
        stage_dir = run.stage_dir(spec.name)
        existing = read_manifest(stage_dir)
        waits = [u for u in spec.upstream if u in computed]
        if waits:  # its key needs their outputs; its own configuration and code are known now
            after = ", ".join(waits)
            own = existing is not None and why_again(spec, stage_dir, existing, (
                *spec.key_parts_own(cfg), existing.inputs_digest), {"code": spec.code().files})
            detail = (f"{own} (and runs after {after})" if own else
                      f"after {after}: complete now; computed again only if the outputs of {after} change"
                      if existing is not None else f"after {after}: computed")
            out.append(Planned(spec.name, "compute" if own else "wait", detail))
            computed.add(spec.name)
            continue
        upstream = {u: manifests[u] for u in spec.upstream}
        parts = spec.key_parts(cfg, upstream)
        key = cache_key(spec.name, *parts)
        if existing is not None and existing.key == key:
            exports = missing_exports(run, cfg, spec.name) if spec.name in training_stages(cfg) else []
            more = f" ({', '.join(exports)} export{'s' if len(exports) > 1 else ''} to write)" if exports else ""
            out.append(Planned(spec.name, "reuse", f"complete: reused{more}"))
            manifests[spec.name] = existing
            continue
        donor = completed_elsewhere(run, spec.name, key) if cfg.run.reuse_runs else None
        if donor is not None:
            out.append(Planned(spec.name, "link", f"completed by run {donor.run_id}: its outputs are linked"))
            manifests[spec.name] = read_manifest(donor.stage_dir(spec.name))
            continue
        computed.add(spec.name)
        why = why_again(spec, stage_dir, existing, parts, spec.key_detail(cfg, upstream))
        if why:
            key_file = stage_dir / KEY_FILE
            salvaged = spec.salvage and key_file.is_file() and read_json(key_file).get("base") == spec.base_key(cfg, upstream)
            taken = "; its shards whose inputs are unchanged are taken over" if salvaged else ""
            out.append(Planned(spec.name, "compute", why + taken))
        elif existing is None and stage_dir.is_dir() and (kept := stage_progress(run, spec.name)):
            out.append(Planned(spec.name, "resume", f"resumed: {kept}"))
        else:
            out.append(Planned(spec.name, "compute", "computed"))
    return out


def not_run(cfg: PipelineConfig) -> list[Planned]:
    """The stages of the pipeline this configuration does not run, and why (`infra.plan`)."""
    return [Planned(stage, "skip", f"not run: {why}") for stage, why in plan.not_run(cfg).items()]


def describe(plan: list[Planned]) -> str:
    width = max((len(p.stage) for p in plan), default=0)
    return "\n".join(f"{p.stage:<{width}}  {p.detail}" for p in plan)
