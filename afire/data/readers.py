"""Readers for chest X-ray datasets in their published layouts.

Each reader walks a dataset root and returns a list of :class:`Record` (sorted by path):
where the image is, its labels, its split and its patient/group id. Nothing is decoded
here; ``afire prepare`` decodes and resizes. Files listed by a CSV but absent on disk are
left out with one warning that counts them (a partial download is common).

Splits: the dataset's own split when it publishes one; otherwise a split BY GROUP
(patient) from a hash of the group id (:func:`group_split`, 20% test), so that images of
one patient never land on both sides and the split does not depend on the file order.
"""
from __future__ import annotations

import csv
import gzip
import io
import math
import os
import warnings
import zlib
from dataclasses import dataclass, field

import numpy as np

from .image import DICOM_EXTS, IMAGE_EXTS, list_image_files

NIH_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening",
    "Hernia")
CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion",
    "Edema", "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion",
    "Pleural Other", "Fracture", "Support Devices")
UNCERTAIN_POLICIES = ("ones", "zeros", "ignore")
FORMATS = ("folder", "kermany", "nih", "chexpert", "mimic", "siim", "shared")


@dataclass
class Record:
    """One source image.

    path: the image file. label: a short class name ("normal", "pneumonia", ...; "" when
    unknown). abnormal: 0 normal, 1 abnormal, -1 unknown. labels: multi-label findings,
    1.0 / 0.0, NaN where uncertain and ignored. split: "train", "val" or "test".
    group: patient (or patient-like) id, "" when unknown. extra: format-specific fields
    that must survive into the manifest (e.g. SIIM's RLE strings under "rle").
    """

    path: str
    label: str = ""
    abnormal: int = -1
    labels: dict = field(default_factory=dict)
    split: str = "train"
    group: str = ""
    extra: dict = field(default_factory=dict)


def group_split(group: str, test_fraction: float = 0.2, salt: str = "afire-split") -> str:
    """"test" for about test_fraction of groups, else "train"; a pure function of the id."""
    h = zlib.crc32((salt + "\0" + str(group)).encode()) / 2.0**32
    return "test" if h < test_fraction else "train"


def _open_text(path: str):
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def read_csv_rows(path: str) -> list[dict]:
    """CSV rows as dicts keyed by the stripped header names. Rows longer than the header
    (NIH's Data_Entry_2017.csv ends every row with an empty field its header lacks) keep
    only the named columns; an unnamed extra field must be empty or the file is rejected.
    A file that is not UTF-8 text, not CSV (csv.Error, e.g. a field over the csv module's
    size limit) or not gzip although named .gz raises ValueError naming the file."""
    try:
        return _read_csv_rows(path)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} "
                         f"at offset {e.start})") from None
    except csv.Error as e:
        raise ValueError(f"{path}: not a readable CSV file ({e})") from None
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a gzip file or truncated ({e})") from None


def _read_csv_rows(path: str) -> list[dict]:
    with _open_text(path) as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            raise ValueError(f"{path}: empty CSV file") from None
        while header and header[-1] == "":
            header.pop()
        rows = []
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) > len(header) and any(c.strip() for c in row[len(header):]):
                raise ValueError(f"{path}:{lineno}: {len(row)} fields but the header names "
                                 f"{len(header)}")
            if len(row) < len(header):
                row = row + [""] * (len(header) - len(row))
            rows.append({h: row[i].strip() for i, h in enumerate(header)})
        return rows


def _find(root: str, names: tuple[str, ...], max_depth: int = 3) -> str | None:
    """First file under root (breadth-first, shallow) whose name is in names."""
    level = [root]
    for _ in range(max_depth + 1):
        nxt = []
        for d in sorted(level):
            try:
                entries = sorted(os.listdir(d))
            except OSError:
                continue
            for n in names:
                if n in entries and os.path.isfile(os.path.join(d, n)):
                    return os.path.join(d, n)
            nxt += [os.path.join(d, e) for e in entries if os.path.isdir(os.path.join(d, e))]
        level = nxt
    return None


def _index_files(root: str, exts: tuple[str, ...]) -> dict[str, str]:
    """Base name -> path of every file with one of exts under root (first one wins)."""
    out: dict[str, str] = {}
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.lower().endswith(exts):
                out.setdefault(f, os.path.join(d, f))
    return out


def _warn_missing(missing: list[str], what: str) -> None:
    if missing:
        warnings.warn(f"{len(missing)} {what} not found on disk and left out "
                      f"(first: {missing[0]})", stacklevel=3)


