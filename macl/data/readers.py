"""Find the volumes of a data set: a NIfTI folder, an MSD / nnU-Net folder, or a MONAI datalist.

Readers only list files (no voxel is read here); :mod:`macl.data.loading` reads and checks them.
Every reader returns a :class:`DatasetIndex` of :class:`CaseRecord` s, so later stages never care
which layout the data came in.

Layouts understood:

- **NIfTI folder**: every ``*.nii`` / ``*.nii.gz`` directly in the folder is one case (a 4D file is
  one multi-channel case). Labels, if any, sit in a sub-folder named ``labels``, ``labelsTr``,
  ``masks`` or ``segmentations`` (or the one given) under the same file name or case id.
- **MSD / nnU-Net**: ``dataset.json`` + ``imagesTr/`` + ``labelsTr/`` (+ optional ``imagesTs/``).
  Images are either one 4D multi-channel file per case (Decathlon) or one file per channel with a
  ``_0000``, ``_0001``... suffix (nnU-Net v1/v2). ``labels`` in dataset.json may be MSD style
  (``{"0": "background", ...}``) or nnU-Net v2 style (``{"background": 0, ...}``).
- **MONAI datalist**: a JSON file ``{"training": [{"image": ..., "label": ...}, ...], ...}``;
  ``image`` may be a list of channel files; paths are relative to the JSON's folder.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from macl.data.errors import DataError
from macl.data.meta_check import check_datalist_entries, check_msd_meta

logger = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
LABEL_DIR_NAMES = ("labels", "labelsTr", "masks", "segmentations")
_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseRecord:
    """One case: its channel file(s) and optional label file.

    Attributes:
        case_id: unique name of the case within its data set (file name without suffixes).
        images: one path per channel, or a single (possibly 4D, multi-channel) file.
        label: the integer label volume, or None for an unlabelled case.
    """

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None


@dataclass
class DatasetIndex:
    """The cases of one data set plus what its metadata says about them.

    Attributes:
        root: the folder (or JSON file) the index was read from.
        cases: every case found, sorted by case id.
        labels: class index -> class name from dataset.json / datalist (None when unknown).
        channel_names: one name per channel when the metadata gives them.
        source: ``"folder"``, ``"msd"`` or ``"datalist"``.
    """

    root: Path
    cases: list[CaseRecord]
    labels: dict[int, str] | None = None
    channel_names: list[str] | None = None
    source: str = "folder"
    extra: dict[str, Any] = field(default_factory=dict)

    def labelled(self) -> list[CaseRecord]:
        """The cases that have a label file."""
        return [c for c in self.cases if c.label is not None]

    def by_id(self, case_id: str) -> CaseRecord:
        """The case named ``case_id``; raises KeyError naming the id when absent."""
        for c in self.cases:
            if c.case_id == case_id:
                return c
        raise KeyError(f"no case {case_id!r} in {self.root}")

    @property
    def allowed_label_values(self) -> set[int] | None:
        """Label values dataset.json allows, or None when it does not say."""
        return None if self.labels is None else set(self.labels)


def strip_nifti_suffix(name: str) -> str | None:
    """``"case_001_0000.nii.gz"`` -> ``"case_001_0000"``; None if not a NIfTI file name."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)]
    return None


def _nifti_files(folder: Path) -> list[Path]:
    """Visible NIfTI files directly in ``folder`` (macOS ``._`` files and hidden files skipped)."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and strip_nifti_suffix(p.name) is not None
    )


def _no_volumes(folder: Path) -> DataError:
    return DataError(folder, "no NIfTI volumes found (looked for *.nii and *.nii.gz)")


def read_nifti_folder(folder: str | Path, labels_dir: str | Path | None = None) -> DatasetIndex:
    """Index a plain folder of NIfTI volumes, one case per file.

    Args:
        folder: folder holding ``*.nii`` / ``*.nii.gz`` files (not searched recursively).
        labels_dir: folder of label files with the same names or case ids; default: the first of
            ``labels``, ``labelsTr``, ``masks``, ``segmentations`` found inside ``folder``.

    Raises:
        DataError: ``folder`` is missing or holds no NIfTI volume, or ``labels_dir`` is missing.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(folder, "not a folder")
    files = _nifti_files(folder)
    if not files:
        raise _no_volumes(folder)
    if labels_dir is None:
        found = [folder / n for n in LABEL_DIR_NAMES if (folder / n).is_dir()]
        lab_dir = found[0] if found else None
    else:
        lab_dir = Path(labels_dir)
        if not lab_dir.is_dir():
            raise DataError(lab_dir, "labels folder not found")
    label_by_id: dict[str, Path] = {}
    if lab_dir is not None:
        for p in _nifti_files(lab_dir):
            label_by_id[strip_nifti_suffix(p.name)] = p  # type: ignore[index]
    cases = []
    for p in files:
        cid = strip_nifti_suffix(p.name)
        assert cid is not None
        cases.append(CaseRecord(cid, (p,), label_by_id.pop(cid, None)))
    if label_by_id:
        logger.warning("%s: %d label file(s) without an image: %s", lab_dir, len(label_by_id),
                       ", ".join(sorted(label_by_id)[:5]))
    return DatasetIndex(folder, cases, source="folder")


