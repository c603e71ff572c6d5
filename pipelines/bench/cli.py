"""The command line ``python -m pipelines.bench``: the device and the report file resolved before any work,
``--render-only``, and :func:`main`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from pipelines.bench import report
from pipelines.bench.measure import _log
from pipelines.bench.mlflow_runs import EXPERIMENT
from pipelines.bench.profiles import PROFILES, load_profile
from pipelines.bench.run import run_bench, write_outputs
from vtrans.errors import ConfigError, VtransError

# the report whose marked sections the published profiles rewrite (``--readme auto``), relative to the working directory
BENCHMARKS_REPORT = "pipelines/BENCHMARKS.md"


def render_only(out: Path, readme: str = "auto") -> dict:
    """Rewrite ``results.md``, the Pareto plots and the report section (``pipelines/BENCHMARKS.md``) of a finished run
    from its ``results.json`` (nothing is run or measured again; which file is updated follows the run's profile,
    overrides and experiment, as in :func:`resolve_readme`)."""
    path = Path(out) / "results.json"
    if not path.is_file():
        raise ConfigError(f"--out {str(out)!r} has no results.json: run the benchmark into it first")
    results = json.loads(path.read_text())
    target = resolve_readme(readme, results["profile"], results.get("overrides"),
                            results.get("mlflow", {}).get("experiment", EXPERIMENT))
    write_outputs(results, Path(out))
    if target is not None:
        report.update_readme(target, results)
        _log(f"updated the {results['profile']!r} results section of {target}")
    _log(f"rendered {Path(out) / 'results.md'}")
    return results


def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device must be one of ['auto', 'cpu', 'cuda'], got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: torch.cuda.is_available() is False on this machine; use --device cpu")
    return device


def resolve_readme(readme: str, profile: str, overrides: list[str] | None, experiment: str = EXPERIMENT) -> Path | None:
    """The report file the run updates, checked before any work: ``auto`` is ``./pipelines/BENCHMARKS.md`` (relative
    to the working directory: run from the repository root) for the published profiles (quick, full) run as
    published (no overrides, the ``benchmarks`` experiment) when it has the profile's markers, else nothing; an
    explicit path must exist and have them."""
    if readme == "none":
        return None
    if readme == "auto":
        path = Path(BENCHMARKS_REPORT)
        if profile not in ("quick", "full") or overrides or experiment != EXPERIMENT or not path.is_file():
            return None
        return path.resolve() if report.has_readme_markers(path.read_text(), profile) else None
    path = Path(readme).expanduser()
    if not path.is_file():
        raise ConfigError(f"--readme must be an existing file, 'auto' or 'none', got {readme!r}")
    if not report.has_readme_markers(path.read_text(), profile):
        start, end = report.readme_markers(profile)
        raise ConfigError(f"--readme {readme!r} has no {start} ... {end} section for profile {profile!r}")
    return path.resolve()


def _quiet_logs() -> None:
    """Log lines, not carriage-return bars (here and in the Ray workers), and every cell's line from Ray."""
    import transformers

    from pipelines.ray_runtime import worker_env

    os.environ.update(worker_env())
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # not "[repeated 3x across cluster]"
    transformers.utils.logging.disable_progress_bar()


def main(argv: list[str] | None = None) -> int:
    import pipelines.bench  # its docstring's first paragraph is the command's description

    ap = argparse.ArgumentParser(prog="python -m pipelines.bench",
                                 description=pipelines.bench.__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="quick", help=f"one of {sorted(PROFILES)} (default quick)")
    ap.add_argument("--out", default="runs/bench", help="output folder (default runs/bench); cached work is reused")
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    ap.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else "
                                                         "sqlite:///<cwd>/mlflow.db)")
    ap.add_argument("--experiment", default=EXPERIMENT, help=f"MLflow experiment (default {EXPERIMENT})")
    ap.add_argument("--readme", default="auto",
                    help="markdown file whose results section of the profile this run replaces; 'none': no file. "
                         f"Default auto: ./{BENCHMARKS_REPORT} for the quick and full profiles run without overrides, "
                         "else none")
    ap.add_argument("--render-only", action="store_true",
                    help="run nothing: rewrite results.md, the plots and the --readme section from --out/results.json "
                         "(after a change to the report; the numbers and the command are the run's)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of an error")
    ap.add_argument("overrides", nargs="*", help="profile overrides key=value, e.g. encoder.prune_steps.vtrans=300")
    args = ap.parse_intermixed_args(argv)  # options before, between or after the overrides
    try:
        if args.render_only:
            render_only(Path(args.out), args.readme)
            return 0
        profile = load_profile(args.profile, args.overrides)
        device = resolve_device(args.device)
        readme = resolve_readme(args.readme, profile.name, args.overrides, args.experiment)
        command = "python -m pipelines.bench " + " ".join(sys.argv[1:] if argv is None else argv)
        _quiet_logs()
        run_bench(profile, Path(args.out), device, args.tracking_uri, args.experiment, command, args.overrides,
                  readme)
    except VtransError as e:
        if args.debug:
            traceback.print_exc()
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
