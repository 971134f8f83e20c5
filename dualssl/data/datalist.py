"""Dataset lists: an MSD root, an nnU-Net v2 raw root or a CSV/JSON list -> cases with a site.

Layouts (paths inside a list are relative to the list file's folder; absolute paths work too):

* **MSD** (``ROOT/dataset.json`` with a ``training`` list of ``{"image", "label"}`` entries).
  An entry may carry ``"site"``; entries without one get the dataset's own name
  (``dataset.json`` ``name``, else the folder name), so a plain MSD Task07 is one site ``Pancreas``.
  Declared labels come from ``labels`` (``{"0": "background", "1": "pancreas", "2": "cancer"}``);
  every non-zero label is merged into one pancreas mask by the transforms.
* **nnU-Net v2 raw** (``ROOT/dataset.json`` with ``channel_names`` and ``labels``
  ``{"background": 0, "pancreas": 1, ...}``; images ``imagesTr/NAME_0000<file_ending>``, labels
  ``labelsTr/NAME<file_ending>``). Sites: an optional ``ROOT/sites.json`` mapping ``NAME -> site``
  (every case must be listed); without it every case gets the dataset's name as its site.
* **CSV list** (``*.csv``): columns ``image,label,site`` and an optional ``case_id``.
  Declared labels: ``{0, 1, 2}`` (background, pancreas, tumour), as for lists without ``labels``.
* **JSON list** (``*.json``): ``[{"image", "label", "site", "case_id"?}, ...]`` or
  ``{"labels": {"0": "background", ...}, "cases": [...]}``. A JSON file with a ``training`` list is
  read as an MSD ``dataset.json``.

:func:`read_dataset` collects every problem it meets (so that ``verify-dataset`` reports them all
at once); :func:`load_datalist` raises :class:`DatasetError` listing the fatal ones.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

NIFTI_SUFFIXES = (".nii.gz", ".nii")
CSV_COLUMNS = ("image", "label", "site")
DEFAULT_LIST_LABELS = (0, 1, 2)
"""Labels of a list that declares none: 0 background, 1 pancreas, 2 tumour (merged into 1)."""


class DatasetError(ValueError):
    """A dataset or one of its files is unusable; the message names the file and the fix."""


@dataclass(frozen=True)
class Problem:
    """One problem of a dataset: ``str()`` gives ``"FATAL|WARN path: message"``."""

    fatal: bool
    path: str
    message: str

    def __str__(self) -> str:
        return f"{'FATAL' if self.fatal else 'WARN'} {self.path}: {self.message}"


@dataclass(frozen=True)
class Case:
    """One labelled CT scan: absolute file paths and the site (hospital/scanner) it comes from."""

    case_id: str
    image: str
    label: str
    site: str

    def as_dict(self) -> dict[str, str]:
        """The MONAI data dict the transforms start from."""
        return {"image": self.image, "label": self.label, "case_id": self.case_id, "site": self.site}


@dataclass
class Split:
    """Source-site cases split into training and validation; every other site is a test site."""

    train: list[Case]
    val: list[Case]
    test: dict[str, list[Case]]


@dataclass
class DatasetInfo:
    """What :func:`read_dataset` found: the cases and what the list declares about them."""

    root: Path
    """Folder the list's paths are relative to (the dataset root, or the list file's folder)."""
    list_file: Path
    """The file that lists the cases (dataset.json, the CSV or the JSON list)."""
    layout: str
    """'msd', 'nnunet', 'csv' or 'json'."""
    name: str
    label_values: tuple[int, ...]
    """Label values the list declares (0 = background); anything else in a label file is an error."""
    cases: list[Case] = field(default_factory=list)
    listed_at: list[str] = field(default_factory=list)
    """Where each case is listed in ``list_file`` (``training[3]``, ``line 5``), for messages."""


def case_id_from_path(path: str | Path) -> str:
    """``.../pancreas_001.nii.gz`` -> ``pancreas_001``; nnU-Net's channel suffix ``_0000`` is dropped."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    return name[:-5] if name.endswith("_0000") else name


