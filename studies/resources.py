"""What a study reserves, checked against the cluster before anything starts.

Tune reserves only a trial's own resources (the Tune function that drives Ray Train); the Train
workers reserve theirs in a placement group of their own. A study therefore needs::

    max_concurrent_trials x (trial CPU + workers x CPU per worker)   CPUs
    max_concurrent_trials x workers x GPU per worker                 GPUs

and each worker must fit on one node. A study that asks for more than that does not fail: its
trials wait forever. ``check_resources`` turns that into an error that says what to change.
"""

from __future__ import annotations

from dataclasses import dataclass


class ResourceError(RuntimeError):
    """The study cannot be scheduled on this cluster; the message says which flag to change."""


@dataclass(frozen=True)
class StudyResources:
    max_concurrent_trials: int
    workers_per_trial: int
    cpus_per_worker: float
    gpus_per_worker: float = 0.0
    trial_cpus: float = 0.0
    """CPU of the Tune trial itself: it only waits on its Train workers, so 0 by default."""
    trial_memory: int = 256 * 1024**2
    """Memory (bytes) the trial reserves: Tune cannot schedule a trial that reserves nothing."""

    def trial_resources(self) -> dict[str, float]:
        """What ``tune.with_resources`` gets for one trial."""
        return {"cpu": self.trial_cpus, "memory": self.trial_memory}

    @property
    def use_gpu(self) -> bool:
        return self.gpus_per_worker > 0

    def worker_bundle(self) -> dict[str, float]:
        bundle = {"CPU": float(self.cpus_per_worker)}
        if self.use_gpu:
            bundle["GPU"] = float(self.gpus_per_worker)
        return bundle

    def per_trial(self) -> dict[str, float]:
        """CPU and GPU one running trial holds (its Tune actor plus its Train workers)."""
        return {"CPU": self.trial_cpus + self.workers_per_trial * self.cpus_per_worker,
                "GPU": self.workers_per_trial * self.gpus_per_worker}

    def total(self) -> dict[str, float]:
        return {k: v * self.max_concurrent_trials for k, v in self.per_trial().items()}

    def validate(self) -> None:
        """Flag values that are wrong whatever the cluster."""
        if self.max_concurrent_trials < 1:
            raise ResourceError("--max-concurrent-trials must be >= 1")
        if self.workers_per_trial < 1:
            raise ResourceError("--workers-per-trial must be >= 1")
        if self.cpus_per_worker <= 0:
            raise ResourceError("--cpus-per-worker must be > 0 (fractions such as 0.5 are allowed)")
        if self.gpus_per_worker < 0 or self.trial_cpus < 0:
            raise ResourceError("--gpus-per-worker and the trial CPU must be >= 0")


def _fmt(x: float) -> str:
    return f"{x:g}"


def check_resources(res: StudyResources, cluster: dict[str, float],
                    nodes: list[dict[str, float]] | None = None) -> None:
    """Raise :class:`ResourceError` when ``res`` cannot run on a cluster with ``cluster`` resources.

    Args:
        res: what the study asks for.
        cluster: ``ray.cluster_resources()`` (totals, e.g. ``{"CPU": 16, "GPU": 4}``).
        nodes: resources of each alive node (``ray.nodes()[i]["Resources"]``); when given, each
            worker must fit on one node.
    """
    res.validate()
    cpus, gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    if res.use_gpu and gpus == 0:
        raise ResourceError(
            f"--gpus-per-worker {_fmt(res.gpus_per_worker)} but the cluster has no GPU; Ray Train would retry "
            "forever. Use --gpus-per-worker 0 to train on CPU, or start GPU nodes (cluster/README.md).")
    need = res.per_trial()
    if need["CPU"] > cpus or need["GPU"] > gpus:
        hints = [f"--workers-per-trial {max(1, int(cpus // res.cpus_per_worker))}" if res.cpus_per_worker <= cpus
                 else f"--cpus-per-worker {_fmt(cpus / res.workers_per_trial)}"]
        if res.use_gpu and need["GPU"] > gpus:
            hints = [f"--workers-per-trial {max(1, int(gpus // res.gpus_per_worker))}"]
        raise ResourceError(
            f"one trial needs {_fmt(need['CPU'])} CPU / {_fmt(need['GPU'])} GPU "
            f"({_fmt(res.trial_cpus)} + {res.workers_per_trial} workers x {_fmt(res.cpus_per_worker)} CPU"
            f"{f' + {_fmt(res.gpus_per_worker)} GPU' if res.use_gpu else ''}) but the cluster has "
            f"{_fmt(cpus)} CPU / {_fmt(gpus)} GPU. Use {' or '.join(hints)}.")
    total = res.total()
    if total["CPU"] > cpus or total["GPU"] > gpus:
        fit = int(min(cpus // need["CPU"] if need["CPU"] else res.max_concurrent_trials,
                      gpus // need["GPU"] if need["GPU"] else res.max_concurrent_trials))
        raise ResourceError(
            f"{res.max_concurrent_trials} concurrent trials x {_fmt(need['CPU'])} CPU / {_fmt(need['GPU'])} GPU "
            f"= {_fmt(total['CPU'])} CPU / {_fmt(total['GPU'])} GPU, but the cluster has {_fmt(cpus)} CPU / "
            f"{_fmt(gpus)} GPU (Tune counts only the trial, the Train workers reserve theirs apart, so the "
            f"extra trials would wait forever). Use --max-concurrent-trials {max(1, fit)}.")
    if nodes:
        bundle = res.worker_bundle()
        if not any(all(float(node.get(k, 0)) >= v for k, v in bundle.items()) for node in nodes):
            biggest = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
            raise ResourceError(
                f"one worker needs {bundle} on a single node, but the largest node has "
                f"{_fmt(biggest.get('CPU', 0))} CPU / {_fmt(biggest.get('GPU', 0))} GPU. "
                "Lower --cpus-per-worker / --gpus-per-worker.")
