"""nnU-Net v2 on one cell of a study: its own pipeline on exactly the cell's split (Ray-free).

:func:`run_cell` drives nnU-Net's Python API, with its three folders under one work folder per cell
(``nnUNet_raw``, ``nnUNet_preprocessed``, ``nnUNet_results``):

1. the cell's source training and source-validation cases are written as an nnU-Net raw dataset
   (``DatasetNNN_dualssl``: ``imagesTr/ID_0000.nii.gz``, ``labelsTr/ID.nii.gz`` with every non-zero
   label as pancreas 1, ``dataset.json``) and ``splits_final.json`` holds dualssl's split as the one
   fold 0 (no 5-fold cross-validation);
2. nnU-Net's fingerprint, experiment plan and preprocessing from those cases only (``3d_fullres``);
   ``plan="capped"`` (CPU recipes) keeps nnU-Net's planner but caps its capacity through the plans:
   features 8 doubling up to 80 (``ExperimentPlanner.UNet_base_num_features`` / ``UNet_max_features_3d``),
   the median shape the patch is planned from clipped to ``patch_cap`` voxels per axis, batch 2 (the
   plans' name is ``nnUNetPlansCapped``: "nnU-Net pipeline, capped plan"); ``plan="full"``: nnU-Net's
   default plans unchanged;
3. training with nnU-Net's own trainer (``nnUNetTrainer`` or ``nnUNetTrainerDA5``; the classes are
   imported directly: nnU-Net's lookup by name imports every trainer module, some of which need timm
   and torchvision) for a matched budget: ``iterations`` in epochs of ``iterations_per_epoch``, its
   poly schedule, deep supervision, augmentation and loss as they are; its final checkpoint is used;
4. prediction with ``nnUNetPredictor`` (its mirroring as configured, deep supervision off) back in
   each input's own geometry: :class:`NnunetPredictor` has the ``predict_file`` of
   ``dualssl.evaluation.inference.Predictor``, so ``dualssl.evaluation.run.evaluate_cases`` scores it
   on the original grid like every other arm.

nnU-Net's data-augmentation workers (``nnUNet_n_proc_DA``) are ``NnunetSettings.da_workers``, the
cell's CPUs; they are processes that re-import the main module (guard scripts with ``__main__``).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import nibabel as nib
import numpy as np

from dualssl.config import Config
from dualssl.data.datalist import Case, Split, load_datalist, split_cases

NNUNET_VERSION = "2.8.1"
"""The nnunetv2 release the ``nnunet`` extra pins and this module was written against."""
TRAINERS = {"nnunet": "nnUNetTrainer", "nnunet-da5": "nnUNetTrainerDA5"}
"""Peer arm -> nnU-Net trainer class."""
CONFIGURATION = "3d_fullres"
CAPPED_PLANS = "nnUNetPlansCapped"


def import_error() -> str | None:
    """None when nnU-Net v2 and its trainers import here, else the error (e.g. 'No module named ...')."""
    try:
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer  # noqa: F401
        from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import (  # noqa: F401
            nnUNetTrainerDA5)
    except Exception as exc:  # ImportError, or a broken dependency raising at import time
        return f"{type(exc).__name__}: {exc}"
    return None


@dataclass
class NnunetSettings:
    """One nnU-Net cell: which trainer, what budget, which plan, where it runs."""

    peer: str = "nnunet"
    """``nnunet`` (nnUNetTrainer) or ``nnunet-da5`` (nnUNetTrainerDA5)."""
    iterations: int = 300
    """Training iterations (batches), matched to the other arms' steps."""
    iterations_per_epoch: int = 30
    val_iterations: int = 2
    """nnU-Net's validation batches per epoch (its pseudo-Dice log only: the final checkpoint is used)."""
    plan: str = "capped"
    """'capped' (CPU recipes: features 8..80, patch within patch_cap, batch 2) or 'full' (nnU-Net's plan)."""
    patch_cap: int = 48
    """Capped plan: the patch is planned from the median shape clipped to this many voxels per axis."""
    base_features: int = 8
    max_features: int = 80
    batch_size: int = 2
    mirroring: bool = True
    """Test-time mirroring of nnUNetPredictor over the plan's allowed axes (nnU-Net's default: on)."""
    da_workers: int = 1
    """nnUNet_n_proc_DA: augmentation worker processes (0: in the training process)."""
    device: str = "cpu"
    threads: int = 1
    """torch intra-op threads on the CPU."""
    dataset_id: int = 901
    seed: int = 0

    @property
    def epochs(self) -> int:
        return max(1, math.ceil(self.iterations / self.iterations_per_epoch))

    def validate(self) -> "NnunetSettings":
        if self.peer not in TRAINERS:
            raise ValueError(f"peer {self.peer!r}: known {', '.join(TRAINERS)}")
        if self.plan not in ("capped", "full"):
            raise ValueError(f"plan {self.plan!r}: 'capped' or 'full'")
        if self.iterations < 1 or self.iterations_per_epoch < 1 or self.val_iterations < 1:
            raise ValueError("iterations, iterations_per_epoch and val_iterations must be >= 1")
        return self