def load_datalist(root: str | Path) -> list[Case]:
    """All cases of a dataset root or list file; raises :class:`DatasetError` on any fatal problem."""
    return load_dataset(root).cases


def load_dataset(root: str | Path) -> DatasetInfo:
    """Like :func:`load_datalist`, with what the list declares (layout, name, label values)."""
    info, problems = read_dataset(root)
    fatal = [p for p in problems if p.fatal]
    if fatal:
        raise DatasetError(f"{len(fatal)} fatal problem(s) in dataset {root}:\n"
                           + "\n".join(str(p) for p in fatal)
                           + "\n(run `dualssl verify-dataset` for the full report)")
    return info


def read_dataset(root: str | Path) -> tuple[DatasetInfo, list[Problem]]:
    """Parse a dataset root or list file; returns what was found and every problem met on the way."""
    root = Path(root).expanduser().resolve()
    problems: list[Problem] = []
    empty = DatasetInfo(root=root, list_file=root, layout="unknown", name=root.name,
                        label_values=DEFAULT_LIST_LABELS)
    if not root.exists():
        problems.append(Problem(True, str(root), "dataset root not found; give an MSD or nnU-Net raw "
                                "folder (with dataset.json) or a CSV/JSON list of image,label,site"))
        return empty, problems
    if root.is_dir():
        list_file = root / "dataset.json"
        if not list_file.is_file():
            problems.append(Problem(True, str(list_file), "no dataset.json in the dataset root; write one "
                                    "(MSD: a `training` list; nnU-Net v2: `channel_names` and `labels`) "
                                    "or pass a CSV/JSON list of image,label,site"))
            return empty, problems
    else:
        list_file = root
    if list_file.suffix.lower() == ".csv":
        info = _read_csv(list_file, problems)
    elif list_file.suffix.lower() == ".json":
        info = _read_json(list_file, problems)
    else:
        problems.append(Problem(True, str(list_file), "unknown list format; use a folder with dataset.json, "
                                "a .csv or a .json list"))
        return empty, problems
    if info is None:
        return empty, problems
    _check_cases(info, problems)
    return info, problems


def split_cases(cases: Sequence[Case], source_sites: Sequence[str], val_fraction: float,
                seed: int) -> Split:
    """Split source-site cases into train/val (per site, deterministic); other sites are test sites.

    Each source site gives ``round(n * val_fraction)`` validation cases (at least one when it has
    two or more cases, never all of them). The result depends only on the case ids, the sites,
    ``val_fraction`` and ``seed``, not on the order of ``cases``.
    """
    by_site: dict[str, list[Case]] = {}
    for case in cases:
        by_site.setdefault(case.site, []).append(case)
    known = sorted(by_site)
    unknown = [s for s in source_sites if s not in by_site]
    if unknown:
        raise DatasetError(f"data.source_sites: unknown site(s) {', '.join(map(repr, unknown))}; "
                           f"the dataset's sites are: {', '.join(known) or '(none)'}")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"data.val_fraction: {val_fraction} must lie in (0, 1)")
    train: list[Case] = []
    val: list[Case] = []
    for site in dict.fromkeys(source_sites):  # de-duplicated, in the given order
        site_cases = sorted(by_site[site], key=lambda c: c.case_id)
        n = len(site_cases)
        n_val = min(max(round(n * val_fraction), 1 if n >= 2 else 0), n - 1)
        random.Random(f"{seed}:{site}").shuffle(site_cases)
        val.extend(sorted(site_cases[:n_val], key=lambda c: c.case_id))
        train.extend(sorted(site_cases[n_val:], key=lambda c: c.case_id))
    if not val:
        raise DatasetError(f"data.source_sites: {', '.join(source_sites)} hold(s) {len(train)} case(s), too few "
                           "to keep one for validation; add cases or another source site")
    test = {site: sorted(by_site[site], key=lambda c: c.case_id)
            for site in known if site not in set(source_sites)}
    return Split(train=train, val=val, test=test)


