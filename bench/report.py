"""Results files, tables and charts.

One JSON file per GPU under bench/results/ (`{"gpu": NAME, "runs": [run, ...]}`), runs appended, never
mixed across GPUs. Speedup ratios are formed inside a run, between providers of the same case, only.

    python -m qwen_fused.bench.report [RESULTS_DIR] [--all | --since DATE]   # markdown tables from the JSON
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qwen_fused.atomic import atomic_output
from qwen_fused.kernels.dispatch import slug  # one naming for results and tuning tables

RESULTS_DIR = Path(__file__).resolve().parent / "results"
ORDER = ["stock", "stock-compile", "ours-triton", "ours-torch", "ours-compile", "gemm"]
SMOKE = ("CPU smoke run, not a measurement: each provider runs at reduced sizes and is verified against stock; "
         "GPU numbers need a GPU")


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write a results file whole or not at all (`qwen_fused.atomic`), replacing an older one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)


def read_results(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); refusing to append to it") from e
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or "gpu" not in data:
        raise ValueError(f"{path}: not a qwen-fused results file (expected {{'gpu': ..., 'runs': [...]}})")
    return data


def append_run(record: dict, results_dir: Path = RESULTS_DIR) -> Path:
    """Add `record` to `<results_dir>/<gpu-slug>.json`, or replace the entry of the same `run_id` (a run saved as
    it goes: `qwen-fused bench` saves after each case). Refuses a file that holds another GPU's runs."""
    gpu = record.get("gpu")
    if not gpu:
        raise ValueError("this run has no GPU (CPU run); results files hold GPU runs only")
    path = Path(results_dir) / f"{slug(gpu)}.json"
    data = read_results(path) if path.exists() else {"gpu": gpu, "runs": []}
    if data["gpu"] != gpu:
        raise ValueError(f"{path} holds runs of {data['gpu']!r}, not {gpu!r}; GPUs are never mixed in one file")
    same = [i for i, r in enumerate(data["runs"]) if record.get("run_id") and r.get("run_id") == record["run_id"]]
    if same:
        data["runs"][same[0]] = record
    else:
        data["runs"].append(record)
    atomic_write(path, json.dumps(data, indent=1) + "\n")
    return path


def progress(run) -> str:
    """'' for a finished run (or one recorded before runs said); else which cases it finished, which one it was
    cut in (the first planned one not finished) and which never started."""
    if run.get("complete", True):
        return ""
    done = [c["case"] for c in run["cases"]]
    rest = [n for n in run.get("planned", []) if n not in done]
    cut = rest[0] if rest else "-"
    part = run.get("in_progress") or {}
    timed = [n for n, p in part.get("providers", {}).items() if "ms" in p] if part.get("case") == cut else []
    if timed:  # a model case saves each group of providers: those are in the JSON, not in the tables
        cut += f" (timed before the cut, under in_progress: {', '.join(timed)})"
    return (f"PARTIAL RUN (cut by a time limit or a crash): {len(done)} of {len(run.get('planned', []))} cases "
            f"finished; cut in: {cut}; not started: {', '.join(rest[1:]) or '-'}")


# ------------------------------------------------------------------------------------------- tables
def _fmt_ms(p):
    return f"{p['ms']:.3f}" if "ms" in p else "-"


def _fmt_ratio(p, key):
    return f"{p[key]:.2f}x" if key in p else "-"


def _status(p):
    s = p.get("status", "?")
    return s if s in ("ok", "ceiling") else f"**{s}**"


def _floors(run) -> dict:
    """{case: floor ms as text}, or {} for a run without measured ceilings (a CPU smoke run): no column then."""
    if not any(c.get("floor_ms") is not None for c in run["cases"]):
        return {}
    return {c["case"]: f"{c['floor_ms']:.3f}" if c.get("floor_ms") is not None else "-" for c in run["cases"]}


def _providers(run):
    names = {n for c in run["cases"] for n in c["providers"]}
    return [n for n in ORDER if n in names] + sorted(names - set(ORDER))


def run_header(run) -> str:
    v = run.get("versions", {})
    c = run.get("ceilings", {})
    return (f"{run.get('device') or run.get('gpu')} | driver {run.get('driver', '-')} | torch {v.get('torch')} | "
            f"triton {v.get('triton')} | diffusers {v.get('diffusers')} | peft {v.get('peft')} | "
            f"commit {run.get('commit')} | {run.get('date')}"
            + (" | reduced sizes (no CUDA)" if run.get("tiny") else "")
            + (f"\n\n{SMOKE}." if run.get("smoke") else "")
            + (f"\n\n**{progress(run)}**" if progress(run) else "")
            + (f"\n\nMeasured ceilings: bf16 matmul {c['matmul_tflops']:.0f} TFLOP/s, device copy "
               f"{c['copy_tbps']:.2f} TB/s." if c else ""))


