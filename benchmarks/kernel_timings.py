"""FlashTPA kernels vs PyTorch SDPA on one GPU: checks every variant, times it, prints and saves a table.

    python benchmarks/kernel_timings.py --out DIR [--sections paper,t6,fixed,prefill] [--variants [NAMES]]
        [--official DIR] [--sweep] [--smoke]

Timing: the call(s) captured in a CUDA graph, median over replays (events), after warm-up; inputs are fresh
random bf16 tensors, several sets rotated inside one graph when one set would sit in the 60 MB L2. With
--rounds K every configuration (ours and each baseline alike) is timed K times in a row, each round on fresh
allocations, and the median round is reported: one allocation can read several percent slower than the next.
Every timed variant of ours is checked against the float64 torch reference (where it fits in memory), after
every configuration has been timed (the progress lines print "pending"; the saved tables hold the errors). The
decode floor is the factor bytes read / the device-to-device copy bandwidth measured in the same run.
Baselines: SDPA decode with the grouped heads stacked as query rows (MHA: 1 row per head; GQA-4: 4 KV heads,
8 rows each; MQA: 1 KV head, 32 rows), best of the flash / memory-efficient / cuDNN backends; SDPA causal prefill.
The official TPA decode kernel is not part of this repository: --official points at a folder holding a copy of
tensorgi/TPA's decode/flashtpa_decode_triton_multi_kvrank.py, and its split decode is then timed at the same
shapes in the same run (Triton 3.9 refuses that file at import because its reduce kernel's autotune key names
"D", not an argument of that kernel: the copy used for RESULTS.md drops that key, nothing else); the paper-shape
table also quotes the official kernel's published anchor timings (OFFICIAL_ANCHORS).
--smoke runs tiny sizes on any device (torch backend on the CPU) to check this script's plumbing.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "kernels")]  # this checkout's packages first, installed or not

from flashtpa.dispatch import attention  # after the checkout's folders are on the path
from flashtpa.inputs import AttentionInputs
from flashtpa.reference import attention_reference

# (B, M) -> the official TPA decode kernel, us, as measured before this project (H200, CUDA-graph replay; H=32,
# D=64, ranks (16,1,1)); the same-run figures come from --official.
OFFICIAL_ANCHORS = {(1, 1 << 16): 16.9, (1, 1 << 19): 144.6, (4, 1 << 19): 383.2, (16, 1 << 16): 143.7,
                    (16, 1 << 18): 636.8}
L2_BYTES = 256 << 20  # rotate input sets until one graph touches at least this much
CHECK_MAX_ELEMS = 1 << 31  # float64 reference only when the biggest float64 temporary stays below ~16 GB


class Runner:
    """Timing and checking helpers bound to one device."""

    def __init__(self, device: torch.device, backend: str, reps: int, rounds: int = 1) -> None:
        self.device, self.backend, self.reps, self.rounds = device, backend, reps, rounds
        self.cuda = device.type == "cuda"

    def rand(self, *shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, device=self.device, dtype=dtype)

    def time_calls(self, calls: list[Callable[[], object]]) -> float:
        """Median microseconds per call: all calls captured in one CUDA graph, replayed `reps` times."""
        if not self.cuda:
            for c in calls:
                c()
            t0 = time.perf_counter()
            for c in calls:
                c()
            return (time.perf_counter() - t0) / len(calls) * 1e6
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                for c in calls:
                    c()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for c in calls:
                c()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(self.reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3 / len(calls))
        del graph
        return statistics.median(times)

    def copy_bandwidth(self) -> dict[str, float]:
        """Device-to-device bandwidth (bytes read + written per second) of three ways to copy 4 GiB buffers."""
        if not self.cuda:
            return {"max": float("nan")}
        n = (4 << 30) // 2
        src = torch.empty(n, dtype=torch.bfloat16, device=self.device).normal_()
        dst = torch.empty_like(src)
        moved = 2 * n * 2
        res = {"copy_": moved / (self.time_calls([lambda: dst.copy_(src)]) * 1e-6),
               "mul_out": moved / (self.time_calls([lambda: torch.mul(src, 1.0, out=dst)]) * 1e-6)}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(10):
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        res["copy_events"] = moved / statistics.median(times)
        res["max"] = max(res.values())
        del src, dst
        torch.cuda.empty_cache()
        return res

    def n_sets(self, set_bytes: int) -> int:
        return max(1, min(16, math.ceil(L2_BYTES / max(set_bytes, 1)))) if self.cuda else 1

    def free(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()


def tpa_inputs(run: Runner, B: int, N: int, M: int, H: int, D: int, R_Q: int, R_K: int, R_V: int,
               form: str, group_major: bool = False) -> dict:
    """One set of attention arguments, every cache full (kv_lens = M). `group_major`: bk / bv as [B, M, R, D]
    views of [B, R, M, D] storage (each group's tokens contiguous, SDPA's layout) instead of the cache's."""
    a: dict = {"q": None, "aq": None, "bq": None, "ak": None, "av": None}
    if form == "contextual":
        a["aq"], a["bq"] = run.rand(B, N, H, R_Q), run.rand(B, N, R_Q, D)
    else:
        a["q"] = run.rand(B, N, H, D)
    if form != "fixed":
        a["ak"], a["av"] = run.rand(B, M, H, R_K), run.rand(B, M, H, R_V)
    if group_major:
        a["bk"], a["bv"] = run.rand(B, R_K, M, D).transpose(1, 2), run.rand(B, R_V, M, D).transpose(1, 2)
    else:
        a["bk"], a["bv"] = run.rand(B, M, R_K, D), run.rand(B, M, R_V, D)
    a["kv_lens"] = torch.full((B,), M, dtype=torch.int32, device=run.device)
    return a