def split_selection_report(test: Mapping[str, Sequence[Case]], seed: int, selection_fraction: float = 0.5
                           ) -> tuple[dict[str, list[Case]], dict[str, list[Case]]]:
    """Split each test site's cases into a SELECTION part and a REPORT part (DomainBed's test-domain oracle).

    An oracle may select models on the selection part of an unseen site, and its numbers are then
    reported on the report part only, so no case is used both to choose and to report.

    Each site gives ``floor(n * selection_fraction)`` cases to selection (a site with one case puts
    it in report); which ones is fixed by a hash of ``(seed, site, case_id)``, so the result depends
    only on the case ids, the sites and ``seed`` (``data.split_seed``), never on the order of the list.

    Returns:
        ``(selection, report)``: ``{site: cases sorted by case_id}`` each, with the same sites
        (a site whose selection part is empty maps to ``[]``).
    """
    if not 0.0 <= selection_fraction < 1.0:
        raise DatasetError(f"selection_fraction: {selection_fraction} must lie in [0, 1) "
                           "(the report part may not be empty)")
    selection: dict[str, list[Case]] = {}
    report: dict[str, list[Case]] = {}
    for site in sorted(test):
        def rank(case: Case, site: str = site) -> tuple[str, str, str]:
            digest = hashlib.sha256(f"{seed}:{site}:{case.case_id}".encode()).hexdigest()
            return digest, case.case_id, case.image
        ranked = sorted(test[site], key=rank)
        n_sel = int(len(ranked) * selection_fraction)
        selection[site] = sorted(ranked[:n_sel], key=lambda c: c.case_id)
        report[site] = sorted(ranked[n_sel:], key=lambda c: c.case_id)
    return selection, report


def sites_of(cases: Sequence[Case]) -> dict[str, int]:
    """Site name -> number of cases, sorted by name."""
    counts: dict[str, int] = {}
    for case in cases:
        counts[case.site] = counts.get(case.site, 0) + 1
    return dict(sorted(counts.items()))


# --- layouts --------------------------------------------------------------------------------------

def _load_json(path: Path, problems: list[Problem]) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        problems.append(Problem(True, str(path), f"does not parse as JSON (line {exc.lineno}, column "
                                f"{exc.colno}: {exc.msg}); fix the syntax"))
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem(True, str(path), f"cannot be read ({exc})"))
    return None


def _read_json(path: Path, problems: list[Problem]) -> DatasetInfo | None:
    tree = _load_json(path, problems)
    if tree is None:
        return None
    if isinstance(tree, dict) and "training" in tree:
        return _read_msd(path, tree, problems)
    if isinstance(tree, dict) and "channel_names" in tree:
        return _read_nnunet(path, tree, problems)
    if isinstance(tree, dict) and "cases" in tree:
        entries, labels = tree["cases"], _declared_labels(path, tree.get("labels"), problems)
    elif isinstance(tree, list):
        entries, labels = tree, DEFAULT_LIST_LABELS
    else:
        problems.append(Problem(True, str(path), "expected an MSD dataset.json (`training` list), an nnU-Net "
                                "v2 dataset.json (`channel_names`), a list of {image, label, site} or "
                                "{\"cases\": [...]}"))
        return None
    info = DatasetInfo(root=path.parent, list_file=path, layout="json", name=path.stem,
                       label_values=labels or DEFAULT_LIST_LABELS)
    if not isinstance(entries, list):
        problems.append(Problem(True, str(path), "`cases` must be a list of {image, label, site}"))
        return info
    for i, entry in enumerate(entries):
        where = f"entry {i}"
        if not isinstance(entry, dict):
            problems.append(Problem(True, str(path), f"{where}: expected an object with image, label, site"))
            continue
        missing = [k for k in CSV_COLUMNS if not str(entry.get(k) or "").strip()]
        if missing:
            problems.append(Problem(True, str(path), f"{where}: missing {', '.join(missing)}"))
            continue
        _add_case(info, entry["image"], entry["label"], str(entry["site"]), entry.get("case_id"), where)
    return info


