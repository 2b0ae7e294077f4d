"""Compile every Triton kernel configuration a launcher can choose for sm_80 and sm_90, and report resources.

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` produces a cubin on
any machine, and ``cuobjdump --dump-resource-usage`` reads registers, stack / local memory (where spills go)
and shared memory off it. Run before kernel changes land:

    python bench/compile_report.py                 # every configuration, sm_80 and sm_90
    python bench/compile_report.py --default-only --arch 90   # what CI compiles

Exit status 1 when a configuration fails to compile or spills (any stack or local memory), else 0.
The interpreter must be off here (an interpreted kernel cannot be compiled), so TRITON_INTERPRET is dropped
from the environment before Triton is imported.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # today's default; silences triton 3.9's warning
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

import vaegan_fast.ops  # noqa: E402,F401  (loads vaegan_fast.kernels, also from an uninstalled checkout)
from vaegan_fast.kernels import all_compile_specs  # noqa: E402


def find_cuobjdump() -> str | None:
    candidates = [shutil.which("cuobjdump"), os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia",
                                                           "bin", "cuobjdump")]
    for base in ("/usr/local/cuda", "/usr/local/cuda-13.0", os.environ.get("CUDA_HOME", "")):
        candidates.append(os.path.join(base, "bin", "cuobjdump"))
    return next((c for c in candidates if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


def compile_spec(spec, arch: int):
    # The same attribute the JIT attaches to an argument it finds divisible by 16 (triton 3.3 and later).
    attrs = {(spec.kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in spec.divisible}
    return triton.compile(ASTSource(fn=spec.kernel, signature=spec.signature, constexprs=spec.constexprs,
                                    attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})


def resource_usage(cubin: bytes, cuobjdump: str) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                             check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability x10 (default: 80 and 90)")
    parser.add_argument("--default-only", action="store_true", help="only each kernel's default configuration")
    parser.add_argument("--filter", default="", help="only configurations whose name contains this")
    parser.add_argument("--no-fail-on-spills", action="store_true", help="exit 0 even when a config spills")
    args = parser.parse_args(argv)
    archs = args.arch or [80, 90]
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        print("cuobjdump not found: compiling only (no resource report)")
    specs = [s for s in all_compile_specs(args.default_only) if args.filter in s.name]
    failures = spills = 0
    print(f"{'configuration':<62} {'arch':>5} {'warps':>5} {'regs':>5} {'spill(stack+local)':>18} "
          f"{'shared B':>9} {'s':>5}")
    for arch in archs:
        for spec in specs:
            t0 = time.perf_counter()
            try:
                kernel = compile_spec(spec, arch)
            except Exception as exc:  # report and go on: one broken config must not hide the others
                failures += 1
                print(f"{spec.name:<62} sm_{arch:<3} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
                continue
            dt = time.perf_counter() - t0
            use = resource_usage(kernel.asm["cubin"], cuobjdump) if cuobjdump else {}
            spilled = use.get("stack", 0) + use.get("local", 0)
            spills += spilled > 0
            shared = kernel.metadata.shared
            print(f"{spec.name:<62} sm_{arch:<3} {spec.num_warps:>5} {use.get('reg', '?'):>5} {spilled:>18} "
                  f"{shared:>9} {dt:>5.1f}" + ("  SPILLS" if spilled else ""), flush=True)
    print(f"{len(specs) * len(archs)} compiles: {failures} failed, {spills} with spills")
    return 1 if failures or (spills and not args.no_fail_on_spills) else 0


if __name__ == "__main__":
    sys.exit(main())
