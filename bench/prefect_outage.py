"""The Prefect API server going away mid-run: `lvd run` must still exit within a bound, saying why, and once the server
is back `lvd resume` must complete and `lvd audit` be clean.

1. `prefect server start` on a free 127.0.0.1 port (its own PREFECT_HOME), until /api/health answers;
2. `lvd run CONFIG` with PREFECT_API_URL pointing at it; once the run's event log shows stage `--kill-after` completed,
   the server's process group is SIGKILLed;
3. the run goes on without the server (Prefect's semantics); measured: seconds from the kill, and from the end of the
   flow's own work (its `flow_completed` or `failed` event in events.jsonl), to the process exit; its exit status and
   message. It fails when the process is still running `--bound` seconds after that end (or `--timeout` after the
   kill);
4. the server restarts (same database and port), then `lvd resume RUN_ID` and `lvd audit RUN_ID` must exit 0.

    python bench/prefect_outage.py [--config configs/tiny.yaml] [--kill-after ingest] [--bound 120] [overrides ...]

Too slow for CI (a whole tiny run plus two server starts); `tests/infra/test_prefect_outage.py` covers the bound.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from infra.chaos import kill_tree, run_id_of  # noqa: E402
from infra.demo.server import free_port  # noqa: E402
from infra.run import RunDir  # noqa: E402


def start_server(port: int, env: dict[str, str], log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui",
           "--analytics-off"]
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health",
                                                                  timeout=2) as response:
            if response.status == 200:
                return proc
        if proc.poll() is not None:
            raise RuntimeError(f"prefect server exited with {proc.returncode}; see {log}")
        time.sleep(0.5)
    kill_tree(proc)
    raise RuntimeError(f"prefect server did not answer within 300 s; see {log}")


def lvd(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def events(root: Path) -> list[dict]:
    runs = [p.name for p in root.iterdir() if (p / "events.jsonl").is_file()] if root.is_dir() else []
    return RunDir(root, runs[0]).events() if runs else []


def completed(root: Path, stage: str) -> bool:
    return any(e.get("event") in ("completed", "skipped") and e.get("stage") == stage for e in events(root))


def flow_ended(root: Path) -> bool:
    return any(e.get("event") in ("flow_completed", "failed") for e in events(root))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "tiny.yaml")
    p.add_argument("--kill-after", default="ingest", help="kill the server once this stage has completed")
    p.add_argument("--bound", type=float, default=120.0, help="max seconds from the end of the flow's work to the exit")
    p.add_argument("--timeout", type=float, default=1800.0, help="max seconds from the kill to the exit")
    p.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed at the end")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lvd-outage-") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        root, port = work / "runs", free_port()
        env = {**os.environ, "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               "PYTHONPATH": str(REPO), "NO_ALBUMENTATIONS_UPDATE": "1"}
        env.pop("PREFECT_API_URL", None)
        client_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api"}
        server_log, run_log = work / "server.log", work / "lvd.log"

        t0 = time.monotonic()
        server = start_server(port, env, server_log)
        print(f"server up on port {port} after {time.monotonic() - t0:.0f} s", flush=True)
        t_start = time.monotonic()
        proc = lvd(["run", str(args.config), f"run.root={root}", *args.overrides], client_env, run_log)
        while not completed(root, args.kill_after) and proc.poll() is None:
            time.sleep(0.2)
        if proc.poll() is not None:
            print(f"FAIL: the run ended (exit {proc.returncode}) before stage {args.kill_after} completed; see {run_log}")
            return 1
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        t_kill = time.monotonic()
        print(f"server killed {t_kill - t_start:.0f} s into the run, after stage {args.kill_after}", flush=True)

        t_end = None
        while proc.poll() is None:
            now = time.monotonic()
            if t_end is None and flow_ended(root):
                t_end = now
                print(f"the flow's work ended {t_end - t_kill:.0f} s after the kill", flush=True)
            if (t_end is not None and now - t_end > args.bound) or now - t_kill > args.timeout:
                kill_tree(proc)
                print(f"FAIL: still running {now - t_kill:.0f} s after the kill"
                      + (f", {now - t_end:.0f} s after the flow's work ended" if t_end else "") + f"; see {run_log}")
                return 1
            time.sleep(0.2)
        t_exit = time.monotonic()
        t_end = t_end or t_exit
        tail = run_log.read_text(errors="replace").strip().splitlines()[-3:]
        print(f"lvd run exited with status {proc.returncode}: {t_exit - t_kill:.0f} s after the kill, "
              f"{t_exit - t_end:.0f} s after the flow's work ended")
        print("  last lines:\n  " + "\n  ".join(line[:300] for line in tail), flush=True)

        server = start_server(port, env, server_log)
        run_id = run_id_of(root)
        try:
            t_resume = time.monotonic()
            resume = lvd(["resume", run_id, "--root", str(root)], client_env, run_log)
            resume.wait(timeout=1800)
            print(f"lvd resume: exit {resume.returncode} after {time.monotonic() - t_resume:.0f} s", flush=True)
            audit = lvd(["audit", run_id, "--root", str(root)], client_env, run_log)
            audit.wait(timeout=600)
            print(f"lvd audit: exit {audit.returncode}")
        finally:
            kill_tree(server)
        ok = resume.returncode == 0 and audit.returncode == 0
        print("OK" if ok else f"FAIL: see {run_log}")
        return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
