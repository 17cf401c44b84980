"""Put a meta-learned model to work on your own few labelled images: adapt, predict, export.

    python -m metanas_ray.predict runs/quick --support my_support/ --query my_images/
    python -m metanas_ray.predict runs/quick --support my_support/ --query my_labelled/ --hard --out p.csv
    python -m metanas_ray.predict runs/quick --support my_support/ --query my_images/ --export exported/

``--support`` is a folder of class folders (your N classes, k images each; N at most the run's ``data.n_way``, any k);
``--query`` a folder of images, or of class folders named as the support's (the accuracy is printed too). The run's
meta-learned (w_meta, α_meta) adapts to the support set as its meta-test does (Algorithm 3: ``eval.steps`` steps,
α and τ in the first ``eval.arch_steps``, soft-pruned at the meta-test threshold, or hard-pruned to the derived
cells with ``--hard``), then classifies every query image. One CSV row per query image: its file, the predicted
class, that class's probability and the probability of every class. The query images are classified as one batch:
batch norm uses the statistics of the batch it is given, as in MAML and MetaNAS.

``--export DIR`` writes the adapted network as TorchScript (``model.pt``: ``torch.jit.load`` needs nothing from this
package), ``classes.json`` and ``preprocessing.json`` (how to turn an image file into the ``[B, C, H, W]`` float
tensor the model takes), and ``model.onnx`` where ``onnx`` and ``onnxscript`` are installed (found networks and
Conv4: ``torch.export`` cannot record a supernet's data-dependent pruning decisions).
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

log = logging.getLogger("metanas_ray")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


class PredictError(ValueError):
    """Support or query images that cannot be used, or a run that cannot predict."""


# ------------------------------------------------------------------------------------------------ images
@dataclass(frozen=True)
class Preprocessing:
    """How the run's data turns an image file into pixels: ``channels`` 1 (grayscale, "L") or 3 (RGB), resized
    to ``image_size`` square (Lanczos), inverted (255 - x) for Omniglot's dark strokes, then scaled by 1/255."""

    image_size: int
    channels: int
    invert: bool

    def to_dict(self) -> dict:
        return {"image_size": self.image_size, "channels": self.channels,
                "mode": "L" if self.channels == 1 else "RGB", "resize": "lanczos, to image_size × image_size",
                "invert": self.invert, "scale": "x / 255 (after inversion: (255 - x) / 255)",
                "layout": "float32 [batch, channels, image_size, image_size]",
                "batch": "batch norm uses the statistics of each batch (as in MAML and MetaNAS): classify the "
                         "query images together, as metanas_ray.predict does"}

    def load(self, path: Path) -> torch.Tensor:
        """float32 ``[C, H, W]`` in [0, 1]; a PredictError names a file that cannot be read."""
        from PIL import Image, UnidentifiedImageError
        try:
            with Image.open(path) as im:
                im = im.convert("L" if self.channels == 1 else "RGB")
                if im.size != (self.image_size, self.image_size):
                    im = im.resize((self.image_size, self.image_size), Image.Resampling.LANCZOS)
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise PredictError(f"cannot read image {path} ({type(e).__name__}: {e})") from None
        if self.invert:
            a = 255 - a
        t = torch.from_numpy(a.copy()).float().div_(255)
        return t[None] if t.dim() == 2 else t.permute(2, 0, 1)


def preprocessing_of(cfg, channels: int) -> Preprocessing:
    return Preprocessing(cfg.data.image_size, channels, invert=cfg.data.dataset == "omniglot")


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def read_support(folder: str | Path, max_classes: int) -> tuple[list[str], list[Path], list[int]]:
    """Class names (sorted), image files and their labels of a folder of class folders; checked before any work."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PredictError(f"--support {root} is not a folder")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise PredictError(f"--support {root} must hold one folder per class, at least 2 (found {len(classes)})")
    if len(classes) > max_classes:
        raise PredictError(f"--support {root} has {len(classes)} classes but the run classifies at most "
                           f"{max_classes} (its data.n_way)")
    files, labels = [], []
    for label, c in enumerate(classes):
        found = _images_in(c)
        if not found:
            raise PredictError(f"class folder {c} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        files += found
        labels += [label] * len(found)
    return [c.name for c in classes], files, labels


def read_query(folder: str | Path, class_names: list[str]) -> tuple[list[Path], list[int] | None]:
    """Image files of a folder of images, or of class folders named as the support's (then also their labels)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise PredictError(f"--query {root} is not a folder")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not subdirs:
        files = _images_in(root)
        if not files:
            raise PredictError(f"--query {root} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no class folders")
        return files, None
    unknown = [d.name for d in subdirs if d.name not in class_names]
    if unknown:
        raise PredictError(f"--query {root} has class folder '{unknown[0]}', which --support does not have "
                           f"(it has: {', '.join(class_names)})")
    files, labels = [], []
    for d in subdirs:
        found = _images_in(d)
        files += found
        labels += [class_names.index(d.name)] * len(found)
    if not files:
        raise PredictError(f"the class folders of --query {root} hold no images")
    return files, labels


