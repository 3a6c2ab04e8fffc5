"""Registers, stack (spills) and instruction counts of the FlashTPA kernels as built for an H100/H200, on the CPU.

    python benchmarks/kernel_resources.py [--arch 90] [--sms 132] [--dump DIR] [--only TEXT]

No GPU needed: Triton compiles for a named GPU target, and the cuobjdump bundled with Triton reads the cubin.
The launchers run on CPU tensors with their default launch config (or the case's fields replaced), their kernel
launch is intercepted, and the captured arguments are specialised the way Triton's JIT does (integers equal to 1
become constants, multiples of 16 and tensor pointers get divisibility 16), so the build matches what the GPU
would compile with this Triton version. What it answers: does a configuration spill, how many programs fit on an SM
(65,536 registers / (warps x 32 x registers)), are the matrix instructions wgmma (HGMMA). It does not time
anything; the device's Triton may allocate registers a little differently.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's packages first, installed or not

POINTER_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32"}
SASS_OPS = ("HGMMA", "HMMA", "STL", "LDL", "BAR.SYNC", "MUFU.EX2")


@contextmanager
def captured_launch(module, kernel_name: str, sms: int) -> Iterator[dict]:
    """Replace module.<kernel_name>[grid](...) by a recorder (other kernels of the module launch nothing), and
    size split grids for `sms` multiprocessors instead of the CPU's placeholder."""
    box: dict = {}
    saved = {name: getattr(module, name) for name in dir(module) if name.startswith("_") and name.endswith("_kernel")}

    class Recorder:
        def __init__(self, record: bool) -> None:
            self.record = record

        def __getitem__(self, grid) -> Callable:
            def launch(*args, **kwargs) -> None:
                if self.record:
                    box.update(kernel=saved[kernel_name], args=args, kwargs=kwargs)
            return launch

    for name in saved:
        setattr(module, name, Recorder(name == kernel_name))
    sm_source = getattr(module, "multiprocessors", None)
    if sm_source is not None:
        module.multiprocessors = lambda device: sms
    try:
        yield box
    finally:
        for name, kernel in saved.items():
            setattr(module, name, kernel)
        if sm_source is not None:
            module.multiprocessors = sm_source


def build(box: dict, arch: int):
    """Compile the captured launch for sm_<arch>, specialised as the JIT would."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel, args, kwargs = box["kernel"], box["args"], dict(box["kwargs"])
    options = {"num_warps": kwargs.pop("num_warps"), "num_stages": kwargs.pop("num_stages")}
    signature, constants, attrs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        value = kwargs[name] if name in kwargs else args[i]
        unit_int = isinstance(value, int) and not isinstance(value, bool) and value == 1
        if name in kwargs or value is None or unit_int:  # the JIT specialises None and 1 as constants
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name], attrs[(i,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif hasattr(value, "block_shape"):  # a host-side TMA descriptor
            dtype = POINTER_TYPES[value.base.dtype][1:]
            signature[name] = f"tensordesc<{dtype}[{','.join(map(str, value.block_shape))}]>"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(kernel, signature, constants, attrs), target=GPUTarget("cuda", arch, 32),
                          options=options), options


def resources(compiled, options: dict, dump: Path | None, label: str) -> str:
    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(tool), "-res-usage", str(cubin)], capture_output=True, text=True).stdout
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True).stdout
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        safe = "".join(c if c.isalnum() or c in "-_=" else "_" for c in label)
        (dump / f"{safe}.sass").write_text(sass)
        (dump / f"{safe}.ttgir").write_text(compiled.asm["ttgir"])
    usage_row = next(row for row in usage.splitlines() if "REG:" in row)
    fields = dict(part.split(":") for part in usage_row.split() if ":" in part)
    regs, stack = int(fields["REG"]), int(fields["STACK"])
    per_sm = 65536 // (options["num_warps"] * 32 * regs)
    ops = " ".join(f"{op}={sass.count(op)}" for op in SASS_OPS)
    return (f"{label:58s} warps {options['num_warps']} stages {options['num_stages']}  regs {regs:3d}  "
            f"stack {stack:3d} B  programs/SM by registers {per_sm}  shared {compiled.metadata.shared} B  {ops}")


def bench_module():
    """benchmarks/kernel_timings.py (the input makers live there)."""
    import kernel_timings

    return kernel_timings


def inputs(B: int, N: int, M: int, H: int, D: int, ranks: tuple[int, int, int], form: str) -> dict:
    """The benchmark's attention arguments (`tpa_inputs`), as bf16 CPU tensors."""
    bench = bench_module()
    return bench.tpa_inputs(bench.Runner(torch.device("cpu"), "torch", 1), B, N, M, H, D, *ranks, form)