def _sorted(records: list[Record]) -> list[Record]:
    records.sort(key=lambda r: r.path)
    return records


# ---------------------------------------------------------------- plain folder, Kermany


def read_folder(root: str) -> list[Record]:
    """Every PNG/JPEG/DICOM under root, recursively. label = the first directory below root
    ("" for files directly in root); abnormal unknown; split "train"; group = file stem."""
    recs = []
    for p in list_image_files(root):
        rel = os.path.relpath(p, root).split(os.sep)
        stem = os.path.splitext(rel[-1])[0]
        recs.append(Record(path=p, label=rel[0] if len(rel) > 1 else "", group=stem))
    return _sorted(recs)


def kermany_group(name: str) -> str:
    """Patient-like key of a Kermany file name: person1003_virus_1685 -> person1003,
    NORMAL2-IM-0383-0001 -> NORMAL2-IM-0383, IM-0117-0001 -> IM-0117."""
    stem = os.path.splitext(os.path.basename(name))[0]
    if stem.startswith("person"):
        return stem.split("_")[0]
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def read_kermany(root: str) -> list[Record]:
    """Kermany et al. 2018: {train,test,val}/{NORMAL,PNEUMONIA}/*.jpeg (optionally under a
    chest_xray/ folder). Pneumonia images get labels {"bacteria"|"virus": 1}."""
    base = root
    if not any(os.path.isdir(os.path.join(base, s)) for s in ("train", "test")):
        nested = os.path.join(root, "chest_xray")
        if os.path.isdir(nested):
            base = nested
    recs = []
    for split_dir in ("train", "val", "test"):
        d = os.path.join(base, split_dir)
        if not os.path.isdir(d):
            continue
        for cls in sorted(os.listdir(d)):
            cdir = os.path.join(d, cls)
            if not os.path.isdir(cdir) or cls.upper() not in ("NORMAL", "PNEUMONIA"):
                continue
            abnormal = int(cls.upper() == "PNEUMONIA")
            for p in list_image_files(cdir, dicom=False):
                name = os.path.basename(p).lower()
                kind = "bacteria" if "bacteria" in name else "virus" if "virus" in name else ""
                labels = {"pneumonia": float(abnormal)}
                extra = {"pneumonia_type": kind} if abnormal else {}
                recs.append(Record(path=p, label="pneumonia" if abnormal else "normal",
                                   abnormal=abnormal, labels=labels, split=split_dir,
                                   group=kermany_group(p), extra=extra))
    if not recs:
        raise ValueError(f"{root}: no Kermany layout found ({{train,test}}/{{NORMAL,PNEUMONIA}})")
    return _sorted(recs)


# ---------------------------------------------------------------- NIH ChestX-ray14


def read_nih(root: str, test_fraction: float = 0.2) -> list[Record]:
    """NIH ChestX-ray14: Data_Entry_2017*.csv with '|'-joined "Finding Labels"; images
    anywhere under root (images/, images_001/images/, ...). Official train_val_list.txt /
    test_list.txt decide the split when present, else a patient-wise hash split."""
    csv_path = None
    for d, dirs, files in os.walk(root):
        dirs.sort()
        hits = sorted(f for f in files if f.startswith("Data_Entry_2017") and f.endswith(".csv"))
        if hits:
            csv_path = os.path.join(d, hits[0])
            break
    if csv_path is None:
        raise ValueError(f"{root}: no Data_Entry_2017*.csv found")
    rows = read_csv_rows(csv_path)
    lists = {}
    for name, split in (("train_val_list.txt", "train"), ("test_list.txt", "test")):
        p = _find(root, (name,))
        if p:
            with open(p, encoding="utf-8") as f:
                for line in f:
                    if line.strip():
                        lists[line.strip()] = split
    files = _index_files(root, (".png",))
    recs, missing = [], []
    for r in rows:
        name = r.get("Image Index", "")
        if not name:
            raise ValueError(f"{csv_path}: no 'Image Index' column")
        path = files.get(name)
        if path is None:
            missing.append(name)
            continue
        findings = {f.strip() for f in r.get("Finding Labels", "").split("|") if f.strip()}
        unknown = findings - set(NIH_FINDINGS) - {"No Finding"}
        if unknown:
            raise ValueError(f"{csv_path}: unknown finding(s) {sorted(unknown)} for {name}")
        labels = {f: float(f in findings) for f in NIH_FINDINGS}
        normal = not (findings - {"No Finding"})
        patient = r.get("Patient ID", "")
        split = lists.get(name) if lists else group_split(patient, test_fraction)
        if split is None:
            split = group_split(patient, test_fraction)
        recs.append(Record(path=path, label="no_finding" if normal else "finding",
                           abnormal=0 if normal else 1, labels=labels, split=split,
                           group=patient,
                           extra={"view": r.get("View Position", ""),
                                  "finding_labels": r.get("Finding Labels", "")}))
    _warn_missing(missing, f"images listed in {os.path.basename(csv_path)}")
    return _sorted(recs)