# ------------------------------------------------------------------------------------------------ the model
class Adapted(nn.Module):
    """The adapted network as an ordinary module: ``forward(x) → probabilities [B, n_classes]``, parameters fixed.
    (With the run's N-way head and fewer classes, only the first n_classes outputs are used.)"""

    def __init__(self, net: nn.Module, params: dict, tau: tuple[float, float], hard: bool, n_classes: int):
        super().__init__()
        self._net = (net,)  # not a submodule: its own (initial) parameters are replaced by ``params`` anyway
        self.params, self.tau, self.hard, self.n_classes = params, tau, hard, n_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .inner_loop import forward
        return torch.softmax(forward(self._net[0], self.params, x, self.tau, self.hard)[:, :self.n_classes], dim=-1)

    def cpu(self) -> "Adapted":
        self._net[0].cpu()
        self.params = {part: {k: v.cpu() for k, v in d.items()} for part, d in self.params.items()}
        return self

    def standalone(self) -> nn.Module:
        """The same computation as a plain module: the network with the adapted weights as its parameters and
        the mixture weights (α, β at τ, pruned) as constants, which ``torch.jit.trace`` can record (it cannot
        trace ``functional_call``)."""
        import copy

        from .inner_loop import mixture_of
        net = copy.deepcopy(self._net[0]).cpu()
        with torch.no_grad():
            for name, p in net.named_parameters():
                p.copy_(self.params["weights"][name])
        return _Standalone(net, mixture_of(net, self.params, self.tau, self.hard), self.n_classes)


class _Standalone(nn.Module):
    def __init__(self, net: nn.Module, mix: dict[str, torch.Tensor], n_classes: int):
        super().__init__()
        self.net, self.mix, self.n_classes = net, {k: v.detach().cpu() for k, v in mix.items()}, n_classes
        self.channels_last = bool(getattr(net, "channels_last", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.net(x, self.mix)[:, :self.n_classes].float(), dim=-1)


@dataclass
class Run:
    """A finished (or checkpointed) run, loaded for predictions."""

    cfg: object
    net: nn.Module
    state: dict
    moments: object
    preprocessing: Preprocessing
    path: Path


def load_run(run_dir: str | Path, checkpoint_file: str | Path | None = None, device: str = "cpu") -> Run:
    from .inner_loop import Moments
    from .rundir import RunDir
    from .state import build_network, place

    run = RunDir(run_dir)
    cfg = run.open_existing()
    payload, _ = run.load_checkpoint(checkpoint_file, "to predict with")
    first = next(v for v in payload["state"]["weights"].values() if v.dim() == 4)  # the stem's convolution
    channels = int(first.shape[1])
    net = build_network(cfg, channels)
    return Run(cfg, net, place(net, payload["state"], device), Moments.of_checkpoint(payload, device),
               preprocessing_of(cfg, channels), run.path)


def adapt_to(run: Run, x: torch.Tensor, y: torch.Tensor, hard: bool = False, n_classes: int | None = None) -> Adapted:
    """Algorithm 3's adaptation of the run's meta-learned model to one support set (x ``[B, C, H, W]``, y ``[B]``)."""
    from .evaluate import meta_test_threshold, test_protocol
    from .inner_loop import adapt

    cfg = run.cfg
    learn_arch = bool(run.state["alphas"])
    task_cfg, arch_steps, tau = test_protocol(cfg, learn_arch)
    if hasattr(run.net, "threshold"):
        run.net.threshold = meta_test_threshold(cfg)
    adapted, _ = adapt(run.net, run.state, x, y, task_cfg, cfg.eval.steps, learn_arch, arch_steps=arch_steps,
                       generator=torch.Generator().manual_seed(cfg.run.seed),
                       moments=None if run.moments is None else run.moments.copy())
    return Adapted(run.net, adapted, tau, hard and learn_arch, n_classes or int(y.max()) + 1).eval()


def export(model: Adapted, class_names: list[str], pre: Preprocessing, out: str | Path) -> list[Path]:
    """``model.pt`` (TorchScript), ``classes.json``, ``preprocessing.json`` and, with ``onnx`` installed,
    ``model.onnx`` into ``out``."""
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    import warnings
    example = torch.rand(2, pre.channels, pre.image_size, pre.image_size)
    module = model.standalone().eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the fixed pruning decisions become constants
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in favour of torch.export, but
        # it is what torch.jit.load reads anywhere (C++ included), which is what the export is for
        traced = torch.jit.trace(module, example, check_trace=False)
    written = [out / "model.pt", out / "classes.json", out / "preprocessing.json"]
    traced.save(str(written[0]))
    written[1].write_text(json.dumps(class_names, indent=2) + "\n")
    written[2].write_text(json.dumps(pre.to_dict(), indent=2) + "\n")
    try:
        import onnx  # noqa: F401  (optional: pip install "metanas-ray[onnx]", i.e. onnx and onnxscript)
        import onnxscript  # noqa: F401
    except ImportError:
        log.info("model.onnx not written: it needs the onnx and onnxscript packages (pip install onnx onnxscript)")
        return written
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):  # its progress lines
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(out / "model.onnx"), input_names=["images"],
                              output_names=["probabilities"], dynamo=True, verbose=False,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=2)},))
        written.append(out / "model.onnx")
    except Exception as e:  # the TorchScript file is the export; ONNX is a convenience
        log.warning("model.onnx not written: torch.export could not record the network (%s); model.pt holds it",
                    type(e).__name__)
    return written


