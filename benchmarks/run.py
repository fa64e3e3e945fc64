"""Run the benchmark modules and write benchmarks/results/latest.md (and latest.json).

    python benchmarks/run.py [--quick] [--only NAME]

With `--only`, the named modules are rerun and the other sections of the previous latest.json are kept, each
with the time it was measured, so one benchmark can be redone without redoing them all.

Every `benchmarks/bench_*.py` exposes `run(quick: bool) -> list[dict]`; each row has `section`,
`metric`, `value`, `unit`, `note` and optionally `baseline` and `ratio`. Benchmarks measure, they do
not judge: the report holds numbers and the machine they came from, never pass or fail. A module
that raises becomes an error row, so one broken benchmark does not hide the others.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = ["metric", "value", "unit", "baseline", "ratio", "note"]


def discover(only: str | None = None) -> list[Path]:
    """The bench_*.py files, optionally only those named in `only` (NAME or bench_NAME, comma-separated)."""
    paths = sorted(HERE.glob("bench_*.py"))
    if only:
        wanted = {name.strip().removesuffix(".py").removeprefix("bench_") for name in only.split(",")}
        paths = [p for p in paths if p.stem.removeprefix("bench_") in wanted]
    return paths


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """Where the numbers come from: they mean little without the CPU, GPU and library versions."""
    import torch

    from moalign.run import library_versions

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "torch threads": torch.get_num_threads(),
        "os": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
    }
    info.update(library_versions())
    return info


def _check_rows(rows: Any, name: str) -> list[dict[str, Any]]:
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise TypeError(f"{name}.run() must return a list of dicts, got {type(rows).__name__}")
    for row in rows:
        missing = {"section", "metric", "value", "unit"} - set(row)
        if missing:
            raise TypeError(f"{name}.run() row {row} lacks {sorted(missing)}")
        row.setdefault("note", "")
    return rows


def run_module(path: Path, quick: bool) -> list[dict[str, Any]]:
    """Import and run one benchmark module; any exception becomes one error row."""
    name = path.stem
    start = time.perf_counter()
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[name] = module
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        rows = _check_rows(module.run(quick), name)
    except Exception as error:  # report it as a row, do not crash the run
        traceback.print_exc()
        message = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return [
            {
                "module": name,  # so that a rerun of the module replaces it
                "section": name.removeprefix("bench_"),
                "metric": "error",
                "value": None,
                "unit": "",
                "note": f"{type(error).__name__}: {message}",
            }
        ]
    for row in rows:
        row.setdefault("module", name)
    print(f"{name}: {len(rows)} rows in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return rows


def merge_previous(rows: list[dict[str, Any]], previous: Path) -> list[dict[str, Any]]:
    """`rows` (the modules just run) plus the previous run's rows of every other module, in module order."""
    import json

    if not previous.exists():
        return rows
    rerun = {row["module"] for row in rows}
    before = json.loads(previous.read_text())
    kept = [{"when": before["when"], **row} for row in before["rows"] if row.get("module") not in rerun]
    return sorted(kept + rows, key=lambda row: row.get("module", ""))


def render(info: dict[str, Any], rows: list[dict[str, Any]], quick: bool, when: str) -> str:
    from moalign.report import markdown_table

    measured = sorted({row["when"] for row in rows if row.get("when", when) != when})
    lines = [
        "# moalign benchmarks",
        "",
        f"{when}, {'quick' if quick else 'full'} mode. Measurements only; no thresholds are applied.",
        *(
            [f"Sections marked with an earlier time were kept from the runs of {', '.join(measured)}."]
            if measured
            else []
        ),
        "",
        "## Machine",
        "",
        markdown_table([{"key": k, "value": str(v)} for k, v in info.items()], ["key", "value"]),
    ]
    for section in dict.fromkeys(row["section"] for row in rows):
        chosen = [row for row in rows if row["section"] == section]
        columns = [c for c in COLUMNS if c in ("metric", "value", "unit", "note") or any(c in r for r in chosen)]
        earlier = chosen[0].get("when", when)
        title = f"## {section}" + (f" (measured {earlier})" if earlier != when else "")
        lines += ["", title, "", markdown_table(chosen, columns)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in well under a minute")
    parser.add_argument("--only", default=None, help="run only these modules, e.g. generation or generation,scoring")
    parser.add_argument("--output-dir", default=str(RESULTS), help="where latest.md and latest.json go")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    paths = discover(args.only)
    if not paths:
        print(f"no benchmark module matches {args.only!r} in {HERE}", file=sys.stderr)
        return 2
    rows: list[dict[str, Any]] = []
    for path in paths:
        print(f"running {path.stem} ...", file=sys.stderr)
        rows += run_module(path, args.quick)
    info = machine()
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from moalign.run import atomic_write_text, write_json

    out = Path(args.output_dir)
    for row in rows:
        row["when"] = when
    if args.only:
        rows = merge_previous(rows, out / "latest.json")
    text = render(info, rows, args.quick, when)
    atomic_write_text(out / "latest.md", text)
    write_json(out / "latest.json", {"when": when, "quick": args.quick, "machine": info, "rows": rows})
    print(text)
    print(f"wrote {out / 'latest.md'} and {out / 'latest.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