# ---------------------------------------------------------------- CheXpert, MIMIC-CXR-JPG


def _uncertain(value: str, policy: str) -> float:
    """CheXpert label cell -> 1/0/NaN. Blank (not mentioned) is negative; -1 (uncertain)
    follows the policy: U-Ones -> 1, U-Zeros -> 0, ignore -> NaN."""
    v = value.strip()
    if v == "":
        return 0.0
    x = float(v)
    if x == -1.0:
        return {"ones": 1.0, "zeros": 0.0, "ignore": math.nan}[policy]
    if x not in (0.0, 1.0):
        raise ValueError(f"label value {value!r} is not 1, 0, -1 or blank")
    return x


def _check_policy(policy: str) -> None:
    if policy not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, got {policy!r}")


def _chexpert_labels(row: dict, policy: str, where: str) -> tuple[dict, int]:
    labels = {}
    for f in CHEXPERT_FINDINGS:
        if f in row:
            try:
                labels[f] = _uncertain(row[f], policy)
            except ValueError as e:
                raise ValueError(f"{where}: column {f!r}: {e}") from None
    if labels.get("No Finding") == 1.0:
        abnormal = 0
    elif any(v == 1.0 for k, v in labels.items() if k not in ("No Finding", "Support Devices")):
        abnormal = 1
    else:
        abnormal = -1
    return labels, abnormal


def _resolve_chexpert(root: str, rel: str) -> str | None:
    parts = rel.replace("\\", "/").split("/")
    for k in range(len(parts)):
        p = os.path.join(root, *parts[k:])
        if os.path.exists(p):
            return p
    p = os.path.join(os.path.dirname(os.path.abspath(root)), *parts)
    return p if os.path.exists(p) else None


def read_chexpert(root: str, uncertain: str = "ones", frontal_only: bool = True
                  ) -> list[Record]:
    """CheXpert: train.csv (split "train"), valid.csv ("val"), test.csv ("test") with a Path
    column like CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg, resolved
    against root (with or without the leading dataset folder). uncertain: policy for -1
    ("ones" U-Ones, "zeros" U-Zeros, "ignore" -> NaN). frontal_only keeps
    Frontal/Lateral == Frontal. abnormal: 0 when "No Finding" == 1, 1 when any finding
    other than Support Devices is positive (after the policy), else -1 (unknown)."""
    _check_policy(uncertain)
    recs, missing, found = [], [], False
    for name, split in (("train.csv", "train"), ("valid.csv", "val"), ("test.csv", "test")):
        p = _find(root, (name,), max_depth=1)
        if p is None:
            continue
        found = True
        for i, r in enumerate(read_csv_rows(p), start=2):
            rel = r.get("Path", "")
            if not rel:
                raise ValueError(f"{p}:{i}: no Path")
            view = r.get("Frontal/Lateral", "")
            if frontal_only and view and view.lower() != "frontal":
                continue
            if frontal_only and not view and "lateral" in rel.lower():
                continue
            path = _resolve_chexpert(root, rel)
            if path is None:
                missing.append(rel)
                continue
            labels, abnormal = _chexpert_labels(r, uncertain, f"{p}:{i}")
            patient = next((s for s in rel.split("/") if s.startswith("patient")), "")
            recs.append(Record(path=path, label={0: "normal", 1: "abnormal"}.get(abnormal, ""),
                               abnormal=abnormal, labels=labels, split=split, group=patient,
                               extra={"view": r.get("AP/PA", "")}))
    if not found:
        raise ValueError(f"{root}: no CheXpert train.csv/valid.csv found")
    _warn_missing(missing, "CheXpert images")
    return _sorted(recs)


def _find_any(root: str, stems: tuple[str, ...]) -> str | None:
    names = tuple(s + ext for s in stems for ext in (".csv", ".csv.gz"))
    return _find(root, names, max_depth=2)