def _parse_labels(labels: Any, where: Path) -> dict[int, str]:
    """MSD ``{"0": "bg"}`` or nnU-Net v2 ``{"bg": 0}`` -> ``{0: "bg"}``."""
    if not isinstance(labels, dict) or not labels:
        raise DataError(where, f"'labels' must be a non-empty mapping, got {labels!r}")
    if all(str(k).lstrip("-").isdigit() for k in labels):
        return {int(k): str(v) for k, v in labels.items()}
    out: dict[int, str] = {}
    for name, value in labels.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(where, f"label {name!r} has value {value!r}; only integer labels are "
                                   "supported (region-based nnU-Net labels are not)")
        out[value] = str(name)
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(path, f"cannot read JSON ({type(e).__name__}: {e})") from e


def _group_channels(files: Sequence[Path], folder: Path) -> dict[str, tuple[Path, ...]]:
    """Group nnU-Net channel files ``X_0000``, ``X_0001`` by case id; other files stand alone."""
    groups: dict[str, dict[int, Path]] = {}
    for p in files:
        stem = strip_nifti_suffix(p.name)
        assert stem is not None
        m = _CHANNEL_RE.match(stem)
        cid, ch = (m.group("case"), int(m.group("channel"))) if m else (stem, -1)
        if ch in groups.setdefault(cid, {}):
            raise DataError(p, f"channel {ch} of case {cid!r} appears twice")
        groups[cid][ch] = p
    out = {}
    for cid, chans in groups.items():
        keys = sorted(chans)
        if keys != [-1] and keys != list(range(len(keys))):
            raise DataError(folder, f"case {cid!r} has channels {keys}; expected _0000.._{len(keys) - 1:04d}")
        out[cid] = tuple(chans[k] for k in keys)
    return out


def _find_label(lab_dir: Path, cid: str, ending: str) -> Path | None:
    for suffix in (ending,) + NIFTI_SUFFIXES:
        p = lab_dir / f"{cid}{suffix}"
        if p.is_file():
            return p
    return None


def _listed_image(root: Path, rel: str) -> tuple[Path, ...]:
    """The file named in dataset.json, or its ``_0000``.. channel files (nnU-Net v1)."""
    p = (root / rel).resolve()
    if p.is_file():
        return (p,)
    stem = strip_nifti_suffix(p.name)
    if stem is not None and p.parent.is_dir():
        chans = sorted(q for q in p.parent.glob(f"{stem}_[0-9][0-9][0-9][0-9]*")
                       if strip_nifti_suffix(q.name) is not None)
        if chans:
            return tuple(chans)
    raise DataError(p, f"listed in {root / 'dataset.json'} but not found")


def read_msd(root: str | Path, include_unlabelled: bool = True) -> DatasetIndex:
    """Index a Medical Segmentation Decathlon / nnU-Net raw data set.

    Args:
        root: folder holding ``dataset.json`` (optional) and ``imagesTr/`` (+ ``labelsTr/``,
            ``imagesTs/``).
        include_unlabelled: also index ``imagesTs/`` cases (label None, or from ``labelsTs/``).

    Raises:
        DataError: no ``imagesTr`` / no volumes, malformed dataset.json, a listed file missing,
            non-contiguous channel suffixes, a file ending other than NIfTI.
    """
    root = Path(root)
    meta_path = root / "dataset.json"
    meta: dict[str, Any] = _read_json(meta_path) if meta_path.is_file() else {}
    if not isinstance(meta, dict):
        raise DataError(meta_path, "must hold a JSON object")
    check_msd_meta(meta, meta_path)  # malformed fields: one line naming the file and the key
    labels = _parse_labels(meta["labels"], meta_path) if "labels" in meta else None
    chan = meta.get("channel_names", meta.get("modality"))
    channel_names = [str(chan[k]) for k in sorted(chan, key=int)] if isinstance(chan, dict) else None
    ending = str(meta.get("file_ending", ".nii.gz"))
    if ending not in NIFTI_SUFFIXES:
        raise DataError(meta_path, f"file_ending {ending!r} is not supported (only .nii.gz / .nii)")
    images_tr = root / "imagesTr"
    if not images_tr.is_dir():
        raise DataError(root, "no imagesTr folder (expected the MSD / nnU-Net layout)")
    cases: list[CaseRecord] = []
    training = meta.get("training")
    if isinstance(training, list) and training and isinstance(training[0], dict):
        for i, entry in enumerate(training):
            if "image" not in entry:
                raise DataError(meta_path, f"training entry {i} has no 'image': {entry!r}")
            imgs = _listed_image(root, entry["image"])
            lab = None
            if entry.get("label"):
                lab = (root / entry["label"]).resolve()
                if not lab.is_file():
                    raise DataError(lab, f"listed in {meta_path} but not found")
            cases.append(CaseRecord(strip_nifti_suffix(Path(entry["image"]).name) or f"case{i}", imgs, lab))
    else:
        files = _nifti_files(images_tr)
        for cid, imgs in _group_channels(files, images_tr).items():
            cases.append(CaseRecord(cid, imgs, _find_label(root / "labelsTr", cid, ending)))
    if not cases:
        raise _no_volumes(images_tr)
    if include_unlabelled and (root / "imagesTs").is_dir():
        for cid, imgs in _group_channels(_nifti_files(root / "imagesTs"), root / "imagesTs").items():
            cases.append(CaseRecord(cid, imgs, _find_label(root / "labelsTs", cid, ending)))
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(root, f"case ids appear more than once: {dup[:5]}")
    return DatasetIndex(root, sorted(cases, key=lambda c: c.case_id), labels, channel_names, "msd",
                        {"name": meta.get("name")})


