"""`qwen-fused bench`: verify every provider against stock diffusers, then time it; write JSON, markdown, PNG."""
from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path


def _csv(s):
    return [x.strip() for x in s.split(",") if x.strip()] if s else None


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="benchmark ours vs stock diffusers / peft / torch.compile",
                              description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="a small subset with both model-level cases (about 5-6 minutes on an H100/H200)")
    p.add_argument("--cases", type=_csv, help="comma-separated case names or globs, e.g. 'op/edit-1024/*'")
    p.add_argument("--providers", type=_csv, help="comma-separated: stock,stock-compile,ours-triton,ours-torch,"
                                                   "ours-compile,ours-blocks,ours-blocks-compile,gemm "
                                                   "(stock is always added)")
    p.add_argument("--level", type=_csv, help="op,block,model")
    p.add_argument("--mode", type=_csv, help="fwd,fwdbwd")
    p.add_argument("--blocks", type=int, default=4, help="blocks for the model level (default 4)")
    p.add_argument("--out", default="out/bench",
                   help="folder for this run's JSON, markdown and PNG (default out/bench)")
    p.add_argument("--results-dir", default=None, help="per-GPU results files (default: bench/results/)")
    p.add_argument("--no-save", action="store_true", help="do not append this run to the per-GPU results file")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--tiny", action="store_true", help="reduced sizes even on a GPU (smoke test)")
    p.add_argument("--list", action="store_true", help="print the selected cases and exit")
    p.add_argument("--summary", action="store_true", help="print the markdown tables of bench/results/*.json")
    p.add_argument("--all", action="store_true", help="with --summary: every run, not only the latest per GPU")
    p.set_defaults(func=main)
    return p


def _unique(path: Path) -> Path:
    i = 1
    out = path
    while out.exists():  # never overwrite an earlier run's files
        out = path.with_name(f"{path.stem}-{i}{path.suffix}")
        i += 1
    return out


def main(args) -> int:
    from . import registry, report

    results_dir = Path(args.results_dir) if args.results_dir else report.RESULTS_DIR
    if args.summary:
        sys.stdout.write(report.summary(results_dir, args.all))
        return 0
    cases = registry.select_cases(args.cases, args.level, args.mode, args.quick, args.blocks)
    if not cases:
        print("no case matches the selection", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(c.name for c in cases))
        return 0

    from qwen_fused.cli_util import resolve_device

    from . import runner

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"qwen-fused bench: error: {e}", file=sys.stderr)
        return 2
    providers = registry.select_providers(args.providers, cuda=device.type == "cuda")
    out = Path(args.out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = _unique(out / f"bench-{stamp}.json")
    partial = base.with_name(base.stem + "-partial.json")
    saved = []

    def save(rec):
        """As the run goes (runner.run's on_progress): a time limit that kills it loses only the case in progress.
        The finished cases go to `bench-*-partial.json` (the whole run's files are written only at its end) and,
        for a GPU run, into the per-GPU results file, marked incomplete until the last case is done."""
        if not rec["complete"]:
            report.atomic_write(partial, json.dumps(rec, indent=1) + "\n")
        if rec.get("gpu") and not args.no_save and not rec["tiny"]:
            saved[:] = [report.append_run(rec, results_dir)]

    record = runner.run(cases, providers, device, tiny=True if args.tiny else None, quick=args.quick,
                        on_progress=save)
    partial.unlink(missing_ok=True)
    report.atomic_write(base, json.dumps(record, indent=1) + "\n")
    md = report.markdown(record)
    report.atomic_write(base.with_suffix(".md"), md)
    written = [base, base.with_suffix(".md")]
    try:
        written.append(report.chart(record, base.with_suffix(".png")))
    except ImportError as e:
        print(f"no chart: {e} (pip install matplotlib)", file=sys.stderr)
    written += saved
    if not record.get("gpu"):
        print("CPU smoke run: not added to bench/results (GPU runs only).", file=sys.stderr)

    print(report.terminal_table(record))
    print("wrote " + ", ".join(str(p) for p in written))
    wrong = [f"{c['case']}:{n}" for c in record["cases"] for n, p in c["providers"].items()
             if p.get("status") == "wrong"]
    if wrong:
        print(f"VERIFICATION FAILED (not timed): {', '.join(wrong)}", file=sys.stderr)
        return 3
    return 0