def read_mimic(root: str, uncertain: str = "ones", frontal_only: bool = True
               ) -> list[Record]:
    """MIMIC-CXR-JPG: mimic-cxr-2.0.0-metadata.csv(.gz) (dicom_id, subject_id, study_id,
    ViewPosition), mimic-cxr-2.0.0-chexpert.csv(.gz) (labels per study) and, if present,
    mimic-cxr-2.0.0-split.csv(.gz) (train/validate/test; else a patient hash split).
    Images at files/p<2 digits>/p<subject>/s<study>/<dicom_id>.jpg. frontal_only keeps
    ViewPosition PA/AP. Normal = "No Finding" == 1."""
    _check_policy(uncertain)
    meta_p = _find_any(root, ("mimic-cxr-2.0.0-metadata",))
    lab_p = _find_any(root, ("mimic-cxr-2.0.0-chexpert", "mimic-cxr-2.1.0-chexpert"))
    if meta_p is None or lab_p is None:
        raise ValueError(f"{root}: need mimic-cxr-2.0.0-metadata.csv and "
                         "mimic-cxr-2.0.0-chexpert.csv (optionally .gz)")
    split_p = _find_any(root, ("mimic-cxr-2.0.0-split",))
    study_labels = {}
    for i, r in enumerate(read_csv_rows(lab_p), start=2):
        study_labels[(r["subject_id"], r["study_id"])] = _chexpert_labels(
            r, uncertain, f"{lab_p}:{i}")
    splits = {}
    if split_p:
        for r in read_csv_rows(split_p):
            splits[r["dicom_id"]] = {"validate": "val"}.get(r["split"], r["split"])
    files_dir = _find_dir(root, "files")
    recs, missing = [], []
    for r in read_csv_rows(meta_p):
        view = r.get("ViewPosition", "")
        if frontal_only and view not in ("PA", "AP"):
            continue
        subj, study, dicom = r["subject_id"], r["study_id"], r["dicom_id"]
        path = os.path.join(files_dir, "p" + subj[:2], "p" + subj, "s" + study, dicom + ".jpg")
        if not os.path.exists(path):
            missing.append(dicom)
            continue
        labels, abnormal = study_labels.get((subj, study), ({}, -1))
        split = splits.get(dicom) or group_split(subj)
        recs.append(Record(path=path, label={0: "normal", 1: "abnormal"}.get(abnormal, ""),
                           abnormal=abnormal, labels=dict(labels), split=split, group=subj,
                           extra={"view": view, "study": study}))
    _warn_missing(missing, "MIMIC-CXR images")
    return _sorted(recs)


def _find_dir(root: str, name: str) -> str:
    for d, dirs, _ in os.walk(root):
        dirs.sort()
        if name in dirs:
            return os.path.join(d, name)
        if d.count(os.sep) - root.count(os.sep) >= 3:
            dirs[:] = []
    return os.path.join(root, name)


# ---------------------------------------------------------------- SIIM-ACR pneumothorax


def decode_rle(rle: str, height: int, width: int, relative: bool = True) -> "np.ndarray":
    """SIIM-ACR run-length string -> uint8 [height, width] mask (1 inside).

    Pixels are numbered column by column (index = x * height + y). With relative=True
    (the original train-rle.csv) each run's start counts from the end of the previous run;
    with relative=False starts are absolute (standard Kaggle RLE, 1-based). "-1" or ""
    is an empty mask."""
    flat = np.zeros(height * width, np.uint8)
    s = rle.strip()
    if s in ("", "-1"):
        return flat.reshape(width, height).T.copy()
    try:
        nums = [int(t) for t in s.split()]
    except ValueError:
        raise ValueError(f"RLE contains a non-integer token: {s[:40]!r}") from None
    if len(nums) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(nums)})")
    pos = 0
    for start, length in zip(nums[0::2], nums[1::2]):
        if length < 0 or start < 0:
            raise ValueError("RLE with a negative start or length")
        pos = pos + start if relative else start - 1
        if pos < 0 or pos + length > flat.size:
            raise ValueError(f"RLE run [{pos}, {pos + length}) outside a {height}x{width} mask")
        flat[pos:pos + length] = 1
        if relative:
            pos += length
    return flat.reshape(width, height).T.copy()