def _read_csv(path: Path, problems: list[Problem]) -> DatasetInfo | None:
    info = DatasetInfo(root=path.parent, list_file=path, layout="csv", name=path.stem,
                       label_values=DEFAULT_LIST_LABELS)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
            columns = [c.strip() for c in (rows[0].keys() if rows else [])]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        problems.append(Problem(True, str(path), f"cannot be read as CSV ({exc})"))
        return None
    missing = [c for c in CSV_COLUMNS if c not in columns]
    if missing:
        problems.append(Problem(True, str(path), f"missing column(s) {', '.join(missing)} (found: "
                                f"{', '.join(columns) or 'no rows'}); the header must be image,label,site"))
        return None
    for i, row in enumerate(rows, start=2):  # line 1 is the header
        row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
        empty = [c for c in CSV_COLUMNS if not row.get(c)]
        if empty:
            problems.append(Problem(True, str(path), f"line {i}: empty {', '.join(empty)}"))
            continue
        _add_case(info, row["image"], row["label"], row["site"], row.get("case_id") or None, f"line {i}")
    return info


def _read_msd(path: Path, tree: dict[str, Any], problems: list[Problem]) -> DatasetInfo:
    name = str(tree.get("name") or path.parent.name)
    info = DatasetInfo(root=path.parent, list_file=path, layout="msd", name=name,
                       label_values=_declared_labels(path, tree.get("labels"), problems) or DEFAULT_LIST_LABELS)
    entries = tree["training"]
    if not isinstance(entries, list):
        problems.append(Problem(True, str(path), "`training` must be a list of {\"image\", \"label\"}"))
        return info
    with_site = 0
    for i, entry in enumerate(entries):
        where = f"training[{i}]"
        if not isinstance(entry, dict) or not entry.get("image") or not entry.get("label"):
            problems.append(Problem(True, str(path), f"{where}: expected {{\"image\": ..., \"label\": ...}}"))
            continue
        site = entry.get("site")
        with_site += bool(site)
        _add_case(info, entry["image"], entry["label"], str(site) if site else name, entry.get("case_id"), where)
    if 0 < with_site < len(entries):
        problems.append(Problem(False, str(path), f"{len(entries) - with_site} training entries have no `site`; "
                                f"they were given the dataset's name {name!r} as their site"))
    return info


