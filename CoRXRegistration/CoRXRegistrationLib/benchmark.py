"""Speed and memory benchmarks (commands, not timed tests): network forward per 128^3 pair for
every named configuration (each in a fresh process so its peak memory is its own), voxel TIA for
128^3 x 4 time points, every stage of ``register()`` in a warm process, the whole ``corx register`` and
``corx register-series`` commands as a user runs them, and the registration methods side by side."""
from __future__ import annotations

import multiprocessing as mp
import resource
import statistics
import sys
import time

import numpy as np
import torch

from .memory import release_free_memory


def _maxrss_mb(ru_maxrss: int) -> float:
    """getrusage's ru_maxrss in MB (kB on Linux, bytes on macOS)."""
    return ru_maxrss / 1024.0 if sys.platform != "darwin" else ru_maxrss / 1024.0 ** 2


def _peak_rss_mb() -> float:
    return _maxrss_mb(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


class PeakMemory:
    """Peak resident memory (MB) of this process while a block runs, above its level at entry.

    Samples /proc/self/statm every ``interval_s`` in a thread (Linux); elsewhere ``peak_mb`` is NaN.
    Methods compared in one process each get their own figure this way, which ru_maxrss cannot give.
    At entry the C allocator is asked to return freed heap pages to the system (glibc
    ``malloc_trim``), so the entry level is live memory and not what an earlier block freed; without
    that, a block that reuses those pages would read near 0."""

    def __init__(self, interval_s: float = 0.02):
        self.interval_s, self.peak_mb = interval_s, float("nan")

    @staticmethod
    def _rss_mb() -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self):
        import threading
        release_free_memory()      # elsewhere than glibc the entry level may include freed pages
        self._base = self._rss_mb()
        self._top = self._base
        self._stop = threading.Event()

        def poll():
            while not self._stop.wait(self.interval_s):
                v = self._rss_mb()
                if v is not None and v > self._top:
                    self._top = v
        if self._base is not None:
            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self._base is not None:
            self._stop.set()
            self._thread.join()
            last = self._rss_mb()
            self.peak_mb = max(self._top, last if last is not None else 0.0) - self._base
        return False


def _forward_worker(name: str, repeats: int, device: str, queue) -> None:
    try:
        from .engine import select_device
        from .network import build_network, count_parameters, named_config

        dev, _ = select_device(device)
        cfg = named_config(name)
        net = build_network(cfg).to(dev).eval()
        x = [torch.rand((1, 1) + cfg.image_size, device=dev) for _ in range(4)]
        base = _peak_rss_mb()
        times = []
        with torch.no_grad():
            for r in range(repeats + 1):          # first run is warm-up
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                net(*x)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if r:
                    times.append(time.perf_counter() - t)
        gpu_mb = torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else None
        queue.put({"config": name, "parameters": count_parameters(net), "size": "x".join(map(str, cfg.image_size)),
                   "median_s": statistics.median(times), "min_s": min(times), "peak_rss_mb": _peak_rss_mb(),
                   "rss_before_forward_mb": base, "gpu_peak_mb": gpu_mb, "device": str(dev)})
    except Exception as exc:  # reported in the table, not raised in the child
        queue.put({"config": name, "error": f"{type(exc).__name__}: {exc}"})


def benchmark_networks(names, repeats: int = 3, device: str = "cpu") -> list:
    ctx = mp.get_context("spawn")
    rows = []
    for name in names:
        q = ctx.Queue()
        p = ctx.Process(target=_forward_worker, args=(name, repeats, device, q))
        p.start()
        rows.append(q.get())
        p.join()
    return rows


def benchmark_voxel_tia(repeats: int = 3, shape=(128, 128, 128), seed: int = 0) -> dict:
    """Median time of compute_voxel_tia on a synthetic 4-time-point series with mixed kinetics."""
    from TIAMappingLib.voxel_tia import compute_voxel_tia

    rng = np.random.default_rng(seed)
    t = np.array([4.0, 24.0, 48.0, 120.0])
    a0 = rng.uniform(0, 5e5, shape).astype(np.float32)
    lam = rng.uniform(0.002, 0.05, shape).astype(np.float32)
    act = np.stack([a0 * np.exp(-lam * ti) for ti in t]) * rng.normal(1, 0.05, (4,) + shape).astype(np.float32)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compute_voxel_tia(list(act), t)
        times.append(time.perf_counter() - t0)
    return {"shape": "x".join(map(str, shape)) + " x 4", "median_s": statistics.median(times), "min_s": min(times),
            "threads": torch.get_num_threads()}


def _folder_mb(folder) -> float:
    from pathlib import Path
    return sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 1e6