# ------------------------------------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    from . import checkpoint
    from .evaluate import _device
    from .rundir import RunDirError

    p = argparse.ArgumentParser(prog="python -m metanas_ray.predict", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("run_dir", help="a run directory written by metanas_ray.run")
    p.add_argument("--support", required=True, help="a folder of class folders: the labelled images to adapt to")
    p.add_argument("--query", required=True, help="a folder of images, or of class folders named as the support's")
    p.add_argument("--out", default="predictions.csv", help="the CSV to write (default: predictions.csv)")
    p.add_argument("--hard", action="store_true", help="hard-prune to the derived cells (default: soft-pruned)")
    p.add_argument("--export", metavar="DIR", help="also write the adapted network (TorchScript) and its metadata")
    p.add_argument("--checkpoint", default="", help="a checkpoint file (default: the run's latest)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout, force=True)
    try:
        device = _device(args.device)
        t0 = time.perf_counter()
        run = load_run(args.run_dir, args.checkpoint or None, str(device))
        names, support, labels = read_support(args.support, run.cfg.data.n_way)
        queries, truth = read_query(args.query, names)
        pre = run.preprocessing
        x_s = torch.stack([pre.load(f) for f in support]).to(device)
        x_q = torch.stack([pre.load(f) for f in queries]).to(device)  # every file read before any adaptation
        model = adapt_to(run, x_s, torch.tensor(labels, device=device), args.hard, len(names))
        with torch.no_grad():
            probs = torch.cat([model(x_q[i:i + 256]) for i in range(0, len(x_q), 256)]).cpu()
        exported = export(model.cpu(), names, pre, args.export) if args.export else []
    except (PredictError, RunDirError, checkpoint.CheckpointError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    best = probs.argmax(-1)
    out = Path(args.out)
    with out.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "predicted", "probability", *[f"p_{n}" for n in names]])
        for file, row, b in zip(queries, probs.tolist(), best.tolist()):
            w.writerow([str(file), names[b], f"{row[b]:.6f}", *[f"{v:.6f}" for v in row]])
    counts = {n: 0 for n in names}
    for b in best.tolist():
        counts[names[b]] += 1
    log.info("%d-way %s-shot support (%d images), %d queries, %s-pruned, %.1f s | %s", len(names),
             "/".join(sorted({str(labels.count(i)) for i in range(len(names))})), len(support), len(queries),
             "hard" if args.hard else "soft", time.perf_counter() - t0, out)
    if truth is not None:
        acc = float((best == torch.tensor(truth)).float().mean())
        log.info("accuracy on the labelled queries: %.2f%% (%d of %d)", 100 * acc, round(acc * len(truth)), len(truth))
    if exported:
        log.info("exported %s", ", ".join(str(p) for p in exported))
    return 0


if __name__ == "__main__":
    sys.exit(main())
