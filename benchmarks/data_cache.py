"""The Omniglot cache before and after it held the rotated pools, memory-mapped: its build (CPU seconds), the
resident memory of two workers, and what torchvision would do instead of the hand-written decoding.

    python -m benchmarks.data_cache             # the builds, both splits; writes benchmarks/results/data_cache.json
    python -m benchmarks.data_cache --memory    # two workers' memory; adds it to the same JSON
    python -m benchmarks.data_cache --data-root DIR --repeats 3 --before-ref REF

"Before" is the code of commit ``--before-ref`` (default :data:`BEFORE_REF`, the last one whose cache held the
characters alone, rotated after loading into each process's own copy), extracted with ``git archive`` into a
temporary folder; "after" is this checkout. Each runs in fresh processes with its own code first on
``PYTHONPATH``, on the official zips in ``--data-root`` (default ``../shared/data/omniglot`` beside this checkout),
symlinked into a temporary data root so that the caches are written there (and removed afterwards).

Build: a fresh process builds the cache of one split rule (``data.split`` alphabets, then vinyals; 28×28) and
then loads it once from the cache. The figure is the CPU time of the process (user + sys, ``getrusage``, all
threads) in the building call, ``cpu_seconds``; wall-clock seconds are recorded too but disturb easily (another
job on the machine), CPU time much less. The variants alternate, before first in odd rounds and after first in
even ones, ``--repeats`` rounds; medians are compared. Also: CPU µs per drawing of three ways to decode and
resize a PNG drawing: PIL as the code does, ``torchvision.io.decode_png`` + PIL's resize, ``decode_png`` +
torchvision's antialiased bilinear tensor resize (no LANCZOS for tensors), and whether each gives PIL's pixels.

Memory (``--memory``): per variant, the cache is built first; then two worker processes side by side load the
splits as a Ray Train worker does (``load_splits(cfg.data)`` with ``tune_configs/quick.yaml``, ``data.root`` at
the copy), check the tasks and draw 16 meta-training tasks. Read from ``/proc/<pid>/smaps_rollup`` of each, in
MB: RSS, PSS (each page shared by n processes counted 1/n), shared and private pages, anonymous memory; at three
points: after the imports, after the tasks, and after reading every pool image once (where a long run ends up,
its tasks reaching every page). The workers hash the tasks they drew: before and after must agree.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "data_cache.json"
DATA_ROOT = ROOT.parent / "shared" / "data" / "omniglot"
BEFORE_REF = "0562f33c60f503cc3c9077079e132b3ee8a6250c"  # the cache held the characters, rotated after loading
SETS = ("images_background", "images_evaluation")
SPLITS_BY = ("alphabets", "vinyals")
SIZE = 28
MB = 1024 * 1024


# ------------------------------------------------------------------------------------------ child processes

def _cpu() -> float:
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def child_build(root: str, split: str) -> dict:
    """Build the cache of ``split`` from the zips under ``root`` (none there yet), then load it from the cache."""
    import metanas_ray
    from metanas_ray.data import load_omniglot

    cpu, wall = _cpu(), time.perf_counter()
    built = load_omniglot(root, SIZE, download=False, split=split)
    cpu, wall = _cpu() - cpu, time.perf_counter() - wall
    load_cpu, load_wall = _cpu(), time.perf_counter()
    loaded = load_omniglot(root, SIZE, download=False, split=split)
    load_cpu, load_wall = _cpu() - load_cpu, time.perf_counter() - load_wall
    if built.from_cache or not loaded.from_cache:
        raise SystemExit(f"expected a build, then a cache hit (from_cache: {built.from_cache}, {loaded.from_cache})")
    caches = list((Path(root) / ".metanas_cache").glob("*.pt"))
    return {"cpu_seconds": cpu, "wall_seconds": wall, "load_cpu_seconds": load_cpu, "load_wall_seconds": load_wall,
            "cache_mb": sum(p.stat().st_size for p in caches) / MB, "classes": loaded.summary(),
            "module": metanas_ray.__file__}


def child_worker(root: str, config: str, tasks: int) -> None:
    """Load the splits as a Ray Train worker does, draw ``tasks`` meta-training tasks, reading every pool image
    at the end; stop after each stage ("ready <json>" on stdout) until a line arrives on stdin."""
    import hashlib

    def stage(name: str, **info) -> None:
        print("ready " + json.dumps({"stage": name, **info}), flush=True)
        sys.stdin.readline()

    import torch

    import metanas_ray
    from metanas_ray.config import load
    from metanas_ray.data import check_tasks, load_splits

    cfg = load(config, {"data.root": root})
    stage("imported", module=metanas_ray.__file__)
    splits = load_splits(cfg.data)
    samplers = check_tasks(cfg.data, splits, cfg.run.seed)
    digest = hashlib.sha256()
    for i in range(tasks):
        t = samplers["train"].sample(i // cfg.meta.meta_batch, i % cfg.meta.meta_batch)
        digest.update(t.x_train.numpy().tobytes() + t.x_query.numpy().tobytes() + bytes(str(t.classes), "ascii"))
    stage("tasks", from_cache=splits.from_cache, tasks_sha256=digest.hexdigest(), summary=splits.summary())
    total = sum(int(splits.pool(s).images.sum(dtype=torch.int64)) for s in ("train", "val", "test"))
    stage("every_image_read", pixel_sum=total)


# ------------------------------------------------------------------------------------------ the parent

def _machine() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "load_average_1m": os.getloadavg()[0], "nice": os.nice(0)}
    for mod in ("torch", "PIL", "numpy", "torchvision"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    return info


def _data_root(base: Path, source: Path) -> Path:
    """A fresh writable data root holding symlinks to the two zips (the cache goes into its .metanas_cache)."""
    base.mkdir(parents=True)
    for name in SETS:
        (base / f"{name}.zip").symlink_to(source / f"{name}.zip")
    return base


def _env(code: Path) -> dict:
    return {**os.environ, "PYTHONPATH": f"{code}{os.pathsep}{os.environ.get('PYTHONPATH', '')}".rstrip(os.pathsep)}


# a child runs this file's main() with the variant's code first on sys.path: not as a script, whose folder would
# come first (benchmarks/cuda.py would hide the package torch.cuda imports), nor with -m (its benchmarks package)
_RUN_THIS_FILE = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('data_cache', {!r}); "
                  "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
                  "sys.exit(m.main(sys.argv[1:]))")


def _child_command(*args: str) -> list[str]:
    return [sys.executable, "-c", _RUN_THIS_FILE.format(str(Path(__file__).resolve())), "--child", *args]


def _child(code: Path, *args: str) -> dict:
    out = subprocess.run(_child_command(*args), env=_env(code), cwd=code, capture_output=True, text=True,
                         timeout=900)
    if out.returncode:
        raise SystemExit(f"child {' '.join(args)} with {code} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if not str(result.get("module", "")).startswith(str(code)):
        raise SystemExit(f"child ran {result.get('module')}, not the code in {code}")
    return result


def _checkout(ref: str, dest: Path) -> Path:
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def decode_ways(source: Path, n: int, repeats: int) -> dict:
    """CPU µs per drawing of PIL (the code's ``_decode``) against torchvision's decoding, and their pixels."""
    import numpy as np
    import torch

    from metanas_ray.data.omniglot import _decode
    with zipfile.ZipFile(source / "images_background.zip") as zf:
        names = [m for m in zf.namelist() if m.endswith(".png")]
        datas = [zf.read(m) for m in names[:: max(1, len(names) // n)][:n]]
    ways = {"pil": lambda d: _decode(d, SIZE)}
    try:
        from PIL import Image
        from torchvision.io import ImageReadMode, decode_png
        from torchvision.transforms.v2 import functional as F
    except ImportError as e:
        return {"drawings": len(datas), "torchvision": f"not installed ({e})"}

    def png(d: bytes) -> torch.Tensor:
        return decode_png(torch.frombuffer(bytearray(d), dtype=torch.uint8), ImageReadMode.GRAY)

    def tv_decode_pil_resize(d: bytes) -> np.ndarray:
        im = Image.fromarray(png(d)[0].numpy(), "L").resize((SIZE, SIZE), Image.Resampling.LANCZOS)
        return 255 - np.asarray(im, dtype=np.uint8)

    def tv_decode_tv_resize(d: bytes) -> np.ndarray:
        return (255 - F.resize(png(d), [SIZE, SIZE], antialias=True))[0].numpy()

    ways.update({"torchvision_decode_png_pil_resize": tv_decode_pil_resize,
                 "torchvision_decode_png_tensor_resize": tv_decode_tv_resize})
    torch.set_num_threads(1)
    us: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(repeats):
        for name in (list(ways) if r % 2 == 0 else list(ways)[::-1]):
            cpu = _cpu()
            for d in datas:
                ways[name](d)
            us[name].append((_cpu() - cpu) / len(datas) * 1e6)
    ref = np.stack([ways["pil"](d) for d in datas])
    out = {"drawings": len(datas), "cpu_us_per_drawing": us,
           "median_cpu_us_per_drawing": {k: statistics.median(v) for k, v in us.items()}}
    out["same_pixels_as_pil"] = {}
    out["fraction_of_pixels_differing"] = {}
    for name, f in ways.items():
        got = np.stack([f(d) for d in datas])
        out["same_pixels_as_pil"][name] = bool(np.array_equal(got, ref))
        out["fraction_of_pixels_differing"][name] = float((got != ref).mean())
    return out


def run_builds(args: argparse.Namespace, before: Path, tmp: Path) -> dict:
    code = {"before": before, "after": ROOT}
    runs: dict[str, dict[str, list[dict]]] = {s: {v: [] for v in code} for s in SPLITS_BY}
    for r in range(args.repeats):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for split in SPLITS_BY:
            for variant in order:
                root = _data_root(tmp / f"build-{r}-{split}-{variant}", args.data_root)
                try:
                    res = _child(code[variant], "build", str(root), split)
                finally:
                    shutil.rmtree(root)
                runs[split][variant].append(res)
                print(f"round {r + 1} {split:9s} {variant:6s}: build {res['cpu_seconds']:.2f} CPU s "
                      f"({res['wall_seconds']:.2f} s wall), cache hit {res['load_cpu_seconds']:.3f} CPU s, "
                      f"cache {res['cache_mb']:.1f} MB", flush=True)
    summary = {}
    for split, by in runs.items():
        med = {v: {k: statistics.median(x[k] for x in by[v]) for k in ("cpu_seconds", "wall_seconds",
                                                                          "load_cpu_seconds", "cache_mb")}
               for v in by}
        summary[split] = {"median": med, "ratio_after_to_before_cpu_seconds":
                          med["after"]["cpu_seconds"] / med["before"]["cpu_seconds"], "runs": by}
    return summary


def _rollup(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024  # kB → MB
    return {"rss_mb": fields["Rss"], "pss_mb": fields["Pss"], "pss_file_mb": fields.get("Pss_File"),
            "pss_anon_mb": fields.get("Pss_Anon"),
            "shared_mb": fields["Shared_Clean"] + fields["Shared_Dirty"],
            "private_mb": fields["Private_Clean"] + fields["Private_Dirty"], "anonymous_mb": fields["Anonymous"]}


def run_workers(code: Path, root: Path, config: Path, tasks: int, workers: int) -> dict:
    procs = [subprocess.Popen(_child_command("worker", str(root), str(config), str(tasks)), env=_env(code), cwd=code,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for _ in range(workers)]
    stages: list[dict] = []
    try:
        for _ in ("imported", "tasks", "every_image_read"):
            infos = []
            for p in procs:
                line = p.stdout.readline()
                if not line.startswith("ready "):
                    raise SystemExit(f"worker {p.pid} with {code} failed (exit {p.wait()}): {line}")
                infos.append(json.loads(line[len("ready "):]))
            stages.append({"stage": infos[0]["stage"], "workers": [{**_rollup(p.pid), **info}
                                                                   for p, info in zip(procs, infos)]})
            for p in procs:
                p.stdin.write("go\n")
                p.stdin.flush()
        for p in procs:
            p.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return {"stages": stages}


def run_memory(args: argparse.Namespace, before: Path, tmp: Path) -> dict:
    out = {}
    for variant, code in (("before", before), ("after", ROOT)):
        root = _data_root(tmp / f"memory-{variant}", args.data_root)
        try:
            _child(code, "build", str(root), "alphabets")  # the workers then hit the cache, as after a first run
            res = run_workers(code, root, code / "tune_configs" / "quick.yaml", args.tasks, args.workers)
        finally:
            shutil.rmtree(root)
        for s in res["stages"]:
            print(f"{variant:6s} {s['stage']:16s} " + "; ".join(
                f"RSS {w['rss_mb']:.0f} MB, PSS {w['pss_mb']:.0f}, shared {w['shared_mb']:.0f}, private "
                f"{w['private_mb']:.0f}" for w in s["workers"]), flush=True)
        out[variant] = res
    hashes = {v: {w["tasks_sha256"] for s in out[v]["stages"] if s["stage"] == "tasks" for w in s["workers"]}
              for v in out}
    out["tasks_identical_before_and_after"] = len(hashes["before"] | hashes["after"]) == 1

    def per_worker(variant: str, stage: str, key: str) -> float:
        return statistics.mean(w[key] for s in out[variant]["stages"] if s["stage"] == stage for w in s["workers"])

    out["mean_per_worker_mb"] = {v: {st: {k: per_worker(v, st, k) for k in ("rss_mb", "pss_mb", "private_mb",
                                                                          "shared_mb")}
                                     for st in ("imported", "tasks", "every_image_read")} for v in ("before", "after")}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.data_cache", description=__doc__.split("\n\n")[0])
    p.add_argument("--memory", action="store_true", help="measure two workers' memory instead of the builds")
    p.add_argument("--data-root", type=Path, default=DATA_ROOT, help="folder with the two official Omniglot zips")
    p.add_argument("--before-ref", default=BEFORE_REF, help="the git commit whose code is 'before'")
    p.add_argument("--repeats", type=int, default=3, help="rounds of builds (each: before and after, both splits)")
    p.add_argument("--drawings", type=int, default=2000, help="drawings decoded per way (the torchvision check)")
    p.add_argument("--tasks", type=int, default=16, help="meta-training tasks each worker draws (--memory)")
    p.add_argument("--workers", type=int, default=2, help="worker processes side by side (--memory)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "build":
            print(json.dumps(child_build(*rest)))
        else:
            child_worker(rest[0], rest[1], int(rest[2]))
        return 0
    if not all((args.data_root / f"{n}.zip").is_file() for n in SETS):
        p.error(f"--data-root {args.data_root} must hold {' and '.join(n + '.zip' for n in SETS)}")
    if args.memory and not Path("/proc/self/smaps_rollup").is_file():
        p.error("--memory needs Linux's /proc/<pid>/smaps_rollup")
    command = " ".join(["python -m benchmarks.data_cache", *(sys.argv[1:] if argv is None else argv)])
    with tempfile.TemporaryDirectory(prefix="data_cache_") as tmp_name:
        tmp = Path(tmp_name)
        before = _checkout(args.before_ref, tmp / "before")
        if args.memory:
            section = {"what": f"memory of {args.workers} workers side by side, each loading the Omniglot splits "
                               f"(tune_configs/quick.yaml) from the cache and drawing {args.tasks} tasks; MB from "
                               f"/proc/<pid>/smaps_rollup (PSS counts a page shared by n processes 1/n)",
                       **run_memory(args, before, tmp)}
        else:
            section = {"what": "CPU seconds (user + sys of the building process, getrusage) to build the Omniglot "
                               "cache from the zips, 28x28, per split rule; the primary figure (wall-clock seconds "
                               "were disturbed by another job on the machine)",
                       "builds": run_builds(args, before, tmp),
                       "decoding": decode_ways(args.data_root, args.drawings, 2 * args.repeats)}
    section = {"command": command, "before_ref": args.before_ref, "machine": _machine(), **section}
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    result["memory" if args.memory else "build"] = section
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    if args.memory:
        m = section["mean_per_worker_mb"]
        for stage in ("tasks", "every_image_read"):
            b, a = m["before"][stage], m["after"][stage]
            print(f"{stage}: per worker RSS {b['rss_mb']:.0f} -> {a['rss_mb']:.0f} MB, PSS {b['pss_mb']:.0f} -> "
                  f"{a['pss_mb']:.0f} MB, private {b['private_mb']:.0f} -> {a['private_mb']:.0f} MB")
        print(f"tasks identical before and after: {section['tasks_identical_before_and_after']}")
    else:
        for split, s in section["builds"].items():
            b, a = s["median"]["before"], s["median"]["after"]
            print(f"{split}: build {b['cpu_seconds']:.2f} -> {a['cpu_seconds']:.2f} CPU s "
                  f"(x{s['ratio_after_to_before_cpu_seconds']:.2f}), cache hit {b['load_cpu_seconds']:.3f} -> "
                  f"{a['load_cpu_seconds']:.3f} CPU s")
        d = section["decoding"]
        print("decoding, CPU µs per drawing: " + ", ".join(f"{k} {v:.0f}" for k, v in
                                                          d.get("median_cpu_us_per_drawing", {}).items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