def settings_for(cfg: Config, peer: str, *, plan: str, device: str = "cpu", cpus: int = 1) -> NnunetSettings:
    """The budget of a cell of ``cfg`` for nnU-Net: ``optim.epochs x optim.steps_per_epoch`` iterations
    (one iteration = one batch of ``batch_size`` patches, as one of our steps), the same epoch length,
    the patch cap from ``data.patch_size``, and ``cpus`` augmentation workers and threads. Test-time
    mirroring: nnU-Net's default (on) with the full plan; with the capped (CPU) plan the other arms'
    ``eval.tta_flips`` (off by default: 8 mirrored passes cost 8x on a CPU)."""
    per_epoch = cfg.optim.steps_per_epoch or 250
    return NnunetSettings(peer=peer, iterations=cfg.optim.epochs * per_epoch, iterations_per_epoch=per_epoch,
                          val_iterations=max(1, min(50, per_epoch // 5)), plan=plan,
                          patch_cap=max(cfg.data.patch_size), mirroring=cfg.eval.tta_flips or plan == "full",
                          da_workers=max(0, int(cpus)),
                          device=device, threads=max(1, int(cpus)), seed=cfg.optim.seed).validate()


def cell_split(cfg: Config) -> Split:
    """The cell's split, exactly as the engine and ``studies.crosssite`` make it."""
    return split_cases(load_datalist(cfg.data.root), cfg.data.source_sites, cfg.data.val_fraction,
                       cfg.data.split_seed)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def write_raw_dataset(train: Sequence[Case], val: Sequence[Case], raw_root: Path, dataset_id: int) -> Path:
    """nnU-Net raw dataset of ``train + val`` under ``raw_root/DatasetNNN_dualssl`` -> its folder."""
    folder = raw_root / f"Dataset{dataset_id:03d}_dualssl"
    if folder.exists():
        shutil.rmtree(folder)
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    for case in [*train, *val]:
        if not case.image.endswith(".nii.gz") or not case.label:
            raise ValueError(f"case {case.case_id}: nnU-Net arms need labelled .nii.gz images, got {case.image}")
        _link_or_copy(Path(case.image), folder / "imagesTr" / f"{case.case_id}_0000.nii.gz")
        ref = nib.load(case.label)
        mask = (np.asanyarray(ref.dataobj) != 0).astype(np.uint8)
        nib.save(nib.Nifti1Image(mask, ref.affine, ref.header), folder / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {"channel_names": {"0": "CT"}, "labels": {"background": 0, "pancreas": 1},
            "numTraining": len(train) + len(val), "file_ending": ".nii.gz", "name": "dualssl cell",
            "description": "source training + source validation cases of one dualssl study cell"}
    (folder / "dataset.json").write_text(json.dumps(meta, indent=1))
    return folder


def _capped_planner(settings: NnunetSettings):
    """nnU-Net's ExperimentPlanner with its capacity capped through its own plan attributes."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

    class CappedPlanner(ExperimentPlanner):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.UNet_base_num_features = settings.base_features
            self.UNet_max_features_3d = settings.max_features

        def get_plans_for_configuration(self, spacing, median_shape, *args, **kwargs):
            capped = np.minimum(np.asarray(median_shape, dtype=float), settings.patch_cap)
            return super().get_plans_for_configuration(spacing, capped, *args, **kwargs)

    return CappedPlanner


def plan_and_preprocess(settings: NnunetSettings, workers: int) -> str:
    """Fingerprint, plan and preprocess (3d_fullres) the raw dataset -> the plans identifier."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (
        extract_fingerprint_dataset, plan_experiment_dataset, preprocess_dataset)

    extract_fingerprint_dataset(settings.dataset_id, num_processes=workers, check_dataset_integrity=True,
                                clean=True, verbose=False, show_progress_bar=False)
    if settings.plan == "capped":
        _, plans_id = plan_experiment_dataset(settings.dataset_id, _capped_planner(settings),
                                              overwrite_plans_name=CAPPED_PLANS)
        plans_file = _preprocessed_folder(settings) / f"{plans_id}.json"
        plans = json.loads(plans_file.read_text())
        plans["configurations"][CONFIGURATION]["batch_size"] = settings.batch_size
        plans_file.write_text(json.dumps(plans, indent=1))
    else:
        _, plans_id = plan_experiment_dataset(settings.dataset_id, ExperimentPlanner)
    preprocess_dataset(settings.dataset_id, plans_id, configurations=(CONFIGURATION,), num_processes=[workers],
                       verbose=False, show_progress_bar=False)
    return plans_id


def _preprocessed_folder(settings: NnunetSettings) -> Path:
    return Path(os.environ["nnUNet_preprocessed"]) / f"Dataset{settings.dataset_id:03d}_dualssl"


def write_split(settings: NnunetSettings, train: Sequence[Case], val: Sequence[Case]) -> Path:
    """``splits_final.json``: dualssl's split as nnU-Net's only fold (0)."""
    path = _preprocessed_folder(settings) / "splits_final.json"
    path.write_text(json.dumps([{"train": [c.case_id for c in train], "val": [c.case_id for c in val]}], indent=1))
    return path


def trainer_class(peer: str):
    """nnU-Net's trainer class of a peer arm, imported directly (not looked up by name)."""
    if peer == "nnunet-da5":
        from nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerDA5 import nnUNetTrainerDA5

        return nnUNetTrainerDA5
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    return nnUNetTrainer


def train(settings: NnunetSettings, plans_id: str) -> Path:
    """Train fold 0 for the budget -> the folder holding ``checkpoint_final.pth`` (kept if already there)."""
    import torch

    prep = _preprocessed_folder(settings)
    plans = json.loads((prep / f"{plans_id}.json").read_text())
    plans["continue_training"] = False  # nnU-Net's run_training passes it inside the plans
    dataset_json = json.loads((prep / "dataset.json").read_text())
    cls = trainer_class(settings.peer)
    trainer = cls(plans, CONFIGURATION, 0, dataset_json, device=torch.device(settings.device))
    final = Path(trainer.output_folder) / "checkpoint_final.pth"
    if final.is_file():
        return final.parent
    trainer.num_iterations_per_epoch = settings.iterations_per_epoch
    trainer.num_epochs = settings.epochs
    trainer.num_val_iterations_per_epoch = settings.val_iterations
    trainer.save_every = max(1, settings.epochs // 4)
    torch.manual_seed(settings.seed)
    np.random.seed(settings.seed)
    trainer.run_training()  # ends with checkpoint_final.pth (nnU-Net's own choice: the final epoch)
    return final.parent


class NnunetPredictor:
    """``nnUNetPredictor`` on a finished fold, with ``predict_file(path) -> nibabel image`` (input grid)."""

    def __init__(self, fold_folder: Path, *, device: str = "cpu", mirroring: bool = True):
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

        state = torch.load(fold_folder / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        init = state["init_args"]
        plans_manager = PlansManager(init["plans"])
        conf = plans_manager.get_configuration(init["configuration"])
        dataset_json = init["dataset_json"]
        channels = determine_num_input_channels(plans_manager, conf, dataset_json)
        labels = plans_manager.get_label_manager(dataset_json).num_segmentation_heads
        # the trainer's own architecture builder (a staticmethod), deep supervision off for inference
        peer = {name: arm for arm, name in TRAINERS.items()}.get(state["trainer_name"], "nnunet")
        network = trainer_class(peer).build_network_architecture(
            plans_manager, conf, channels, labels, enable_deep_supervision=False)
        self.predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                         perform_everything_on_device=device != "cpu", device=torch.device(device),
                                         verbose=False, verbose_preprocessing=False, allow_tqdm=False)
        self.predictor.manual_initialization(network, plans_manager, conf, [state["network_weights"]],
                                             dataset_json, state["trainer_name"],
                                             state["inference_allowed_mirroring_axes"])
        self.patch_size = tuple(conf.patch_size)

    def predict_file(self, path: str | Path) -> nib.Nifti1Image:
        """Mask (uint8) of one image in the image's own voxel grid and affine."""
        image = nib.load(str(path))
        with tempfile.TemporaryDirectory(prefix="dualssl-nnunet-") as tmp:
            self.predictor.predict_from_files_sequential([[str(path)]], [str(Path(tmp) / "pred")],
                                                         save_probabilities=False, overwrite=True)
            mask = np.asanyarray(nib.load(str(Path(tmp) / "pred.nii.gz")).dataobj).astype(np.uint8)
        if mask.shape != image.shape[:3]:
            raise RuntimeError(f"{path}: nnU-Net predicted shape {mask.shape}, image has {image.shape}")
        return nib.Nifti1Image(mask, image.affine)


@dataclass
class CellRun:
    """What :func:`run_cell` did: where, the budget, the plan, the split and the wall times."""

    fold_folder: Path
    plans_file: Path
    split_file: Path
    settings: dict[str, Any]
    patch_size: list[int]
    features_per_stage: list[int]
    batch_size: int
    seconds: dict[str, float]

    def info(self) -> dict[str, Any]:
        return {**asdict(self), "fold_folder": str(self.fold_folder), "plans_file": str(self.plans_file),
                "split_file": str(self.split_file), "nnunet_version": NNUNET_VERSION,
                "plan_label": "nnU-Net pipeline, capped plan" if self.settings["plan"] == "capped"
                else "nnU-Net pipeline, full plan"}


def run_cell(cfg: Config, settings: NnunetSettings, work: Path) -> CellRun:
    """Raw dataset, split, plan, preprocess and train one cell in ``work`` (nnU-Net's three folders)."""
    settings.validate()
    work = Path(work)
    for env, sub in (("nnUNet_raw", "nnUNet_raw"), ("nnUNet_preprocessed", "nnUNet_preprocessed"),
                     ("nnUNet_results", "nnUNet_results")):
        (work / sub).mkdir(parents=True, exist_ok=True)
        os.environ[env] = str(work / sub)
    os.environ["nnUNet_n_proc_DA"] = str(settings.da_workers)
    import torch

    torch.set_num_threads(settings.threads)
    seconds: dict[str, float] = {}
    start = time.perf_counter()
    split = cell_split(cfg)
    prep = _preprocessed_folder(settings)
    done_marker = prep / "dualssl_preprocessed.json"
    if not done_marker.is_file():
        write_raw_dataset(split.train, split.val, work / "nnUNet_raw", settings.dataset_id)
        plans_id = plan_and_preprocess(settings, max(1, settings.threads))
        done_marker.write_text(json.dumps({"plans": plans_id}))
    plans_id = json.loads(done_marker.read_text())["plans"]
    split_file = write_split(settings, split.train, split.val)
    seconds["plan_preprocess_s"] = time.perf_counter() - start
    start = time.perf_counter()
    fold = train(settings, plans_id)
    seconds["train_s"] = time.perf_counter() - start
    conf = json.loads((prep / f"{plans_id}.json").read_text())["configurations"][CONFIGURATION]
    arch = conf["architecture"]["arch_kwargs"]
    return CellRun(fold, prep / f"{plans_id}.json", split_file, asdict(settings), list(conf["patch_size"]),
                   list(arch["features_per_stage"]), int(conf["batch_size"]), seconds)