def rel_err_vs_reference(run: Runner, args: dict, out: torch.Tensor) -> float | None:
    """||out - ref|| / ||ref|| against the float64 torch reference; None where it would not fit."""
    B, N, H, D = out.shape
    M = args["bk"].shape[1]
    copy_elems = sum(t.numel() for t in args.values() if isinstance(t, torch.Tensor))
    materialised = B * M * H * D if (N > 16 or args["ak"] is None) else 0  # prefill K/V, or SDPA math on GQA
    if copy_elems > CHECK_MAX_ELEMS or B * N * H * M > CHECK_MAX_ELEMS // 4 or materialised > CHECK_MAX_ELEMS // 2:
        return None
    a64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in args.items()}
    ref = attention_reference(AttentionInputs(**a64))
    err = float((out.double() - ref).norm() / ref.norm())
    del a64, ref
    run.free()
    return err


def time_ours(run: Runner, make: Callable[[], dict], set_bytes: int, check: bool = True,
              launcher: Callable | None = None, **knobs) -> tuple[float, PendingCheck | None]:
    """Median microseconds over `run.rounds` rounds (fresh inputs each), and the float64 check to run once every
    configuration is timed (`resolve_checks`; None without `check`). `make` must bind its arguments now
    (functools.partial, not a closure over loop variables): the check calls it again later."""
    times = []
    for _ in range(run.rounds):
        sets = [make() for _ in range(run.n_sets(set_bytes))]
        times.append(run.time_calls(_our_calls(run, sets, launcher, knobs)))
        del sets
        run.free()
    return statistics.median(times), PendingCheck(run, make, launcher, knobs) if check else None


class PendingCheck:
    """One configuration's error against float64, computed after all timing: a check (GBs of float64 for the large
    shapes) slows the configuration timed right after it (benchmarks/NOTES.md, "Timing before checking"). Prints
    as "pending" until `resolve_checks` replaces it by the error."""

    def __init__(self, run: Runner, make: Callable[[], dict], launcher: Callable | None, knobs: dict) -> None:
        self.run, self.make, self.launcher, self.knobs = run, make, launcher, knobs

    def __format__(self, spec: str) -> str:
        return "pending"

    def error(self) -> float | None:
        args = self.make()
        err = checked_error(self.run, args, _our_calls(self.run, [args], self.launcher, self.knobs)[0])
        del args
        self.run.free()
        return err


def resolve_checks(node):
    """Replace every PendingCheck in rows (nested dicts and lists) by its error, in place; returns node."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        if isinstance(value, PendingCheck):
            node[key] = value.error()
        else:
            resolve_checks(value)
    return node


def _our_calls(run: Runner, sets: list[dict], launcher: Callable | None, knobs: dict) -> list[Callable[[], object]]:
    """One call of ours per input set: through a launcher with its default config, some fields changed (tuning),
    else the dispatcher with the run's backend."""
    if not knobs and launcher is None:
        return [lambda s=s: attention(**s, backend=run.backend) for s in sets]
    first = sets[0]
    N = (first["q"] if first["q"] is not None else first["aq"]).shape[1]
    section = "decode" if N == 1 else "prefill"
    launcher = launcher or _launcher(section)
    scale = first["bk"].shape[-1] ** -0.5
    inputs = [AttentionInputs(**s) for s in sets]
    configs = [launch_config(section, x, knobs) for x in inputs]
    return [lambda x=x, c=c: launcher(x, scale, c) for x, c in zip(inputs, configs)]


def launch_config(section: str, x: AttentionInputs, knobs: dict):
    """The launcher's default config for x with the knobs' fields changed; min_chunk, head_tile and waves go to
    the decode default function (the other decode fields follow from them)."""
    if section == "decode":
        from flashtpa.triton_decode import default_decode_config

        pins = {k: v for k, v in knobs.items() if k in ("min_chunk", "head_tile", "waves")}
        rest = {k: v for k, v in knobs.items() if k not in pins}
        return dataclasses.replace(default_decode_config(x, **pins), **rest)
    from flashtpa.triton_prefill import default_prefill_config

    return dataclasses.replace(default_prefill_config(x), **knobs)


def checked_error(run: Runner, args: dict, call: Callable[[], torch.Tensor]) -> float | None:
    """One call's error against float64 (`rel_err_vs_reference`); NaN if the output is not finite."""
    out = call()
    err = rel_err_vs_reference(run, args, out) if bool(torch.isfinite(out).all()) else float("nan")
    del out
    return err