def markdown(run) -> str:
    """Speedup matrix (vs stock eager) and the full detail table of one run."""
    provs = _providers(run)
    floors = _floors(run)
    lines = [run_header(run), "", "Speedup vs stock eager (higher is better; ratios within this run only):", "",
             "| case | " + " | ".join(["floor ms"] * bool(floors) + provs) + " |",
             "|---|" + "---:|" * (bool(floors) + len(provs))]
    for c in run["cases"]:
        cells = [floors[c["case"]]] if floors else []
        for n in provs:
            p = c["providers"].get(n, {})
            cells.append(_fmt_ratio(p, "vs_stock") if "ms" in p else (p.get("status", "-") if p else "-"))
        lines.append(f"| {c['case']} | " + " | ".join(cells) + " |")
    lines += ["", "| case | provider | status | median ms [p20-p80] | vs eager | vs compiled | max rel err | "
              "peak extra MB | first call s | note |", "|---|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for c in run["cases"]:
        for n in provs:
            p = c["providers"].get(n)
            if not p:
                continue
            t = f"{p['ms']:.3f} [{p['p20']:.3f}-{p['p80']:.3f}]" if "ms" in p else "-"
            err = f"{p['max_err']:.2e}" if "max_err" in p else "-"
            mem = "-" if "peak_extra_mb" not in p else (
                "not measured" if p["peak_extra_mb"] is None else f"{p['peak_extra_mb']:.0f}")  # None: CPU
            first = f"{p['first_call_s']:.1f}" if "first_call_s" in p else "-"
            note = p.get("reason", "")
            if "full_model_est_ms" in p:
                note = f"{c['blocks']}-block estimate {p['full_model_est_ms']:.1f} ms " + note
            lines.append(f"| {c['case']} | {n} | {_status(p)} | {t} | {_fmt_ratio(p, 'vs_stock')} | "
                         f"{_fmt_ratio(p, 'vs_stock_compile')} | {err} | {mem} | {first} | {note.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def terminal_table(run) -> str:
    provs = _providers(run)
    floors = _floors(run)
    w = max([len(c["case"]) for c in run["cases"]] + [4])
    head = f"{'case':{w}s}  " + "  ".join(f"{n:>22s}" for n in ["floor"] * bool(floors) + provs)
    out = [head, "-" * len(head)]
    for c in run["cases"]:
        cells = [floors[c["case"]]] if floors else []
        for n in provs:
            p = c["providers"].get(n, {})
            if "ms" in p:
                r = f" {p['vs_stock']:.2f}x" if "vs_stock" in p else ""
                rc = f"/{p['vs_stock_compile']:.2f}xc" if "vs_stock_compile" in p else ""
                cells.append(f"{p['ms']:.3f}ms{r}{rc}")
            else:
                cells.append(p.get("status", "-"))
        out.append(f"{c['case']:{w}s}  " + "  ".join(f"{x:>22s}" for x in cells))
    out.append("ms = median; Nx = speedup vs stock eager, Nxc = vs stock compiled"
               + ("; floor = max(FLOPs/matmul peak, bytes/copy bandwidth), measured in this run" if floors else ""))
    if run.get("smoke"):
        out.append(SMOKE)
    if progress(run):
        out.append(progress(run))
    return "\n".join(out)


def chart(run, path: Path) -> Path:
    """PNG bar chart of each provider's speedup vs stock eager, per case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    provs = [n for n in _providers(run) if n != "stock"]
    cases = run["cases"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(cases) * max(1, len(provs)) / 3), 4.5))
    width = 0.8 / max(1, len(provs))
    for i, n in enumerate(provs):
        vals = [c["providers"].get(n, {}).get("vs_stock", 0.0) for c in cases]
        xs = [j + (i - (len(provs) - 1) / 2) * width for j in range(len(cases))]
        ax.bar(xs, vals, width, label=n)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels([c["case"] for c in cases], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("speedup vs stock eager (x)")
    ax.set_title(f"qwen-fused: {run.get('device') or run.get('gpu')} ({run.get('date', '')[:10]}, "
                 f"{run.get('commit')})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------- summary
def summary(results_dir: Path = RESULTS_DIR, all_runs=False, since=None) -> str:
    """Markdown for README: per GPU file, the latest run (or every run; or every run dated `since` or later, an
    ISO date in UTC), with its date and commit. `results_dir` may also hold single-run files written by
    `qwen-fused bench --out`."""
    files = sorted(Path(results_dir).glob("*.json"))
    if not files:
        return f"No results in {results_dir} yet: run `qwen-fused bench` on a GPU.\n"
    parts = []
    for f in files:
        raw = json.loads(f.read_text())
        if isinstance(raw, dict) and "cases" in raw:  # one run's own file (--out), not a per-GPU results file
            data = {"gpu": raw.get("gpu") or raw.get("device"), "runs": [raw]}
        else:
            data = read_results(f)
        if since:
            runs = [r for r in data["runs"] if r.get("date", "") >= since]  # both ISO UTC: the text order is time's
        else:
            runs = data["runs"] if all_runs else data["runs"][-1:]
        for run in runs:
            parts.append(f"### {data['gpu']}\n\n" + markdown(run))
    if since and not parts:
        return f"No runs dated {since} or later in {results_dir}.\n"
    return "\n".join(parts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m qwen_fused.bench.report", description=summary.__doc__)
    ap.add_argument("results_dir", nargs="?", default=str(RESULTS_DIR))
    ap.add_argument("--all", action="store_true", help="every run, not only each GPU's latest")
    ap.add_argument("--since", help="every run dated this ISO UTC date or later, e.g. 2026-12-03T14:00:00")
    args = ap.parse_args(argv)
    sys.stdout.write(summary(Path(args.results_dir), args.all, args.since))
    return 0


if __name__ == "__main__":
    sys.exit(main())