def _read_nnunet(path: Path, tree: dict[str, Any], problems: list[Problem]) -> DatasetInfo:
    root = path.parent
    name = str(tree.get("name") or root.name)
    info = DatasetInfo(root=root, list_file=path, layout="nnunet", name=name,
                       label_values=_declared_labels(path, tree.get("labels"), problems) or DEFAULT_LIST_LABELS)
    channels = tree.get("channel_names")
    if not isinstance(channels, dict) or len(channels) != 1:
        problems.append(Problem(True, str(path), f"`channel_names` must declare exactly one CT channel "
                                f"(e.g. {{\"0\": \"CT\"}}), got {channels!r}"))
    ending = str(tree.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_SUFFIXES:
        problems.append(Problem(True, str(path), f"file_ending {ending!r}: only NIfTI (.nii.gz, .nii) is read"))
        return info
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        problems.append(Problem(True, str(images_dir), "folder missing; nnU-Net raw layout needs "
                                "imagesTr/NAME_0000" + ending))
        return info
    images = sorted(images_dir.glob(f"*_0000{ending}"))
    names = [p.name[: -len(f"_0000{ending}")] for p in images]
    sites = _nnunet_sites(root / "sites.json", names, name, problems)
    for image, case in zip(images, names):
        _add_case(info, str(image), str(labels_dir / f"{case}{ending}"), sites.get(case, name), case,
                  "imagesTr")
    if not images:
        problems.append(Problem(True, str(images_dir), f"no images named NAME_0000{ending}"))
    n_declared = tree.get("numTraining")
    if isinstance(n_declared, int) and n_declared != len(images):
        problems.append(Problem(False, str(path), f"numTraining is {n_declared} but imagesTr holds "
                                f"{len(images)} case(s)"))
    return info


def _nnunet_sites(path: Path, names: list[str], default: str, problems: list[Problem]) -> dict[str, str]:
    """``sites.json`` (``{"NAME": "site", ...}``) beside an nnU-Net dataset.json; absent = one site."""
    if not path.is_file():
        return {}
    tree = _load_json(path, problems)
    if tree is None:
        return {}
    if not isinstance(tree, dict) or not all(isinstance(v, str) and v for v in tree.values()):
        problems.append(Problem(True, str(path), "expected an object {\"CASE_NAME\": \"site\", ...}"))
        return {}
    missing = [n for n in names if n not in tree]
    if missing:
        problems.append(Problem(True, str(path), f"no site for {len(missing)} case(s) "
                                f"({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''}); "
                                "list every case of imagesTr"))
    extra = sorted(set(tree) - set(names))
    if extra:
        problems.append(Problem(False, str(path), f"{len(extra)} name(s) without an image in imagesTr: "
                                f"{', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''}"))
    return dict(tree)


def _declared_labels(path: Path, labels: Any, problems: list[Problem]) -> tuple[int, ...] | None:
    """MSD ``{"0": "background", ...}`` or nnU-Net v2 ``{"background": 0, ...}`` -> sorted values."""
    if labels is None:
        return None
    values: set[int] = set()
    try:
        if not isinstance(labels, dict):
            raise TypeError
        for key, value in labels.items():
            if str(key).strip().lstrip("-").isdigit():  # MSD: value id -> name
                values.add(int(key))
            else:  # nnU-Net v2: name -> id (or a list of ids for regions)
                values.update(int(v) for v in (value if isinstance(value, list) else [value]))
    except (TypeError, ValueError):
        problems.append(Problem(True, str(path), f"`labels` must map ids to names (MSD) or names to ids "
                                f"(nnU-Net v2), got {labels!r}"))
        return None
    return tuple(sorted(values | {0}))


def _add_case(info: DatasetInfo, image: Any, label: Any, site: str, case_id: Any, where: str) -> None:
    image_path = (info.root / str(image)).resolve()
    label_path = (info.root / str(label)).resolve()
    info.cases.append(Case(case_id=str(case_id) if case_id else case_id_from_path(image_path),
                           image=str(image_path), label=str(label_path), site=site.strip()))
    info.listed_at.append(where)


def _check_cases(info: DatasetInfo, problems: list[Problem]) -> None:
    seen: dict[str, int] = {}
    for i, (case, where) in enumerate(zip(info.cases, info.listed_at)):
        if not case.site:
            problems.append(Problem(True, str(info.list_file), f"{where}: empty site name"))
        if case.case_id in seen:
            problems.append(Problem(True, str(info.list_file), f"{where}: case id {case.case_id!r} is listed "
                                    "twice; give every case a unique image file name or case_id"))
        seen[case.case_id] = i
        for key, path in (("image", case.image), ("label", case.label)):
            if not Path(path).is_file():
                problems.append(Problem(True, path, f"{key} file not found (listed in {info.list_file.name} "
                                        f"{where}); fix the path or add the file"))
            elif not path.endswith(NIFTI_SUFFIXES):
                problems.append(Problem(True, path, f"{key} is not a NIfTI file (.nii.gz or .nii)"))
    if not info.cases and not any(p.fatal for p in problems):
        problems.append(Problem(True, str(info.list_file), "lists no cases"))