# (label, "decode" | "prefill", inputs, config fields replaced in the default config)
CASES = [
    ("decode paper B=1 M=2^19", "decode", lambda: inputs(1, 1, 1 << 19, 32, 64, (16, 1, 1), "contextual"), {}),
    ("decode paper B=1 M=2^19 block_t=64", "decode", lambda: inputs(1, 1, 1 << 19, 32, 64, (16, 1, 1), "contextual"),
     {"block_t": 64}),
    ("decode paper B=1 M=2^19 block_t=32", "decode", lambda: inputs(1, 1, 1 << 19, 32, 64, (16, 1, 1), "contextual"),
     {"block_t": 32}),
    ("decode paper B=1 M=2^19 TMA", "decode",
     lambda: inputs(1, 1, 1 << 19, 32, 64, (16, 1, 1), "contextual"), {"tma": True}),
    ("decode t6 H=34 B=16 M=2^16", "decode", lambda: inputs(16, 1, 1 << 16, 34, 64, (6, 2, 2), "contextual"), {}),
    ("decode t6 H=78 B=1 M=2^18", "decode", lambda: inputs(1, 1, 1 << 18, 78, 64, (6, 2, 2), "contextual"), {}),
    ("decode gqa llama3-8b B=16 M=2^14", "decode", lambda: inputs(16, 1, 1 << 14, 32, 128, (0, 8, 8), "fixed"), {}),
    ("prefill contextual (16,1,1) N=8192", "prefill",
     lambda: inputs(1, 8192, 8192, 32, 64, (16, 1, 1), "contextual"), {}),
    ("prefill contextual (16,1,1) N=8192 128x64", "prefill",
     lambda: inputs(1, 8192, 8192, 32, 64, (16, 1, 1), "contextual"),
     {"block_n": 128, "block_t": 64, "num_warps": 8, "num_stages": 3}),
    ("prefill kv_only (1,1) N=8192 128x64", "prefill", lambda: inputs(1, 8192, 8192, 32, 64, (0, 1, 1), "kv_only"),
     {"block_n": 128, "block_t": 64, "num_warps": 8, "num_stages": 3}),
    ("prefill MHA-as-TPA N=8192", "prefill", lambda: inputs(1, 8192, 8192, 32, 64, (0, 32, 32), "fixed"), {}),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability to build for (90 = H100/H200)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors the split grids are sized for")
    p.add_argument("--dump", type=Path, default=None, help="folder for each build's SASS and TTGIR")
    p.add_argument("--only", default="", help="only the cases whose label contains this text")
    args = p.parse_args(argv)
    from flashtpa import triton_decode, triton_prefill
    from flashtpa.inputs import AttentionInputs

    for label, kind, make, fields in CASES:
        if args.only not in label:
            continue
        if kind == "decode":
            module, name, launcher, default = (triton_decode, "_decode_factor_kernel", triton_decode.decode_attention,
                                               triton_decode.default_decode_config)
        else:
            module, name, launcher, default = (triton_prefill, "_prefill_kernel", triton_prefill.prefill_attention,
                                               triton_prefill.default_prefill_config)
        x = AttentionInputs(**make())
        if kind == "decode" and x.ak is None:
            name = "_decode_gqa_kernel"
        with captured_launch(module, name, args.sms) as box:
            launcher(x, x.bk.shape[-1] ** -0.5, dataclasses.replace(default(x), **fields))
        compiled, options = build(box, args.arch)
        print(resources(compiled, options, args.dump, label), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
