"""``predict`` as a user runs it, on Omniglot drawings it never saw: accuracy and seconds.

    python -m benchmarks.predict_omniglot runs/quick            # after the README's quick start
    python -m benchmarks.predict_omniglot runs/quick --way 5 --shots 1 --seed 0 --data-root ../shared/data/omniglot

Picks ``--way`` characters of different alphabets from ``images_evaluation.zip`` (the alphabets of our meta-test
split, never seen in meta-training), copies ``--shots`` original 105×105 PNG drawings of each into
``support/<character>/`` and all their other drawings (19 each at 1 shot) into ``query/<character>/``, then runs
``python -m metanas_ray.predict RUN --support support --query query --export export`` in a fresh process and
reports its printed accuracy and its wall-clock seconds (process start, model load, adaptation, predictions and
the export). Writes benchmarks/results/predict_omniglot.json. One draw of characters is one task: its accuracy
is one sample of the meta-test's distribution, not its mean; ``--seed`` draws another.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_folders(zip_path: Path, out: Path, way: int, shots: int, seed: int) -> list[str]:
    with zipfile.ZipFile(zip_path) as zf:
        chars: dict[tuple[str, str], list[str]] = {}
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".png"):
                chars.setdefault((parts[1], parts[2]), []).append(name)
        rng = random.Random(seed)
        alphabets = sorted({a for a, _ in chars})
        picked = [rng.choice(sorted(c for c in chars if c[0] == a)) for a in rng.sample(alphabets, way)]
        names = []
        for alphabet, char in picked:
            label = f"{alphabet}-{char}"
            names.append(label)
            files = sorted(chars[(alphabet, char)])
            rng.shuffle(files)
            for i, member in enumerate(files):
                target = out / ("support" if i < shots else "query") / label / Path(member).name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(zf.read(member))
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.predict_omniglot", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "omniglot"))
    p.add_argument("--way", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predict_omniglot.json"))
    args = p.parse_args(argv)
    zip_path = Path(args.data_root) / "images_evaluation.zip"
    if not zip_path.is_file():
        raise SystemExit(f"no {zip_path}; give --data-root")
    with tempfile.TemporaryDirectory() as tmp:
        names = make_folders(zip_path, Path(tmp), args.way, args.shots, args.seed)
        cmd = [sys.executable, "-m", "metanas_ray.predict", args.run_dir, "--support", f"{tmp}/support",
               "--query", f"{tmp}/query", "--out", f"{tmp}/predictions.csv", "--export", f"{tmp}/export"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - t0
        queries = sum(1 for _ in Path(tmp, "query").rglob("*.png"))
    if done.returncode != 0:
        raise SystemExit(done.stdout + done.stderr)
    m = re.search(r"accuracy on the labelled queries: ([\d.]+)%", done.stdout)
    result = {"run": str(Path(args.run_dir).resolve()), "way": args.way, "shots": args.shots, "seed": args.seed,
              "characters": names, "queries": queries, "accuracy": float(m.group(1)) / 100, "seconds": seconds,
              "command": f"python -m benchmarks.predict_omniglot {args.run_dir} --way {args.way} --shots "
                         f"{args.shots} --seed {args.seed}"}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.way}-way {args.shots}-shot, {queries} queries of unseen Omniglot characters: accuracy "
          f"{100 * result['accuracy']:.1f}% (chance {100 / args.way:.0f}%), {seconds:.1f} s with the export | {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
