"""conv3d on the CPU: a batch of one sample against the same sample padded to two, side by side.

torch's CPU ``conv3d`` is much slower per sample for a batch of one than for two (this is why
``dualssl.evaluation.inference.pad_single_batch`` exists and the CPU recipes slide windows in
batches of 4). This prints, interleaved over repeats, the per-sample time of single 3x3x3
convolutions at batch 1, 2 and 4, and of whole-volume prediction of a phantom case with
``sw_batch_size`` 1 without padding, 1 with padding, and 4::

    python benchmarks/conv_batch.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dualssl.evaluation.inference as inference  # noqa: E402
from dualssl.data.phantom import generate_dataset  # noqa: E402
from dualssl.models import SegmentationNet  # noqa: E402
from dualssl.models.factory import build_model  # noqa: E402
from dualssl.recipes import recipe_config  # noqa: E402

LAYERS = [(1, 8, (48, 48, 32)), (8, 8, (48, 48, 32)), (16, 16, (24, 24, 16)), (32, 32, (12, 12, 8))]


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.inference_mode()
def conv_table(repeats: int) -> None:
    print("| conv cin->cout at size | ms/sample b=1 | b=2 | b=4 | b=1 / b=2 |\n|---|---|---|---|---|")
    for cin, cout, size in LAYERS:
        w = torch.randn(cout, cin, 3, 3, 3)
        per = {b: best_of(lambda x=torch.randn(b, cin, *size): F.conv3d(x, w, padding=1), repeats) / b
               for b in (1, 2, 4)}
        print(f"| {cin}->{cout} at {size} | {per[1] * 1e3:.2f} | {per[2] * 1e3:.2f} | {per[4] * 1e3:.2f} | "
              f"{per[1] / per[2]:.1f} |")


def predict_table(repeats: int) -> None:
    cfg = recipe_config("demo")
    with tempfile.TemporaryDirectory() as tmp:
        generate_dataset(Path(tmp), sites=["pv_standard"], cases_per_site=1, seed=0, scale=0.3)
        scan = next((Path(tmp) / "imagesTr").glob("*.nii.gz"))
        net = SegmentationNet(build_model(cfg.model)).eval()
        unpadded = inference.pad_single_batch
        variants = {"sw_batch 1, no padding": (1, lambda x: x), "sw_batch 1, padded to 2": (1, unpadded),
                    "sw_batch 4": (4, unpadded)}
        times: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(repeats):  # interleaved: each repeat runs every variant once
            for name, (sw_batch, pad) in variants.items():
                cfg.eval.sw_batch_size = sw_batch
                inference.pad_single_batch = pad
                predictor = inference.Predictor(net, cfg, device="cpu")
                start = time.perf_counter()
                predictor.predict_file(scan)
                times[name].append(time.perf_counter() - start)
        inference.pad_single_batch = unpadded
    base = statistics.median(times["sw_batch 1, no padding"])
    print("\n| whole-volume prediction (phantom case, demo net) | median s | vs unpadded |\n|---|---|---|")
    for name, values in times.items():
        print(f"| {name} | {statistics.median(values):.2f} | {base / statistics.median(values):.1f}x |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    conv_table(args.repeats)
    predict_table(args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
