"""Serving latency of the NIH scan: an HTTP round trip to `mlflow models serve` against `dualssl predict`.

One freshly built network of the recipe's widths (seeded; untrained: this measures the pipeline, not
accuracy) is exported, logged to a sqlite MLflow store and registered as ``NAME@champion``. Then,
side by side on the same machine:

* **serve**: ``mlflow models serve -m models:/NAME@champion --env-manager local`` is started once; the
  time is one POST of the scan's NIfTI bytes (base64 in the JSON body) to ``/invocations`` until the
  mask comes back, decoded (the server already warm: model loaded). ``serve_start`` is the time from
  the command to the first answered ``/ping``.
* **predict**: ``dualssl predict --model models:/NAME@champion SCAN -o OUT`` as a fresh process
  (interpreter start, imports, model download and load included, as a user runs it).

Memory: peak summed PSS and RSS of the server's process tree (``tree_memory.py``), sampled every
0.2 s from its start through the request; and of the ``dualssl predict`` process. The two masks are
compared voxel for voxel. Timings on a shared machine are noisy: repeat with ``--repeats``.

    python benchmarks/serve_nih.py                       # ../shared/data NIH scan, recipe smoke
    python benchmarks/serve_nih.py --scan X.nii.gz --recipe demo --repeats 2
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tree_memory import pss_bytes, tree  # noqa: E402

NAME = "dualssl-serve-bench"
NIH_SCAN = (Path(os.environ.get("DUALSSL_SHARED_DATA", REPO.parent / "shared" / "data"))
            / "real" / "nih_pancreas_ct_0001" / "ct.nii.gz")


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


class Peak:
    """Peak summed PSS and RSS of a process tree, sampled in a thread."""

    def __init__(self, root: int, every_s: float = 0.2):
        self.root, self.every_s, self.pss, self.rss = root, every_s, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            pids = tree(self.root)
            self.pss = max(self.pss, sum(pss_bytes(p) for p in pids))
            self.rss = max(self.rss, sum(rss_bytes(p) for p in pids))
            self._stop.wait(self.every_s)

    def __enter__(self) -> "Peak":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def register(recipe: str, tmp: Path, seed: int) -> str:
    import mlflow
    import torch

    from dualssl.export import export_model, log_model
    from dualssl.models.factory import build_model
    from dualssl.recipes import recipe_config

    cfg = recipe_config(recipe)
    torch.manual_seed(seed)
    folder = export_model({"config": cfg.to_dict(), "model": build_model(cfg.model).state_dict()}, tmp / "model",
                          torchscript=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("bench", str(tmp / "artifacts")))
    with mlflow.start_run():
        log_model(folder, registered_name=NAME)
    return uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scan", type=Path, default=NIH_SCAN)
    p.add_argument("--recipe", default="smoke")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if not args.scan.is_file():
        print(f"{args.scan}: absent", file=sys.stderr)
        return 2
    import nibabel as nib
    import numpy as np

    from dualssl.serving import decode_nifti

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp_name:
        tmp = Path(tmp_name)
        uri = register(args.recipe, tmp, args.seed)
        env["MLFLOW_TRACKING_URI"] = uri
        port = free_port()
        t0 = time.perf_counter()
        server = subprocess.Popen(["mlflow", "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager",
                                   "local", "-h", "127.0.0.1", "-p", str(port), "-t", "3600"], env=env,
                                  stdout=open(tmp / "serve.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
        rows = []
        try:
            with Peak(server.pid) as server_mem:
                while True:
                    try:
                        urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5).read()
                        break
                    except OSError:
                        if server.poll() is not None:
                            raise RuntimeError((tmp / "serve.log").read_text()[-3000:])
                        time.sleep(0.5)
                serve_start = time.perf_counter() - t0
                idle_pss = sum(pss_bytes(q) for q in tree(server.pid))
                body = json.dumps({"dataframe_records": [
                    {"nifti": base64.b64encode(args.scan.read_bytes()).decode("ascii")}]}).encode()
                for rep in range(args.repeats):
                    t1 = time.perf_counter()
                    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body, method="POST",
                                                     headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=3600) as response:
                        served = decode_nifti(json.loads(response.read())["predictions"][0]["mask"])
                    http_s = time.perf_counter() - t1
                    out = tmp / f"pred{rep}.nii.gz"
                    t2 = time.perf_counter()
                    proc = subprocess.Popen([sys.executable, "-m", "dualssl.cli", "predict", "--model",
                                             f"models:/{NAME}@champion", str(args.scan), "-o", str(out)],
                                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                    with Peak(proc.pid) as predict_mem:
                        _, err = proc.communicate()
                    predict_s = time.perf_counter() - t2
                    if proc.returncode != 0:
                        raise RuntimeError(err[-3000:])
                    equal = np.array_equal(np.asanyarray(served.dataobj), np.asanyarray(nib.load(out).dataobj))
                    rows.append({"http_s": http_s, "predict_s": predict_s, "equal": bool(equal),
                                 "predict_pss_gib": predict_mem.pss / 1024**3,
                                 "predict_rss_gib": predict_mem.rss / 1024**3,
                                 "mask_voxels": int(np.count_nonzero(np.asanyarray(served.dataobj)))})
        finally:
            os.killpg(server.pid, 15)
            server.wait(timeout=60)
    shape = nib.load(args.scan).shape
    print(f"scan {args.scan.name} {shape}, recipe {args.recipe}; server start (to first /ping) {serve_start:.1f} s, "
          f"server idle PSS {idle_pss / 1024**3:.2f} GiB")
    print(f"server peak PSS {server_mem.pss / 1024**3:.2f} GiB, peak RSS {server_mem.rss / 1024**3:.2f} GiB")
    print("rep  http_round_trip_s  dualssl_predict_s  ratio(predict/http)  masks_equal  predict_peak_PSS/RSS_GiB")
    for i, r in enumerate(rows):
        print(f"{i:3d}  {r['http_s']:17.1f}  {r['predict_s']:17.1f}  {r['predict_s'] / r['http_s']:19.2f}  "
              f"{str(r['equal']):>11s}  {r['predict_pss_gib']:.2f}/{r['predict_rss_gib']:.2f}")
    return 0 if all(r["equal"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