def read_siim(root: str, rle_csv: str | None = None, relative: bool = True) -> list[Record]:
    """SIIM-ACR Pneumothorax: DICOM files (<SOPInstanceUID>.dcm anywhere under root) and a
    run-length CSV (train-rle.csv / stage_2_train.csv; columns ImageId, EncodedPixels).
    Several rows for one image are OR-ed; "-1" is an empty mask. Images in the CSV are
    split "train" and labelled pneumothorax 1/0; DICOMs not in the CSV are "test" with
    unknown labels. The RLE strings ride along in extra["rle"] and are decoded by prepare.
    group = the image id (patient ids live in the DICOM headers only)."""
    if rle_csv is None:
        rle_csv = _find(root, ("train-rle.csv", "stage_2_train.csv", "train_rle.csv"),
                        max_depth=2)
    if rle_csv is None:
        raise ValueError(f"{root}: no SIIM RLE CSV (train-rle.csv) found")
    runs: dict[str, list[str]] = {}
    for i, r in enumerate(read_csv_rows(rle_csv), start=2):
        iid = r.get("ImageId", "")
        enc = r.get("EncodedPixels", None)
        if not iid or enc is None:
            raise ValueError(f"{rle_csv}:{i}: need ImageId and EncodedPixels columns")
        runs.setdefault(iid, [])
        if enc not in ("", "-1"):
            runs[iid].append(enc)
    dicoms = _index_files(root, DICOM_EXTS)
    recs, missing = [], []
    seen = set()
    for name, path in dicoms.items():
        iid = os.path.splitext(name)[0]
        seen.add(iid)
        if iid in runs:
            pos = int(bool(runs[iid]))
            recs.append(Record(path=path, label="pneumothorax" if pos else "normal",
                               abnormal=pos, labels={"Pneumothorax": float(pos)},
                               split="train", group=iid,
                               extra={"rle": runs[iid], "rle_relative": relative}))
        else:
            recs.append(Record(path=path, split="test", group=iid))
    missing = sorted(set(runs) - seen)
    _warn_missing(missing, f"images listed in {os.path.basename(rle_csv)}")
    return _sorted(recs)


# ---------------------------------------------------------------- the shared-data layout


def read_shared(root: str, test_fraction: float = 0.2) -> list[Record]:
    """The layout of the project's shared real data: labels.csv with filename, label,
    abnormal and group_id (or patient_id); any 0/1 finding columns named as NIH findings
    become labels. No split column: split by group (hash, test_fraction)."""
    p = os.path.join(root, "labels.csv")
    if not os.path.exists(p):
        raise ValueError(f"{root}: no labels.csv")
    recs, missing = [], []
    for i, r in enumerate(read_csv_rows(p), start=2):
        if "filename" not in r:
            raise ValueError(f"{p}: no 'filename' column")
        path = os.path.join(root, r["filename"])
        if not os.path.exists(path):
            missing.append(r["filename"])
            continue
        group = r.get("group_id") or r.get("patient_id") or ""
        try:
            abnormal = int(r["abnormal"]) if r.get("abnormal", "") != "" else -1
        except ValueError:
            raise ValueError(f"{p}:{i}: abnormal must be 0/1, got {r['abnormal']!r}") from None
        labels = {f: float(r[f]) for f in NIH_FINDINGS if r.get(f, "") != ""}
        if "pneumonia_type" in r and abnormal >= 0:
            labels.setdefault("pneumonia", float(r.get("label") == "pneumonia"))
        split = r.get("split") or group_split(group or r["filename"], test_fraction)
        extra = {k: r[k] for k in ("pneumonia_type", "view", "original_id") if r.get(k)}
        recs.append(Record(path=path, label=r.get("label", ""), abnormal=abnormal,
                           labels=labels, split=split, group=group, extra=extra))
    _warn_missing(missing, "files listed in labels.csv")
    return _sorted(recs)


READERS = {
    "folder": read_folder, "kermany": read_kermany, "nih": read_nih, "chexpert": read_chexpert,
    "mimic": read_mimic, "siim": read_siim, "shared": read_shared,
}


def read_dataset(fmt: str, root: str, **options) -> list[Record]:
    """Dispatch to the reader of a format (one of FORMATS) with its keyword options."""
    if fmt not in READERS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if not os.path.isdir(root):
        raise FileNotFoundError(f"dataset root {root!r} is not a directory")
    return READERS[fmt](root, **options)


__all__ = ["Record", "FORMATS", "NIH_FINDINGS", "CHEXPERT_FINDINGS", "UNCERTAIN_POLICIES",
           "group_split", "read_csv_rows", "decode_rle", "kermany_group", "read_dataset",
           "read_folder", "read_kermany", "read_nih", "read_chexpert", "read_mimic",
           "read_siim", "read_shared", "IMAGE_EXTS"]
