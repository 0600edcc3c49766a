"""Crash-and-resume harness: SIGKILL the whole `lvd` process tree at random points, resume, compare.

One reference run goes uninterrupted. Each trial starts the same configuration in a fresh run root, kills the
process group (the flow, its Prefect server, every worker) with SIGKILL after a random delay, resumes with
`lvd resume`, kills again `--kills` times in all, then resumes to the end. A trial is *identical* when its corpus
(image ids and bytes), its lineage ledger (every event, order aside) and its pretraining trajectory (every step once,
loss terms and lr within 1e-6) equal the reference's, `lvd audit` finds nothing, and every resumed pretraining
continued from the checkpoint its kill left (the run's "training_resumed" events). Pretraining checkpoints every 2 of
its 40 steps (`infra.chaos.DEFAULT_OVERRIDES`), so a kill inside it resumes from a checkpoint.

    python bench/chaos.py --trials 20 [--kills 1] [--cold-prefect] [--config configs/tiny.yaml] [overrides ...]

Prints one line per trial, `K/N kills landed mid-run` (and how many inside pretraining, resumed from a checkpoint)
and `N/T identical`. Exit status 0 only when every trial is identical.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.chaos import DEFAULT_OVERRIDES, environment, reference, trial  # noqa: E402


def _resumed_at(step: int | None) -> str:
    return ", no checkpoint yet" if step is None else f", resumed from the step-{step} checkpoint"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--kills", type=int, default=1, help="SIGKILLs per trial before the final resume")
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("--cold-prefect", action="store_true",
                   help="a fresh PREFECT_HOME per trial: Prefect creates and migrates its database inside the kill "
                        "window (the default shares one, migrated by the reference run)")  # fmt: skip
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    overrides = DEFAULT_OVERRIDES + args.overrides
    with tempfile.TemporaryDirectory(prefix="lvd-chaos-") as tmp:
        work = args.workdir or Path(tmp)
        env = environment(work / "prefect-home")
        ref, duration = reference(args.config, overrides, work / "reference", env)
        print(f"reference: {len(ref.corpus)} corpus images, {ref.n_events} ledger events, {duration:.0f} s", flush=True)
        identical, landed, horizon, in_pretrain, from_checkpoint = 0, 0, duration, 0, 0
        for i in range(args.trials):
            delays = [rng.uniform(0.0, horizon) for _ in range(args.kills)]
            trial_env = environment(work / f"prefect-home-{i:02d}") if args.cold_prefect else env
            res = trial(args.config, overrides, work / f"trial-{i:02d}", trial_env, delays, 4 * duration)
            # Every resume of pretraining continued from the checkpoint a kill left (the run's "training_resumed"
            # events against the checkpoints read after the kills; a process killed before it reached pretraining
            # makes the next one log the same step again, hence sets).
            elsewhere = set(res.training_resumed) != {step for step in res.resumed_from if step is not None}
            same = res.snapshot.same_as(ref) and not res.problems and not elsewhere
            identical += same
            what = "identical" if same else ", ".join(
                [w for w, bad in (("corpus differs", res.snapshot.corpus != ref.corpus),
                                  ("ledger differs", res.snapshot.ledger != ref.ledger),
                                  ("training differs", not res.snapshot.same_training(ref)),
                                  (f"training resumed at {res.training_resumed}", elsewhere)) if bad] + res.problems[:3])
            resumed = iter(res.resumed_from)
            kills = ", ".join(f"{d:.1f}s ({stage}{_resumed_at(next(resumed)) if stage == 'pretrain' else ''})"
                              for d, stage in zip(delays, res.killed_in, strict=True))
            print(f"trial {i:2d}: killed at {kills}: {what}", flush=True)
            landed += sum(stage != "finished" for stage in res.killed_in)
            in_pretrain += len(res.resumed_from)
            from_checkpoint += sum(step is not None for step in res.resumed_from)
            if res.finished_after is not None:  # a warm run is faster than the reference: aim inside it
                horizon = min(horizon, 0.9 * res.finished_after)
        print(f"{landed}/{args.trials * args.kills} kills landed mid-run ({in_pretrain} inside pretraining, "
              f"{from_checkpoint} of them resumed from a checkpoint)")
        print(f"{identical}/{args.trials} identical")
    return 0 if identical == args.trials else 1


if __name__ == "__main__":
    raise SystemExit(main())
