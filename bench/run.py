"""python bench/run.py: kernel and end-to-end benchmarks against eager PyTorch and torch.compile.

Every provider is checked against the reference before it is timed; providers are timed in turns in one
process, and every ratio in the output compares numbers taken side by side in this run. Writes a table to
stdout and JSON + markdown under bench/results/ (named after the device and the time).
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import e2e  # noqa: E402
import kernels  # noqa: E402
import telemetry  # noqa: E402
import timing  # noqa: E402
from vaegan_fast import PRESETS as MODEL_PRESETS, ops  # noqa: E402
from vaegan_fast.step import step_flops  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BOUND = "bound"  # the kernel benchmark's yardstick provider: see bench/kernels.py
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRESETS = tuple(MODEL_PRESETS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, short timings (the default on a CPU)")
    size.add_argument("--full", action="store_true", help="all sizes and dtypes (the default on a GPU)")
    p.add_argument("--ops", default="all", help="comma list of ops, 'all', or 'none' (e.g. linear_act,reparam_kl)")
    p.add_argument("--sizes", default="all",
                   help="kernel sizes: 'all', 'large' (only those --full adds to the presets' own) or a comma list "
                        "of the size column's labels (e.g. 8192x1024->1024)")
    p.add_argument("--presets", default="seed,wide", help="comma list of Model presets, or 'none'")
    p.add_argument("--dtypes", default=None, help="comma list of fp32,bf16,fp16 (default: fp32 quick; all full)")
    p.add_argument("--json", default=None, help="where to write the JSON (default bench/results/<device>-<time>.json)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile providers")
    p.add_argument("--budget", type=float, default=None, help="seconds of timing per measurement")
    p.add_argument("--plot", action="store_true", help="also write PNG charts (needs matplotlib)")
    return p.parse_args(argv)


def _ratio(base, value):
    return base / value if base and value else None


def bench_kernels(args, device, gpu, full, budget, dtypes, peaks, rows=None):
    """Rows of the kernel table, appended to ``rows`` as they are measured (kept if interrupted)."""
    wanted = None if args.ops == "all" else set(args.ops.split(","))
    rows = [] if rows is None else rows
    if wanted == {"none"}:
        return rows
    small = {(c.op, c.label) for c in kernels.cases(False, gpu)}
    sizes = None if args.sizes in ("all", "large") else set(args.sizes.split(","))
    for case in kernels.cases(full, gpu):
        if wanted is not None and case.op not in wanted:
            continue
        if args.sizes == "large" and (case.op, case.label) in small or sizes and case.label not in sizes:
            continue
        for dtype_name in dtypes:
            dtype = DTYPES[dtype_name]
            providers = {"eager": lambda a, c=case: c.call(a, "reference")}
            if not args.no_compile:
                providers["compile"] = torch.compile(case.reference, dynamic=False)
            for backend in ("native", "triton"):
                if backend in ops.available_backends(device, case.op):
                    providers[backend] = lambda a, c=case, b=backend: c.call(a, b)
            status, compile_s = {}, None
            for name, fn in providers.items():
                t0 = time.perf_counter()
                status[name] = kernels.check_provider(fn, case, device, dtype) or "ok"
                if name == "compile":
                    compile_s = time.perf_counter() - t0
            good = {n: f for n, f in providers.items() if status[n] == "ok"}
            providers[BOUND] = good[BOUND] = case.bound_outputs
            status[BOUND] = "bound"  # not checked: it computes another function (bench/kernels.py)
            args_by_provider = {n: kernels.make_args(case, device, dtype) for n in good}
            for mode in kernels.MODES:
                pairs = {n: kernels.timed_pair(f, case, args_by_provider[n], mode) for n, f in good.items()}
                times = timing.interleaved(pairs, device, budget) if pairs else {}
                element = torch.empty((), dtype=dtype).element_size()
                nbytes, flops = case.elements_moved[mode] * element, case.flops[mode]
                for name in providers:
                    t = times.get(name)
                    row = {"op": case.op, "size": case.label, "dtype": dtype_name, "mode": mode, "provider": name,
                           "status": status[name], "bytes": nbytes, "flops": flops}
                    if t is not None:
                        seconds = t.median_ms / 1e3
                        row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, calls=t.calls,
                                   gbs=nbytes / seconds / 1e9, tflops=flops / seconds / 1e12,
                                   vs_eager=_ratio(times.get("eager") and times["eager"].median_ms, t.median_ms),
                                   vs_compile=_ratio(times.get("compile") and times["compile"].median_ms,
                                                     t.median_ms))
                        if peaks:
                            row["bandwidth_share"] = row["gbs"] / peaks["bandwidth_gbs"]
                            peak_tflops = peaks["tflops"].get(str(dtype).replace("torch.", ""))
                            row["flops_share"] = row["tflops"] / peak_tflops if peak_tflops else None
                        if name == "compile":
                            row["compile_s"] = compile_s
                        row["peak_memory_mb"] = timing.peak_memory_mb(
                            device, lambda p=pairs[name]: (p[0] and p[0](), p[1]()))
                    rows.append(row)
            print_kernel_rows([r for r in rows if r["op"] == case.op and r["size"] == case.label
                               and r["dtype"] == dtype_name])
    return rows


def bench_e2e(args, device, gpu, budget, dtypes, rows=None):
    names = [] if args.presets == "none" else args.presets.split(",")
    for n in names:
        if n not in PRESETS:
            raise SystemExit(f"--presets: unknown preset {n!r}; choose from {PRESETS}")
    rows = [] if rows is None else rows
    for preset, batch in e2e.presets_for(names, gpu):
        model = e2e.make_model(preset, device)
        batches, source = e2e.load_batches(batch, 8, device, model.input_shape)
        reference = e2e.EagerVAEGAN.like(model)
        want = [l.double().cpu() for x in batches[:2] for l in reference.step(x)]
        low = [d for d in dtypes if d in e2e.LOW_PRECISION and (gpu or d != "fp16")]  # CPU fp16 is emulated
        providers = e2e.providers(model, device, gpu, low)
        if args.no_compile:
            providers = {n: f for n, f in providers.items() if not n.startswith("compile")}
        status, first_call, autocast_losses = {}, {}, {}
        for name, step in providers.items():
            if name.startswith("eager+autocast"):  # the low-precision yardstick: its losses set the bounds
                t0 = time.perf_counter()
                autocast_losses[e2e.precision_of(name)] = got = e2e.first_losses(step, batches)
                first_call[name] = (time.perf_counter() - t0) / 2
                status[name] = "ok" if all(torch.isfinite(v) for v in got) else "non-finite losses"
        for name, step in providers.items():
            if name in status:
                continue
            lowp = e2e.precision_of(name)
            bounds = e2e.low_precision_bounds(want, autocast_losses[lowp], lowp) if lowp else None
            problem, first_call[name] = e2e.check(step, want, batches, bounds)
            status[name] = problem or "ok"
        good = {n: s for n, s in providers.items() if status[n] == "ok"}
        pairs = {}
        for name, step in good.items():
            cycle = itertools.cycle(batches)
            pairs[name] = (None, lambda s=step, c=cycle: s(next(c)))
        # Whole steps vary more than kernels: at least 15 rounds and a few seconds per preset (5 rounds
        # when a provider takes seconds a step, as the autocast step does on CPUs without bf16 units).
        slow = max(first_call.values()) > 1.0
        times = timing.interleaved(pairs, device, max(budget * 12, 3.0), min_calls=5 if slow else 15,
                                   warmup=1 if slow else 3)
        counted = {"eager": providers["eager"]}
        counted.update({n: s for n, s in providers.items() if n.startswith("vaegan_fast")})
        for name in providers:
            row = {"preset": preset, "batch": batch, "provider": name, "status": status[name], "data": source}
            t = times.get(name)
            if t is not None:
                row.update(median_ms=t.median_ms, p20_ms=t.p20_ms, p80_ms=t.p80_ms, calls=t.calls,
                           samples_per_s=batch / (t.median_ms / 1e3),
                           vs_eager=_ratio(times["eager"].median_ms, t.median_ms) if "eager" in times else None,
                           vs_compile=_ratio(times["compile"].median_ms, t.median_ms) if "compile" in times else None)
                yardstick = f"eager+autocast[{e2e.precision_of(name)}]"
                if e2e.precision_of(name) and yardstick in times:
                    row["vs_autocast"] = _ratio(times[yardstick].median_ms, t.median_ms)
            if name.startswith("compile"):
                row["compile_s"] = first_call[name]
            if name in counted and status[name] == "ok":
                x = batches[0]
                row["operator_calls"] = e2e.operator_calls(counted[name], x)
                model_of = getattr(counted[name], "model", None)
                row["saved_bytes"] = (e2e.routed_saved_bytes(model_of, x) if model_of is not None and
                                      model_of.uses_routed_step else e2e.saved_tensor_bytes(counted[name], x))
                row["flops"] = (step_flops(model_of, batch) if model_of is not None and model_of.uses_routed_step
                                else step_flops(model, batch, routed=False))
                if gpu:
                    row["kernel_launches"] = e2e.kernel_launches(counted[name], x)
            rows.append(row)
        print_e2e_rows([r for r in rows if r["preset"] == preset and r["batch"] == batch])
    return rows


# ---------------------------------------------------------------------------------------------- output
def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


KERNEL_HEADER = ["op", "size", "dtype", "mode", "provider", "median ms", "p20-p80 ms", "GB/s", "TFLOP/s",
                 "% peak BW", "vs eager", "vs compile", "status"]
E2E_HEADER = ["preset", "batch", "provider", "samples/s", "ms/step", "p20-p80 ms", "vs eager", "vs compile",
              "vs autocast", "compile s", "GFLOP", "GFLOP/s", "ops/step", "saved MB", "status"]


def kernel_cells(r):
    return [r["op"], r["size"], r["dtype"], r["mode"], r["provider"], _fmt(r.get("median_ms"), ".4f"),
            f"{_fmt(r.get('p20_ms'), '.4f')}-{_fmt(r.get('p80_ms'), '.4f')}", _fmt(r.get("gbs"), ".1f"),
            _fmt(r.get("tflops"), ".3f"),
            _fmt(100 * r["bandwidth_share"], ".0f") if r.get("bandwidth_share") is not None else "-",
            _fmt(r.get("vs_eager"), ".2f") + "x" if r.get("vs_eager") else "-",
            _fmt(r.get("vs_compile"), ".2f") + "x" if r.get("vs_compile") else "-",
            r["status"] if r["status"] in ("ok", "bound") else "WRONG"]


def e2e_cells(r):
    return [r["preset"], str(r["batch"]), r["provider"], _fmt(r.get("samples_per_s"), ".0f"),
            _fmt(r.get("median_ms"), ".2f"), f"{_fmt(r.get('p20_ms'), '.2f')}-{_fmt(r.get('p80_ms'), '.2f')}",
            _fmt(r.get("vs_eager"), ".2f") + "x" if r.get("vs_eager") else "-",
            _fmt(r.get("vs_compile"), ".2f") + "x" if r.get("vs_compile") else "-",
            _fmt(r.get("vs_autocast"), ".2f") + "x" if r.get("vs_autocast") else "-",
            _fmt(r.get("compile_s"), ".1f"), _fmt(r["flops"] / 1e9, ".3f") if r.get("flops") else "-",
            _fmt(r["flops"] / r["median_ms"] / 1e6, ".1f") if r.get("flops") and r.get("median_ms") else "-",
            _fmt(r.get("operator_calls"), "d"),
            _fmt(r["saved_bytes"] / 2**20, ".1f") if r.get("saved_bytes") is not None else "-",
            "ok" if r["status"] == "ok" else "WRONG"]


def _print_table(header, rows):
    widths = [max(len(h), *(len(c[i]) for c in rows)) if rows else len(h) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for cells in rows:
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)))
    print(flush=True)


def print_kernel_rows(rows):
    _print_table(KERNEL_HEADER, [kernel_cells(r) for r in rows])
    for r in rows:
        if r["status"] not in ("ok", "bound"):
            print(f"  {r['provider']} is WRONG on {r['op']} {r['size']} {r['dtype']}: {r['status']}")


def print_e2e_rows(rows):
    _print_table(E2E_HEADER, [e2e_cells(r) for r in rows])
    for r in rows:
        if r["status"] != "ok":
            print(f"  {r['provider']} is WRONG on {r['preset']}: {r['status']}")


def markdown(result) -> str:
    env = result["environment"]
    lines = [f"# vaegan_fast benchmark: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, {env['threads']} threads, commit "
             f"{env['git_commit']}{' (dirty)' if env['git_dirty'] else ''}, {result['started']}", "",
             f"{telemetry.native_summary(env)}", "", telemetry.settings_summary(env), "",
             f"Command: `{' '.join(result['command'])}`", ""]

    def table(header, rows):
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines.extend("| " + " | ".join(cells) + " |" for cells in rows)
        lines.append("")

    if result["e2e"]:
        lines += ["## Training step (samples per second; ratios against eager and torch.compile in this run)", ""]
        table(E2E_HEADER, [e2e_cells(r) for r in result["e2e"]])
    if result["kernels"]:
        lines += ["## Kernels", ""]
        table(KERNEL_HEADER, [kernel_cells(r) for r in result["kernels"]])
    return "\n".join(lines)


def plot(result, stem: Path) -> list:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]'")
    written = []
    if result["e2e"]:
        fig, ax = plt.subplots(figsize=(8, 4))
        labels = [f"{r['preset']}/{r['batch']}\n{r['provider']}" for r in result["e2e"] if r.get("samples_per_s")]
        ax.bar(labels, [r["samples_per_s"] for r in result["e2e"] if r.get("samples_per_s")])
        ax.set_ylabel("samples / s")
        ax.set_title(f"training step, {result['environment']['device']}")
        ax.tick_params(axis="x", labelsize=7)
        fig.tight_layout()
        fig.savefig(f"{stem}-e2e.png", dpi=120)
        written.append(f"{stem}-e2e.png")
        plt.close(fig)
    both = [r for r in result["kernels"] if r["mode"] == "both" and r.get("vs_eager")]
    if both:
        fig, ax = plt.subplots(figsize=(10, 4))
        ax.bar([f"{r['op']}\n{r['size']} {r['dtype']}\n{r['provider']}" for r in both], [r["vs_eager"] for r in both])
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_ylabel("speed-up over eager (fwd+bwd)")
        ax.tick_params(axis="x", labelsize=6)
        fig.tight_layout()
        fig.savefig(f"{stem}-kernels.png", dpi=120)
        written.append(f"{stem}-kernels.png")
        plt.close(fig)
    return written


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    full = args.full or (gpu and not args.quick)
    budget = args.budget if args.budget is not None else (1.0 if full else 0.25)
    dtypes = args.dtypes.split(",") if args.dtypes else (
        ["fp32", "bf16"] + (["fp16"] if gpu else []) if full else ["fp32"])
    for d in dtypes:
        if d not in DTYPES:
            raise SystemExit(f"--dtypes: unknown dtype {d!r}; choose from {tuple(DTYPES)}")
    if not gpu:
        torch.backends.cuda.matmul.allow_tf32 = False
    started = datetime.datetime.now(datetime.timezone.utc)
    env = telemetry.environment(device)
    print(f"device: {env['device']} | torch {env['torch']} | triton {env['triton']} | "
          f"{'full' if full else 'quick'} | backends here: {ops.available_backends(device)}")
    print(telemetry.native_summary(env))
    print(telemetry.settings_summary(env))
    before = telemetry.nvml_snapshot()
    if not before["available"]:
        print(f"telemetry: {before['reason']}; going on without it")
    t0 = time.perf_counter()
    kernel_rows, e2e_rows, interrupted = [], [], False
    try:
        bench_kernels(args, device, gpu, full, budget, dtypes, env["peaks"], kernel_rows)
        bench_e2e(args, device, gpu, budget, dtypes, e2e_rows)
    except KeyboardInterrupt:  # Ctrl-C or a time limit (bench/gpu_check.sh): keep what was measured
        interrupted = True
        print("interrupted: writing the rows measured so far", flush=True)
    result = {"command": [sys.executable, *sys.argv], "started": started.isoformat(), "environment": env,
              "settings": {"full": full, "budget_s": budget, "dtypes": dtypes, "ops": args.ops, "sizes": args.sizes,
                           "presets": args.presets, "compile": not args.no_compile},
              "telemetry_before": before, "telemetry_after": telemetry.nvml_snapshot(),
              "duration_s": time.perf_counter() - t0, "kernels": kernel_rows, "e2e": e2e_rows,
              "interrupted": interrupted}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", env["device"]).strip("-")[:48]
    stem = RESULTS / f"{slug}-{started.strftime('%Y%m%d-%H%M%S')}"
    json_path = Path(args.json) if args.json else stem.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))
    md_path = json_path.with_suffix(".md")
    md_path.write_text(markdown(result))
    written = [str(json_path), str(md_path)]
    if args.plot:
        written += plot(result, json_path.with_suffix(""))
    print(f"took {result['duration_s']:.0f} s; wrote {', '.join(written)}")
    wrong = [r for r in kernel_rows + e2e_rows if r["status"] not in ("ok", "bound")]
    return 130 if interrupted else 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