def benchmark_registration(repeats: int = 3, model="bundled", device: str = "cpu", seed: int = 5000,
                           ct_grid: str = "spect") -> dict:
    """What one pair costs inside a warm process (the model loaded, one warm-up pair done): median
    seconds of every stage of ``engine.register`` (QA metrics and native-resolution outputs included,
    the CT warped onto ``ct_grid`` as ``corx register`` does) and of writing its files, for one
    clinical-size simulated pair (24 h onto 4 h); also the peak memory above the process's level before
    the pair (MB) and the files' size (MB)."""
    import tempfile

    from .engine import load_model, register, write_registration
    from .simulation import SimulationConfig, simulate_series

    sessions = simulate_series(SimulationConfig.preset("clinical", seed=seed)).sessions()
    loaded = load_model(model)
    runs, peaks = [], []
    for r in range(repeats + 1):                 # the first run is warm-up
        with tempfile.TemporaryDirectory() as out, PeakMemory() as memory:
            result = register(sessions[0], sessions[1], model=loaded, device=device, ct_grid=ct_grid)
            t = time.perf_counter()
            write_registration(result, out)
            timings = dict(result.timings_s, write=time.perf_counter() - t)
            timings["total with writing"] = timings["total"] + timings["write"]
            files_mb = _folder_mb(out)
        if r:
            runs.append(timings)
            peaks.append(memory.peak_mb)
    stages = {k: statistics.median(t[k] for t in runs) for k in runs[0]}
    return {"stages_s": stages, "peak_mb": max(peaks), "files_mb": files_mb, "repeats": repeats}