def read_datalist(path: str | Path, key: str = "training", base_dir: str | Path | None = None) -> DatasetIndex:
    """Index a MONAI datalist JSON.

    Args:
        path: the JSON file. Entries of ``data[key]`` are ``{"image": str | [str, ...],
            "label": str}`` dicts or bare image paths. An optional top-level ``labels`` mapping
            (MSD or nnU-Net v2 style) declares the allowed label values.
        key: which list to read (``"training"``, ``"validation"``, ``"test"``...).
        base_dir: folder relative paths start from; default the JSON's folder.

    Raises:
        DataError: unreadable JSON, no list under ``key``, an empty list, a missing file.
    """
    path = Path(path)
    data = _read_json(path)
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        keys = sorted(data) if isinstance(data, dict) else []
        raise DataError(path, f"no '{key}' list in the datalist (keys: {keys})")
    if not data[key]:
        raise DataError(path, f"the '{key}' list is empty")
    check_datalist_entries(data[key], key, path)
    base = Path(base_dir) if base_dir is not None else path.parent
    rows: list[tuple[tuple[Path, ...], Path | None]] = []
    for i, entry in enumerate(data[key]):
        entry = {"image": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(path, f"{key}[{i}] has no 'image': {entry!r}")
        rel = entry["image"] if isinstance(entry["image"], list) else [entry["image"]]
        imgs = tuple((base / r).resolve() for r in rel)
        lab = (base / entry["label"]).resolve() if entry.get("label") else None
        for p in imgs + ((lab,) if lab else ()):
            if not p.is_file():
                raise DataError(p, f"listed in {path} ({key}[{i}]) but not found")
            if strip_nifti_suffix(p.name) is None:
                raise DataError(p, "not a NIfTI file (.nii / .nii.gz)")
        rows.append((imgs, lab))
    stems = [strip_nifti_suffix(r[0][0].name) for r in rows]
    cases = []
    for (imgs, lab), stem in zip(rows, stems):
        cid = stem
        if stems.count(stem) > 1:  # e.g. patient1/image.nii.gz, patient2/image.nii.gz
            try:
                rel_path = imgs[0].relative_to(base.resolve())
            except ValueError:
                rel_path = Path(*imgs[0].parts[-3:])
            cid = strip_nifti_suffix(str(rel_path).replace("/", "_").replace("\\", "_"))
        cases.append(CaseRecord(str(cid), imgs, lab))
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        raise DataError(path, f"the '{key}' list names the same image more than once")
    labels = _parse_labels(data["labels"], path) if "labels" in data else None
    return DatasetIndex(path, sorted(cases, key=lambda c: c.case_id), labels, None, "datalist")


def open_dataset(path: str | Path, **kwargs: Any) -> DatasetIndex:
    """Index ``path`` with the reader its layout calls for.

    A ``.json`` file is a MONAI datalist, unless it is a ``dataset.json`` next to ``imagesTr``;
    a folder with ``dataset.json`` or ``imagesTr`` is MSD / nnU-Net; any other folder is a NIfTI
    folder. ``kwargs`` go to the chosen reader.

    Raises:
        DataError: ``path`` does not exist, or the chosen reader's errors.
    """
    p = Path(path)
    if p.is_file() and p.suffix == ".json":
        if p.name == "dataset.json" and (p.parent / "imagesTr").is_dir():
            return read_msd(p.parent, **kwargs)
        return read_datalist(p, **kwargs)
    if not p.exists():
        raise DataError(p, "does not exist")
    if p.is_dir() and ((p / "dataset.json").is_file() or (p / "imagesTr").is_dir()):
        return read_msd(p, **kwargs)
    if p.is_file():
        raise DataError(p, "expected a folder or a .json datalist")
    return read_nifti_folder(p, **kwargs)