def best_sdpa(run: Runner, calls: list[Callable[[], object]]) -> tuple[float, str]:
    """Time the SDPA calls under each backend that accepts them (flash, memory-efficient, cuDNN; math on the
    CPU): the fastest time and its backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION),
                ("cudnn", SDPBackend.CUDNN_ATTENTION)] if run.cuda else [("math", SDPBackend.MATH)]
    best, label = float("inf"), "none"
    for name, backend in backends:
        try:
            with sdpa_kernel([backend]):
                us = run.time_calls(calls)
        except RuntimeError:  # this backend does not take these inputs
            continue
        if us < best:
            best, label = us, name
    return best, label


def median_round(run: Runner, one_round: Callable[[], tuple[float, str]]) -> tuple[float, str]:
    """The median of `run.rounds` (microseconds, backend) results by time."""
    results = sorted((one_round() for _ in range(run.rounds)), key=lambda r: r[0])
    return results[(len(results) - 1) // 2]


def sdpa_decode(run: Runner, B: int, M: int, H: int, G: int, D: int) -> tuple[float, str]:
    """Best SDPA backend for decode with G KV heads, the H/G heads of a group as query rows (median round)."""
    set_bytes = 2 * B * G * M * D * 2

    def one_round() -> tuple[float, str]:
        sets = [(run.rand(B, G, H // G, D), run.rand(B, G, M, D), run.rand(B, G, M, D))
                for _ in range(run.n_sets(set_bytes))]
        result = best_sdpa(run, [lambda s=s: F.scaled_dot_product_attention(*s) for s in sets])
        del sets
        run.free()
        return result

    return median_round(run, one_round)


def sdpa_prefill(run: Runner, B: int, N: int, M: int, H: int, D: int) -> tuple[float, str]:
    """SDPA causal prefill (N = M: is_causal; N < M: lower-right causal bias), best backend (median round)."""
    from torch.nn.attention.bias import causal_lower_right

    def one_round() -> tuple[float, str]:
        q, k, v = run.rand(B, H, N, D), run.rand(B, H, M, D), run.rand(B, H, M, D)
        if N == M:
            call = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        else:
            bias = causal_lower_right(N, M)
            call = lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # noqa: E731
        result = best_sdpa(run, [call])
        del q, k, v
        run.free()
        return result

    return median_round(run, one_round)


def fmt(x: float | None, spec: str = ".1f") -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isnan(x):
        return "NaN"
    return format(x, spec)


def contextual_decode_row(run: Runner, bw: float, section: str, B: int, M: int, H: int, D: int,
                          ranks: tuple[int, int, int]) -> dict:
    """Ours on one contextual decode shape: time, error and the memory floor of its factor bytes."""
    R_Q, R_K, R_V = ranks
    tok = (R_K + R_V) * (H + D) * 2
    ours, err = time_ours(run, functools.partial(tpa_inputs, run, B, 1, M, H, D, R_Q, R_K, R_V, "contextual"),
                          B * M * tok)
    floor = B * M * tok / bw * 1e6
    return {"section": section, "H": H, "B": B, "M": M, "ours_us": ours, "floor_us": floor,
            "pct_floor": 100 * floor / ours, "rel_err": err}


def section_paper(run: Runner, bw: float, Ms: list[int], Bs: list[int], rows: list[dict]) -> None:
    H, D = 32, 64
    for B in Bs:
        for M in Ms:
            r = contextual_decode_row(run, bw, "paper", B, M, H, D, (16, 1, 1))
            r["official_us"] = OFFICIAL_ANCHORS.get((B, M))
            ours, floor, err = r["ours_us"], r["floor_us"], r["rel_err"]
            for name, G in (("mha", 32), ("gqa4", 4), ("mqa", 1)):
                if 2 * B * G * M * D * 2 > (40 << 30):
                    r[f"sdpa_{name}_us"] = None
                    continue
                r[f"sdpa_{name}_us"], r[f"sdpa_{name}_backend"] = sdpa_decode(run, B, M, H, G, D)
            rows.append(r)
            print(f"paper B={B:2d} M=2^{int(math.log2(M))}: ours {ours:8.1f} us  floor {floor:7.1f} "
                  f"({r['pct_floor']:5.1f}%)  err {fmt(err, '.2e')}  MHA {fmt(r['sdpa_mha_us'])}  "
                  f"GQA4 {fmt(r['sdpa_gqa4_us'])}  MQA {fmt(r['sdpa_mqa_us'])}  official* {fmt(r['official_us'])}",
                  flush=True)


def section_t6(run: Runner, bw: float, Ms: list[int], Bs: list[int], rows: list[dict]) -> None:
    D, R_Q, R_K, R_V = 64, 6, 2, 2
    for H in (34, 47, 61, 78):
        for B in Bs:
            for M in Ms:
                tok = (R_K + R_V) * (H + D) * 2
                r = contextual_decode_row(run, bw, "t6", B, M, H, D, (R_Q, R_K, R_V))
                ours, floor, err = r["ours_us"], r["floor_us"], r["rel_err"]
                # KV-only T6 shape (full query, same cache) for the same sizes
                r["kv_only_us"], r["kv_only_err"] = time_ours(
                    run, functools.partial(tpa_inputs, run, B, 1, M, H, D, R_Q, R_K, R_V, "kv_only"), B * M * tok)
                rows.append(r)
                print(f"t6 H={H} B={B:2d} M=2^{int(math.log2(M))}: ours {ours:8.1f} us  floor {floor:7.1f} "
                      f"({r['pct_floor']:5.1f}%)  err {fmt(err, '.2e')}  kv-only {r['kv_only_us']:8.1f} us "
                      f"err {fmt(r['kv_only_err'], '.2e')}", flush=True)


def section_fixed(run: Runner, bw: float, Ms: list[int], Bs: list[int], rows: list[dict]) -> None:
    for label, H, G, D in (("smollm2-135m", 9, 3, 64), ("llama3-8b", 32, 8, 128)):
        for B in Bs:
            for M in Ms:
                tok = 2 * G * D * 2
                if B * M * tok > (24 << 30):
                    continue
                ours, err = time_ours(run, functools.partial(tpa_inputs, run, B, 1, M, H, D, 0, G, G, "fixed"),
                                      B * M * tok)
                sdpa, be = sdpa_decode(run, B, M, H, G, D)
                floor = B * M * tok / bw * 1e6
                r = {"section": "fixed", "shape": label, "H": H, "G": G, "D": D, "B": B, "M": M, "ours_us": ours,
                     "sdpa_us": sdpa, "sdpa_backend": be, "ratio": ours / sdpa, "floor_us": floor,
                     "pct_floor": 100 * floor / ours, "rel_err": err}
                rows.append(r)
                print(f"fixed {label} B={B:2d} M=2^{int(math.log2(M))}: ours {ours:8.1f} us  SDPA {sdpa:8.1f} ({be}) "
                      f"ratio {r['ratio']:.2f}  floor {r['pct_floor']:5.1f}%  err {fmt(err, '.2e')}", flush=True)


def section_prefill(run: Runner, Ns: list[int], rows: list[dict]) -> None:
    H, D = 32, 64
    for M in Ns:
        for N in (M, M // 2):
            sdpa, be = sdpa_prefill(run, 1, N, M, H, D)
            r = {"section": "prefill", "N": N, "M": M, "sdpa_us": sdpa, "sdpa_backend": be}
            for form, ranks in (("contextual", (16, 1, 1)), ("fixed", (0, 32, 32))):
                us, err = time_ours(run, functools.partial(tpa_inputs, run, 1, N, M, H, D, *ranks, form), 1 << 30)
                r[f"{form}_us"], r[f"{form}_err"], r[f"{form}_ratio"] = us, err, us / sdpa
            rows.append(r)
            print(f"prefill N={N:5d} M={M:5d}: SDPA causal {sdpa:9.1f} us ({be})  "
                  f"TPA(16,1,1) {r['contextual_us']:9.1f} x{r['contextual_ratio']:.2f} "
                  f"err {fmt(r['contextual_err'], '.2e')}  MHA-as-TPA {r['fixed_us']:9.1f} "
                  f"x{r['fixed_ratio']:.2f} err {fmt(r['fixed_err'], '.2e')}", flush=True)


def sweep(run: Runner, rows: list[dict]) -> None:
    """Launch-parameter sweep for the defaults (no correctness check: the same kernels are checked above)."""
    base = [dict(block_t=bt, num_warps=w, num_stages=st) for bt in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
    shapes = [("paper", 1, 1 << 19, 32, 64, 16, 1, 1, "contextual"),
              ("paper", 16, 1 << 18, 32, 64, 16, 1, 1, "contextual"),
              ("t6", 1, 1 << 18, 78, 64, 6, 2, 2, "contextual"), ("t6", 16, 1 << 16, 34, 64, 6, 2, 2, "contextual"),
              ("smol", 1, 1 << 16, 9, 64, 0, 3, 3, "fixed"), ("llama", 16, 1 << 14, 32, 128, 0, 8, 8, "fixed"),
              ("llama", 4, 1 << 16, 32, 128, 0, 8, 8, "fixed")]
    for name, B, M, H, D, R_Q, R_K, R_V, form in shapes:
        res = []
        cfgs = [dict(c) for c in base] + [dict(waves=w) for w in (2, 8, 16)]
        if form == "contextual" and R_K == R_V == 1:
            cfgs += [dict(prefetch=False), dict(prefetch=False, waves=8)]
        for cfg in cfgs:
            try:
                us, _ = time_ours(run, lambda: tpa_inputs(run, B, 1, M, H, D, R_Q, R_K, R_V, form), 1 << 30,
                                  check=False, **cfg)
            except Exception as exc:  # a config that does not compile (registers, shared memory)
                print(f"sweep {name} {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            res.append((us, cfg))
        default_us, _ = time_ours(run, lambda: tpa_inputs(run, B, 1, M, H, D, R_Q, R_K, R_V, form), 1 << 30,
                                  check=False)
        res.sort(key=lambda x: x[0])
        rows.append({"section": "sweep", "shape": name, "B": B, "M": M, "default_us": default_us,
                     "best": [(u, c) for u, c in res[:6]]})
        print(f"sweep decode {name} B={B} M={M}: default {default_us:.1f}us; best " +
              "; ".join(f"{u:.1f}us {c}" for u, c in res[:6]), flush=True)
    pre_cfgs = [dict(block_n=bn, block_t=bt, num_warps=w, num_stages=s) for bn, bt, w, s in
                [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 4, 4),
                 (128, 64, 8, 4), (64, 128, 4, 2), (128, 128, 8, 2), (64, 64, 4, 4)]]
    for form, ranks in (("contextual", (16, 1, 1)), ("fixed", (0, 32, 32))):
        res = []
        for cfg in pre_cfgs:
            try:
                us, _ = time_ours(run, lambda: tpa_inputs(run, 1, 8192, 8192, 32, 64, *ranks, form), 1 << 30,
                                  check=False, **cfg)
            except Exception as exc:
                print(f"sweep prefill {cfg} failed: {type(exc).__name__}", flush=True)
                continue
            res.append((us, cfg))
        res.sort(key=lambda x: x[0])
        rows.append({"section": "sweep", "shape": f"prefill-{form}", "best": [(u, c) for u, c in res[:5]]})
        print(f"sweep prefill {form} 8192: " + "; ".join(f"{u:.1f}us {c}" for u, c in res[:5]), flush=True)


# Decode launch variants: (label, config fields changed, `launch_config`). "default" = the launcher's default
# config; "tma=off": token factors through per-thread pointer loads instead of TMA descriptors; "pdl=off": the merge
# launched the usual way, not as a programmatic dependent. Variants measured and dropped are in benchmarks/NOTES.md.
PAPER_VARIANTS = [("default", {}), ("tma=off", dict(tma=False)), ("pdl=off", dict(pdl=False))]
T6_VARIANTS = [("default", {}), ("tma=off", dict(tma=False)), ("min_chunk=32", dict(min_chunk=32)),
               ("head_tile=all", dict(head_tile=128))]
# "group-major": the same kernel over SDPA's layout (each KV head's tokens contiguous), not the cache's.
GQA_VARIANTS = [("default", {}), ("waves=2", dict(waves=2)), ("waves=4", dict(waves=4)),
                ("group-major", dict(group_major=True)), ("stages=4", dict(num_stages=4)),
                ("block_t=64,stages=3", dict(block_t=64, num_stages=3)), ("warps=8", dict(num_warps=8)),
                ("pdl=on", dict(pdl=True)), ("tma=off", dict(tma=False))]
# "prebuild=off": factored queries rebuilt in every (query tile, head) program instead of by their own kernel before.
PREFILL_VARIANTS = [("default", {}), ("tma=off", dict(tma=False)), ("prebuild=off", dict(prebuild_queries=False)),
                    ("stages=2", dict(num_stages=2))]
MHA_PREFILL_VARIANTS = [("default", {}), ("tma=on", dict(tma=True))]
WAVES_VARIANTS = [("default", {}), ("waves=2", dict(waves=2)), ("waves=4", dict(waves=4))]

# (section, name, B, N, M, H, D, (R_Q, R_K, R_V), form, variants)
VARIANT_SHAPES = [
    ("decode", "paper", 1, 1, 1 << 16, 32, 64, (16, 1, 1), "contextual", PAPER_VARIANTS),
    ("decode", "paper", 1, 1, 1 << 19, 32, 64, (16, 1, 1), "contextual", PAPER_VARIANTS),
    ("decode", "paper", 4, 1, 1 << 16, 32, 64, (16, 1, 1), "contextual", PAPER_VARIANTS),
    ("decode", "paper", 16, 1, 1 << 16, 32, 64, (16, 1, 1), "contextual", PAPER_VARIANTS),
    ("decode", "t6", 1, 1, 1 << 14, 34, 64, (6, 2, 2), "contextual", T6_VARIANTS),
    ("decode", "t6", 1, 1, 1 << 18, 78, 64, (6, 2, 2), "contextual", T6_VARIANTS),
    ("decode", "t6", 16, 1, 1 << 16, 34, 64, (6, 2, 2), "contextual", T6_VARIANTS),
    ("decode", "llama3-8b", 16, 1, 1 << 12, 32, 128, (0, 8, 8), "fixed", GQA_VARIANTS),
    ("decode", "llama3-8b", 16, 1, 1 << 14, 32, 128, (0, 8, 8), "fixed", GQA_VARIANTS),
    ("decode", "llama3-8b", 4, 1, 1 << 16, 32, 128, (0, 8, 8), "fixed", GQA_VARIANTS),
    ("decode", "llama3-8b", 4, 1, 1 << 18, 32, 128, (0, 8, 8), "fixed", GQA_VARIANTS),
    ("decode", "smollm2-135m", 1, 1, 1 << 16, 9, 64, (0, 3, 3), "fixed", GQA_VARIANTS),
    ("decode", "smollm2-135m", 16, 1, 1 << 14, 9, 64, (0, 3, 3), "fixed", GQA_VARIANTS),
    ("decode", "smollm2-waves", 1, 1, 1 << 18, 9, 64, (0, 3, 3), "fixed", WAVES_VARIANTS),
    ("decode", "smollm2-waves", 4, 1, 1 << 18, 9, 64, (0, 3, 3), "fixed", WAVES_VARIANTS),
    ("decode", "smollm2-waves", 8, 1, 1 << 16, 9, 64, (0, 3, 3), "fixed", WAVES_VARIANTS),
    ("decode", "smollm2-waves", 16, 1, 1 << 16, 9, 64, (0, 3, 3), "fixed", WAVES_VARIANTS),
    ("prefill", "paper", 1, 8192, 8192, 32, 64, (16, 1, 1), "contextual", PREFILL_VARIANTS),
    ("prefill", "paper", 1, 2048, 2048, 32, 64, (16, 1, 1), "contextual", PREFILL_VARIANTS),
    ("prefill", "paper", 1, 4096, 8192, 32, 64, (16, 1, 1), "contextual", PREFILL_VARIANTS),
    ("prefill", "paper", 1, 1024, 2048, 32, 64, (16, 1, 1), "contextual", PREFILL_VARIANTS),
    ("prefill", "paper", 1, 256, 4096, 32, 64, (16, 1, 1), "contextual", PREFILL_VARIANTS),
    ("prefill", "t6", 1, 2048, 2048, 34, 64, (6, 2, 2), "contextual", PREFILL_VARIANTS),
    ("prefill", "mha", 1, 8192, 8192, 32, 64, (0, 32, 32), "fixed", MHA_PREFILL_VARIANTS),
    ("prefill", "mha", 1, 2048, 2048, 32, 64, (0, 32, 32), "fixed", MHA_PREFILL_VARIANTS),
]


def launch_variants(run: Runner, bw: float, rows: list[dict], only: str = "") -> None:
    """Time each shape's launch variants in one run (each on its own fresh random inputs of that shape), each
    checked against float64 where it fits.

    `only`: comma-separated shape names or forms to keep (e.g. "paper,fixed"); empty = all.
    """
    keep = set(filter(None, only.split(",")))
    for section, name, B, N, M, H, D, ranks, form, variants in VARIANT_SHAPES:
        if keep and not keep & {name, form, section}:
            continue
        R_Q, R_K, R_V = ranks
        tok = (R_K + R_V) * (H + D) * 2 if form != "fixed" else 2 * R_K * D * 2
        floor = B * M * tok / bw * 1e6 if section == "decode" else None
        res = []
        for label, knobs in variants:
            check = B * M <= (1 << 18) and section == "decode" or (section == "prefill" and M <= 4096)
            knobs = dict(knobs)
            group_major = knobs.pop("group_major", False)
            try:
                us, err = time_ours(run, functools.partial(tpa_inputs, run, B, N, M, H, D, R_Q, R_K, R_V, form,
                                                           group_major),
                                    B * M * tok, check=check, launcher=_launcher(section), **knobs)
            except Exception as exc:  # a variant that does not compile (registers, shared memory)
                print(f"variant {section} {name} {label} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                continue
            res.append({"label": label, "us": us, "pct_floor": 100 * floor / us if floor else None, "rel_err": err})
        rows.append({"section": "variants", "kind": section, "shape": name, "H": H, "B": B, "N": N, "M": M,
                     "floor_us": floor, "results": res})
        print(f"variants {section} {name} H={H} B={B} N={N} M=2^{int(math.log2(M))} floor {fmt(floor)}us: " +
              "; ".join(f"{r['label']} {r['us']:.1f} ({fmt(r['pct_floor'], '.0f')}%, err {fmt(r['rel_err'], '.1e')})"
                        for r in res), flush=True)


def _launcher(section: str) -> Callable:
    if section == "decode":
        from flashtpa.triton_decode import decode_attention

        return decode_attention
    from flashtpa.triton_prefill import prefill_attention

    return prefill_attention


# The official kernel at these shapes (H, B, M, R_Q): the paper shape where OFFICIAL_ANCHORS has timings (a check
# that this harness reproduces them), then T6 shapes.
OFFICIAL_SHAPES = [(32, B, M, 16) for B, M in OFFICIAL_ANCHORS] + [
    (H, B, M, 6) for H in (34, 78) for B in (1, 16) for M in (1 << 14, 1 << 16, 1 << 18)] + [
    (47, 4, 1 << 16, 6), (61, 4, 1 << 16, 6)]


def load_official(folder: Path):
    """The official split-M decode (tensorgi/TPA decode/flashtpa_decode_triton_multi_kvrank.py), from a folder
    the user provides: its code is not part of this repository."""
    import importlib.util

    path = folder / "flashtpa_decode_triton_multi_kvrank.py"
    spec = importlib.util.spec_from_file_location("official_flashtpa_decode", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def official_call(mod, s: dict, R_Q: int, pad_to: int) -> Callable[[], torch.Tensor]:
    """The official wrapper on our inputs: its bk/bv layout is [B, M, D, R] (ours [B, T, R, D]: a transposed view;
    the wrapper permutes and copies every factor on each call either way). R_Q below 16 does not compile in its
    kernel (tl.dot needs 16), so the query factors are zero-padded to `pad_to` ranks beforehand (not timed)."""
    aq, bq = s["aq"], s["bq"]
    if pad_to > R_Q:
        aq = torch.cat([aq, aq.new_zeros(*aq.shape[:-1], pad_to - R_Q)], -1)
        bq = torch.cat([bq, bq.new_zeros(bq.shape[0], bq.shape[1], pad_to - R_Q, bq.shape[3])], 2)
    return lambda: mod.tpa_decode_parallel_bn_triton(aq, s["ak"], s["av"], bq, s["bk"].transpose(2, 3),
                                                     s["bv"].transpose(2, 3), scale_q=1.0 / R_Q)


def official_time(run: Runner, mod, make: Callable[[], dict], set_bytes: int, R_Q: int) -> float:
    """One round of the official kernel on fresh inputs: microseconds per call (CUDA graph)."""
    sets = [make() for _ in range(run.n_sets(set_bytes))]
    calls = [official_call(mod, st, R_Q, 16) for st in sets]
    calls[0]()  # autotunes on first call (outside the graph)
    us = run.time_calls(calls)
    del sets, calls
    run.free()
    return us


def section_official(run: Runner, bw: float, folder: Path, rows: list[dict]) -> None:
    """Ours and the official kernel at the same shapes in the same run, each on its own fresh random inputs of the
    same distribution: time (CUDA graph) and error vs float64. Every shape is timed before any float64 check runs
    (a large check slowed the kernel timed right after it, benchmarks/NOTES.md)."""
    mod = load_official(folder)
    D = 64
    unpadded_tried = False
    shapes = []
    for H, B, M, R_Q in OFFICIAL_SHAPES:
        R_K = R_V = 1 if R_Q == 16 else 2
        tok = (R_K + R_V) * (H + D) * 2
        r = {"section": "official", "H": H, "B": B, "M": M, "ranks": (R_Q, R_K, R_V),
             "floor_us": B * M * tok / bw * 1e6, "anchor_us": OFFICIAL_ANCHORS.get((B, M)) if H == 32 else None}
        make = functools.partial(tpa_inputs, run, B, 1, M, H, D, R_Q, R_K, R_V, "contextual")
        r["ours_us"], _ = time_ours(run, make, B * M * tok, check=False)
        if R_Q < 16 and not unpadded_tried:
            unpadded_tried = True
            rows.append(official_unpadded(mod, make(), H, B, M, R_Q))
        try:
            r["official_us"] = median_round(run, lambda: (official_time(run, mod, make, B * M * tok, R_Q), ""))[0]
        except Exception as exc:
            r["official_us"] = None
            r["official_failure"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        run.free()
        shapes.append((r, make))
    for r, make in shapes:
        s = make()
        r["ours_err"] = checked_error(run, s, lambda: attention(**s, backend=run.backend))
        R_Q = r["ranks"][0]
        r["official_err"] = checked_error(run, s, official_call(mod, s, R_Q, 16)) if r["official_us"] else None
        del s
        run.free()
        r["speedup"] = r["official_us"] / r["ours_us"] if r["official_us"] else None
        rows.append(r)
        print(f"official H={r['H']} B={r['B']:2d} M={_pow2(r['M'])} ranks {r['ranks']}: ours {r['ours_us']:8.1f} us "
              f"(err {fmt(r['ours_err'], '.1e')})  official {fmt(r['official_us'])} us (err "
              f"{fmt(r['official_err'], '.1e')})  x{fmt(r['speedup'], '.2f')}  anchor {fmt(r['anchor_us'])}  "
              f"floor {r['floor_us']:.1f}", flush=True)


def official_unpadded(mod, s: dict, H: int, B: int, M: int, R_Q: int) -> dict:
    """Whether the official kernel runs with R_Q below 16 as given (its tl.dot needs 16: docs/kernels.md)."""
    try:
        official_call(mod, s, R_Q, R_Q)()
        note = "ran"
    except Exception as exc:  # tl.dot needs K, N >= 16
        note = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:160]}"
    print(f"official kernel with R_Q = {R_Q} unpadded: {note}", flush=True)
    return {"section": "official_unpadded", "H": H, "B": B, "M": M, "R_Q": R_Q, "result": note}


def _pow2(m: int) -> str:
    return f"2^{int(math.log2(m))}"


# section -> (column headers, one row's cells); `variants` rows expand to one line per variant.
TABLES: dict[str, tuple[list[str], Callable[[dict], list[str]]]] = {
    "paper": (["B", "M", "ours us", "floor us", "% floor", "rel err", "SDPA MHA", "SDPA GQA-4", "SDPA MQA",
               "official (anchor)"],
              lambda r: [r["B"], _pow2(r["M"]), f"{r['ours_us']:.1f}", f"{r['floor_us']:.1f}", f"{r['pct_floor']:.0f}%",
                         fmt(r["rel_err"], ".1e"), fmt(r["sdpa_mha_us"]), fmt(r["sdpa_gqa4_us"]), fmt(r["sdpa_mqa_us"]),
                         fmt(r["official_us"])]),
    "t6": (["H", "B", "M", "TPA (6,2,2) us", "floor us", "% floor", "rel err", "KV-only us", "KV-only err"],
           lambda r: [r["H"], r["B"], _pow2(r["M"]), f"{r['ours_us']:.1f}", f"{r['floor_us']:.1f}",
                      f"{r['pct_floor']:.0f}%", fmt(r["rel_err"], ".1e"), f"{r['kv_only_us']:.1f}",
                      fmt(r["kv_only_err"], ".1e")]),
    "fixed": (["shape (H/G/D)", "B", "M", "ours us", "SDPA GQA us", "ours/SDPA", "% floor", "rel err"],
              lambda r: [f"{r['shape']} ({r['H']}/{r['G']}/{r['D']})", r["B"], _pow2(r["M"]), f"{r['ours_us']:.1f}",
                         f"{r['sdpa_us']:.1f} ({r['sdpa_backend']})", f"{r['ratio']:.2f}", f"{r['pct_floor']:.0f}%",
                         fmt(r["rel_err"], ".1e")]),
    "variants": (["kind", "shape", "H", "B", "N", "M", "floor us", "variant", "us", "% floor", "rel err"],
                 lambda r: [r["kind"], r["shape"], r["H"], r["B"], r["N"], _pow2(r["M"]), fmt(r["floor_us"]),
                            r["label"], f"{r['us']:.1f}", fmt(r["pct_floor"], ".0f"), fmt(r["rel_err"], ".1e")]),
    "official": (["H", "B", "M", "ranks", "ours us", "ours err", "official us", "official err", "official/ours",
                  "anchor us", "floor us"],
                 lambda r: [r["H"], r["B"], _pow2(r["M"]), r["ranks"], f"{r['ours_us']:.1f}", fmt(r["ours_err"], ".1e"),
                            fmt(r["official_us"]), fmt(r["official_err"], ".1e"), fmt(r["speedup"], ".2f"),
                            fmt(r["anchor_us"]), f"{r['floor_us']:.1f}"]),
    "prefill": (["N", "M", "SDPA causal us", "TPA (16,1,1) us", "ratio", "rel err", "MHA-as-TPA us", "ratio",
                 "rel err"],
                lambda r: [r["N"], r["M"], f"{r['sdpa_us']:.1f} ({r['sdpa_backend']})", f"{r['contextual_us']:.1f}",
                           f"{r['contextual_ratio']:.2f}", fmt(r["contextual_err"], ".1e"), f"{r['fixed_us']:.1f}",
                           f"{r['fixed_ratio']:.2f}", fmt(r["fixed_err"], ".1e")]),
}


def markdown(rows: list[dict], meta: dict) -> str:
    out = [f"GPU {meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, copy bandwidth "
           f"{meta['copy_bw_tbs']:.2f} TB/s, {meta['date']}, median of {meta['rounds']} round(s)", ""]
    for section, (header, cells) in TABLES.items():
        picked = [r for r in rows if r["section"] == section]
        if section == "variants":  # one line per variant of each shape
            picked = [{**r, **v} for r in picked for v in r["results"]]
        if not picked:
            continue
        out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        out += ["| " + " | ".join(str(c) for c in cells(r)) + " |" for r in picked]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path("."), help="folder for kernels_bench.{json,md}")
    p.add_argument("--sections", default="paper,t6,fixed,prefill")
    p.add_argument("--sweep", action="store_true", help="also sweep launch parameters (tuning the defaults)")
    p.add_argument("--variants", nargs="?", const="all", default="",
                   help="also time launch variants (optionally only shapes/forms named, comma-separated)")
    p.add_argument("--official", type=Path, default=None,
                   help="folder holding tensorgi/TPA's decode/flashtpa_decode_triton_multi_kvrank.py: time it "
                        "beside ours at the same shapes (its code is not part of this repository)")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on any device (plumbing check)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1,
                   help="time every configuration this many times on fresh inputs and report the median round")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    run = Runner(device, "auto" if device.type == "cuda" else "torch", args.reps, args.rounds)
    import triton

    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "triton": triton.__version__,
            "gpu": torch.cuda.get_device_name() if run.cuda else "cpu", "command": " ".join(sys.argv),
            "rounds": args.rounds}
    bws = run.copy_bandwidth() if run.cuda else {"max": 1e11}
    bw = bws["max"]
    meta["copy_bw_tbs"] = bw / 1e12
    meta["copy_bw_all_tbs"] = {k: v / 1e12 for k, v in bws.items()}
    print(f"{meta['gpu']} torch {meta['torch']} triton {meta['triton']} copy bw (TB/s) "
          + ", ".join(f"{k} {v / 1e12:.2f}" for k, v in bws.items()), flush=True)
    rows: list[dict] = []
    sections = set(args.sections.split(","))
    if args.smoke:
        Ms, Bs, Ns = [256, 1024], [1, 2], [256]
    else:
        Ms, Bs, Ns = [1 << e for e in range(12, 20)], [1, 4, 16], [2048, 4096, 8192, 16384, 32768]
    t0 = time.time()
    if "paper" in sections:
        section_paper(run, bw, Ms, Bs, rows)
    if "t6" in sections:
        section_t6(run, bw, Ms[::2][:3] if args.smoke else [1 << 14, 1 << 16, 1 << 18], Bs, rows)
    if "fixed" in sections:
        section_fixed(run, bw, Ms if args.smoke else [1 << 12, 1 << 14, 1 << 16, 1 << 18], Bs, rows)
    if "prefill" in sections:
        section_prefill(run, Ns, rows)
    if args.variants and run.cuda:
        launch_variants(run, bw, rows, "" if args.variants == "all" else args.variants)
    if args.official is not None and run.cuda:
        section_official(run, bw, args.official, rows)
    if args.sweep and run.cuda:
        sweep(run, rows)
    resolve_checks(rows)
    meta["seconds"] = time.time() - t0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kernels_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    table = markdown(rows, meta)
    (args.out / "kernels_bench.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