def format_stage_table(bench: dict) -> str:
    """Markdown: median seconds per stage of :func:`benchmark_registration`."""
    lines = ["| stage | median s |", "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in bench["stages_s"].items()]
    lines.append(f"\npeak memory of the pair {bench['peak_mb']:.0f} MB above the warm process; files "
                 f"{bench['files_mb']:.1f} MB; median of {bench['repeats']} after a warm-up pair")
    return "\n".join(lines)


# Runs the command as its own child and prints that child's peak resident memory (kB) and exit code. The
# extra process matters: Linux keeps the peak of the memory image a process had before exec, so a command
# forked straight from a large benchmark process would report at least that process's size.
_MEASURE = ("import os, subprocess, sys\n"
            "p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)\n"
            "_, status, usage = os.wait4(p.pid, 0)\n"
            "print(usage.ru_maxrss, os.waitstatus_to_exitcode(status))\n")


def _timed_command(argv: list) -> tuple:
    """(wall seconds, peak resident memory MB of that process) of one command run to completion."""
    import subprocess
    import tempfile
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", _MEASURE, *argv], stdout=subprocess.PIPE, stderr=err)
        seconds = time.perf_counter() - t0
        maxrss, code = (int(v) for v in done.stdout.split()[-2:])
        if code or done.returncode:
            err.seek(0)
            last = err.read().decode(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"{' '.join(argv[3:4])} failed (exit {code or done.returncode}): {' '.join(last)}")
    return seconds, _maxrss_mb(maxrss)


def benchmark_commands(repeats: int = 3, device: str = "cpu", seed: int = 5000, log=print) -> list:
    """What a user waits for: ``corx register`` on one pair and ``corx register-series`` on the whole
    4-time-point series, each a fresh process from start-up to the last file written (wall seconds,
    median of ``repeats``; peak resident memory of the process; files written per pair), on a clinical-size
    simulated series (SNUH protocol, 4 / 24 / 48 / 120 h) written to a temporary folder first."""
    import tempfile
    from pathlib import Path

    from .series_io import read_series
    from .simulation import SimulationConfig, simulate_series, write_series

    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        series = write_series(simulate_series(SimulationConfig.preset("clinical", seed=seed)), work / "series")
        manifest = read_series(series)                    # time points 0 and 1: 4 h and 24 h
        cli = [sys.executable, "-m", "CoRXRegistrationLib.cli"]
        pair = ["--fixed-ct", manifest.ct_paths[0], "--fixed-spect", manifest.spect_paths[0],
                "--moving-ct", manifest.ct_paths[1], "--moving-spect", manifest.spect_paths[1]]
        commands = {"corx register (one pair)": (cli + ["register", *map(str, pair), "--device", device], 1),
                    "corx register-series (4 time points)": (cli + ["register-series", str(series), "--device",
                                                                    device], 3)}
        rows = []
        for name, (argv, pairs) in commands.items():
            seconds, peaks = [], []
            for r in range(repeats):
                out = work / f"out-{len(rows)}-{r}"
                s, peak = _timed_command(argv + ["--out", str(out)])
                seconds.append(s)
                peaks.append(peak)
                files_mb = _folder_mb(out) / pairs
                log(f"{name} run {r + 1}/{repeats}: {s:.1f} s, peak {peak:.0f} MB")
            rows.append({"command": name, "median_s": statistics.median(seconds), "min_s": min(seconds),
                         "per_pair_s": statistics.median(seconds) / pairs, "peak_mb": max(peaks),
                         "files_mb_per_pair": files_mb, "repeats": repeats})
    return rows


def format_command_table(rows: list) -> str:
    lines = ["| command | median wall s | min s | wall s per pair | peak memory (MB) | files per pair (MB) |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['command']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['per_pair_s']:.2f} | "
              f"{r['peak_mb']:.0f} | {r['files_mb_per_pair']:.1f} |" for r in rows]
    return "\n".join(lines)


def benchmark_methods(methods, repeats: int = 3, device: str = "cpu", seed: int = 5000, model="bundled",
                      log=print) -> list:
    """Seconds and peak memory of each registration method on one clinical-size simulated pair (24 h
    onto 4 h), side by side in this process, every method measured afresh ``repeats`` times after one
    warm-up run of CoRX (model load, first forward). Each method yields its fields on the network grid,
    as in ``corx evaluate``; the "corx register()" row adds what ``corx register`` computes besides
    (QA metrics, the field on the SPECT grid, warped SPECT and CT, Jacobian) and writes its files."""
    import tempfile

    from .engine import register, write_registration
    from .evaluation import MethodRunner
    from .preprocess import network_grid
    from .simulation import SimulationConfig, simulate_series

    sessions = simulate_series(SimulationConfig.preset("clinical", seed=seed)).sessions()
    fixed, moving = sessions[0], sessions[1]
    runner = MethodRunner({"corx": model}, device=device)
    cfg = runner.models["corx"].preprocess
    grid = network_grid(fixed, cfg)
    unavailable = runner.skipped()
    runner.wanted = set(methods)
    register(fixed, moving, model=runner.models["corx"], device=device, native_outputs=False, qa_metrics=False)
    rows = []
    for method in list(methods) + ["corx register()"]:
        if method in unavailable:
            rows.append({"method": method, "error": unavailable[method]})
            continue
        seconds, peaks = [], []
        for r in range(repeats):
            runner.forget()
            if method == "corx register()":
                t0 = time.perf_counter()
                with PeakMemory() as memory, tempfile.TemporaryDirectory() as out:
                    write_registration(register(fixed, moving, model=runner.models["corx"], device=device,
                                                ct_grid="spect"), out)
                s = time.perf_counter() - t0
            else:
                with PeakMemory() as memory:
                    _, _, s, _ = runner.run(method, fixed, moving, grid, cfg)
            seconds.append(s)
            peaks.append(memory.peak_mb)
            log(f"{method} run {r + 1}/{repeats}: {s:.1f} s")
        rows.append({"method": method, "median_s": statistics.median(seconds), "min_s": min(seconds),
                     "peak_mb": max(peaks), "repeats": repeats})
    return rows


def format_method_table(rows: list, references=("ants-syn", "elastix-dd")) -> str:
    """Markdown: median and minimum seconds, peak memory, and speed relative to each of ``references``
    (those measured) per method."""
    refs = {name: next((r["median_s"] for r in rows if r["method"] == name and "median_s" in r), None)
            for name in references}
    refs = {k: v for k, v in refs.items() if v}
    lines = ["| method | median s / pair | min s | peak memory (MB) | " + " | ".join(f"speed vs {k}" for k in refs)
             + " |", "|---|---:|---:|---:|" + "---:|" * len(refs)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | not run: {r['error']} |||" + "|" * len(refs))
            continue
        speed = [f"{v / r['median_s']:.2g}x" if r["method"] != k else "-" for k, v in refs.items()]
        lines.append(f"| {r['method']} | {r['median_s']:.2f} | {r['min_s']:.2f} | {r['peak_mb']:.0f} | "
                     + " | ".join(speed) + " |")
    return "\n".join(lines)


def format_network_table(rows: list, paper: dict) -> str:
    lines = ["| configuration | parameters | paper | grid | forward median (s) | peak RSS (MB) | GPU peak (MB) |",
             "|---|---:|---:|---|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error: {r['error']} |||||")
            continue
        p = paper.get(r["config"])
        gpu = f"{r['gpu_peak_mb']:.0f}" if r["gpu_peak_mb"] is not None else "-"
        lines.append(f"| {r['config']} | {r['parameters']:,} | {f'{p:,}' if p else '-'} | {r['size']} | "
                     f"{r['median_s']:.2f} | {r['peak_rss_mb']:.0f} | {gpu} |")
    return "\n".join(lines)
