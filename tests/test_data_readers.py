"""Dataset readers on tiny fake datasets in each published layout (afire/data/readers.py)."""
import gzip
import math
import os

import numpy as np
import pytest
from data_fakes import (
    decode_rle_reference,
    encode_rle_relative,
    gradient,
    write_corrupt,
    write_jpeg,
    write_lines,
    write_png,
)

from afire.data import readers as rd

IMG = gradient(8, 10)


def rel(recs, root):
    return [os.path.relpath(r.path, root) for r in recs]


def test_read_csv_rows_handles_extra_trailing_field(tmp_path):
    p = write_lines(str(tmp_path / "a.csv"), ["a,b,c", "1,2,3,", "4,5,6", "7,8"])
    assert rd.read_csv_rows(p) == [{"a": "1", "b": "2", "c": "3"}, {"a": "4", "b": "5", "c": "6"},
                                   {"a": "7", "b": "8", "c": ""}]
    bad = write_lines(str(tmp_path / "b.csv"), ["a,b", "1,2,oops"])
    with pytest.raises(ValueError, match="3 fields but the header names 2"):
        rd.read_csv_rows(bad)
    gz = tmp_path / "c.csv.gz"
    gz.write_bytes(gzip.compress(b" x , y\n1,2\n"))
    assert rd.read_csv_rows(str(gz)) == [{"x": "1", "y": "2"}]


def test_read_csv_rows_unreadable_files_name_the_file(tmp_path):
    latin = tmp_path / "latin.csv"
    latin.write_bytes(b"filename,label\n\xe9t\xe9.png,x\n")
    with pytest.raises(ValueError, match=r"latin\.csv: not UTF-8 text \(byte b'\\xe9' at "
                                         r"offset 15\)"):
        rd.read_csv_rows(str(latin))
    big = tmp_path / "big.csv"  # one field over the csv module's limit: csv.Error before
    big.write_text('filename,label\n"' + "a" * 200_000 + '",x\n')
    with pytest.raises(ValueError, match=r"big\.csv: not a readable CSV file .*field limit"):
        rd.read_csv_rows(str(big))
    for name, data in (("nogz.csv.gz", b"garbage"),
                       ("cut.csv.gz", gzip.compress(b"a,b\n1,2\n" * 100)[:30])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=name.replace(".", r"\.") + ": not a gzip file"):
            rd.read_csv_rows(str(tmp_path / name))


def test_group_split_is_by_group_and_stable():
    s = [rd.group_split(f"patient{i}") for i in range(2000)]
    frac = s.count("test") / len(s)
    assert 0.17 < frac < 0.23
    assert rd.group_split("patient7") == rd.group_split("patient7")
    assert rd.group_split("x", test_fraction=0.0) == "train"
    assert rd.group_split("x", test_fraction=1.0) == "test"


def test_folder(tmp_path):
    write_png(str(tmp_path / "NORMAL" / "a.png"), IMG)
    write_jpeg(str(tmp_path / "sick" / "deep" / "b.jpeg"), IMG)
    write_png(str(tmp_path / "c.png"), IMG)
    write_corrupt(str(tmp_path / "NORMAL" / "bad.png"))
    (tmp_path / "readme.txt").write_text("x")
    recs = rd.read_folder(str(tmp_path))
    assert rel(recs, tmp_path) == ["NORMAL/a.png", "NORMAL/bad.png", "c.png", "sick/deep/b.jpeg"]
    assert [r.label for r in recs] == ["NORMAL", "NORMAL", "", "sick"]
    assert all(r.abnormal == -1 and r.split == "train" for r in recs)
    assert recs[0].group == "a"


def make_kermany(root):
    files = {
        "train/NORMAL/IM-0115-0001.jpeg": 0, "train/NORMAL/NORMAL2-IM-0383-0001.jpeg": 0,
        "train/PNEUMONIA/person1_bacteria_1.jpeg": 1, "train/PNEUMONIA/person1_virus_6.jpeg": 1,
        "test/NORMAL/IM-0001-0001.jpeg": 0, "test/PNEUMONIA/person100_bacteria_475.jpeg": 1,
        "val/NORMAL/NORMAL2-IM-1427-0001.jpeg": 0,
    }
    for f in files:
        write_jpeg(os.path.join(root, "chest_xray", f), IMG)
    return files


def test_kermany(tmp_path):
    files = make_kermany(str(tmp_path))
    recs = rd.read_kermany(str(tmp_path))
    assert len(recs) == len(files)
    by = {os.path.relpath(r.path, tmp_path / "chest_xray"): r for r in recs}
    for f, ab in files.items():
        r = by[f]
        assert r.abnormal == ab and r.label == ("pneumonia" if ab else "normal")
        assert r.split == f.split("/")[0]
        assert r.labels == {"pneumonia": float(ab)}
    assert by["train/PNEUMONIA/person1_bacteria_1.jpeg"].group == "person1"
    assert by["train/PNEUMONIA/person1_virus_6.jpeg"].extra["pneumonia_type"] == "virus"
    assert by["train/NORMAL/NORMAL2-IM-0383-0001.jpeg"].group == "NORMAL2-IM-0383"
    assert by["test/NORMAL/IM-0001-0001.jpeg"].group == "IM-0001"
    with pytest.raises(ValueError, match="Kermany"):
        rd.read_kermany(str(tmp_path / "chest_xray" / "train"))


NIH_HEADER = ("Image Index,Finding Labels,Follow-up #,Patient ID,Patient Age,Patient Gender,"
              "View Position,OriginalImage[Width,Height],OriginalImagePixelSpacing[x,y],")


def make_nih(root, lists=True):
    rows = [
        ("00000001_000.png", "Cardiomegaly", "1", "PA"),
        ("00000001_001.png", "Cardiomegaly|Emphysema", "1", "PA"),
        ("00000002_000.png", "No Finding", "2", "AP"),
        ("00000003_000.png", "Effusion|Pneumonia|Infiltration", "3", "AP"),
        ("00000004_000.png", "No Finding", "4", "PA"),  # listed, not on disk
    ]
    lines = [NIH_HEADER]
    for name, f, pid, view in rows:
        lines.append(f"{name},{f},0,{pid},58,M,{view},2682,2749,0.143,0.143,")
    write_lines(os.path.join(root, "Data_Entry_2017_v2020.csv"), lines)
    for i, (name, *_) in enumerate(rows[:4]):
        write_png(os.path.join(root, f"images_00{1 + i // 2}", "images", name), IMG)
    if lists:
        write_lines(os.path.join(root, "train_val_list.txt"),
                    ["00000001_000.png", "00000001_001.png", "00000002_000.png"])
        write_lines(os.path.join(root, "test_list.txt"), ["00000003_000.png"])


def test_nih_official_split(tmp_path):
    make_nih(str(tmp_path))
    with pytest.warns(UserWarning, match="1 images listed in Data_Entry_2017_v2020.csv not found"):
        recs = rd.read_nih(str(tmp_path))
    assert [os.path.basename(r.path) for r in recs] == [
        "00000001_000.png", "00000001_001.png", "00000002_000.png", "00000003_000.png"]
    assert [r.split for r in recs] == ["train", "train", "train", "test"]
    assert [r.abnormal for r in recs] == [1, 1, 0, 1]
    assert [r.group for r in recs] == ["1", "1", "2", "3"]
    assert set(recs[0].labels) == set(rd.NIH_FINDINGS)
    on = {k for k, v in recs[3].labels.items() if v == 1.0}
    assert on == {"Effusion", "Pneumonia", "Infiltration"}
    assert sum(recs[2].labels.values()) == 0 and recs[2].label == "no_finding"
    assert recs[2].extra["view"] == "AP"


def test_nih_patient_split_without_lists(tmp_path):
    make_nih(str(tmp_path), lists=False)
    with pytest.warns(UserWarning):
        recs = rd.read_nih(str(tmp_path), test_fraction=0.5)
    for r in recs:
        assert r.split == rd.group_split(r.group, 0.5)
    assert recs[0].split == recs[1].split  # same patient, same side


def test_nih_unknown_finding(tmp_path):
    write_lines(str(tmp_path / "Data_Entry_2017.csv"),
                [NIH_HEADER, "a.png,Covid,0,1,1,M,PA,1,1,1,1,"])
    write_png(str(tmp_path / "images" / "a.png"), IMG)
    with pytest.raises(ValueError, match="unknown finding"):
        rd.read_nih(str(tmp_path))


CHX_COLS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + list(rd.CHEXPERT_FINDINGS)


def chx_row(path, view, values):
    cells = {c: "" for c in rd.CHEXPERT_FINDINGS}
    cells.update(values)
    return ",".join([path, "Male", "68", view, "AP" if view == "Frontal" else ""] +
                    [cells[c] for c in rd.CHEXPERT_FINDINGS])


def make_chexpert(root):
    base = os.path.join(root, "CheXpert-v1.0-small")
    train = [
        ("train/patient00001/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0"}),
        ("train/patient00002/study1/view1_frontal.jpg", "Frontal",
         {"Edema": "-1.0", "Cardiomegaly": "1.0", "Pneumonia": "0.0"}),
        ("train/patient00002/study1/view2_lateral.jpg", "Lateral", {"Edema": "1.0"}),
        ("train/patient00003/study1/view1_frontal.jpg", "Frontal", {"Edema": "-1.0"}),
    ]
    valid = [("valid/patient64541/study1/view1_frontal.jpg", "Frontal", {"No Finding": "1.0"})]
    for name, rows in (("train.csv", train), ("valid.csv", valid)):
        write_lines(os.path.join(base, name), [",".join(CHX_COLS)] + [
            chx_row("CheXpert-v1.0-small/" + p, v, d) for p, v, d in rows])
        for p, _, _ in rows:
            write_jpeg(os.path.join(base, p), IMG)
    return base


@pytest.mark.parametrize("policy,edema", [("ones", 1.0), ("zeros", 0.0), ("ignore", math.nan)])
def test_chexpert_uncertain_policies(tmp_path, policy, edema):
    base = make_chexpert(str(tmp_path))
    recs = rd.read_chexpert(base, uncertain=policy)
    assert len(recs) == 4  # the lateral view is filtered out
    by = {r.group: r for r in recs if r.split == "train"}
    r2 = by["patient00002"]
    assert r2.labels["Cardiomegaly"] == 1.0 and r2.labels["Pneumonia"] == 0.0
    assert r2.labels["Atelectasis"] == 0.0  # blank = negative
    if math.isnan(edema):
        assert math.isnan(r2.labels["Edema"])
    else:
        assert r2.labels["Edema"] == edema
    assert by["patient00001"].abnormal == 0
    assert r2.abnormal == 1
    assert by["patient00003"].abnormal == (1 if policy == "ones" else -1)
    assert [r.split for r in recs].count("val") == 1


def test_chexpert_root_variants_and_views(tmp_path):
    base = make_chexpert(str(tmp_path))
    a = rd.read_chexpert(base)
    b = rd.read_chexpert(str(tmp_path))  # the parent of the dataset folder works too
    assert [r.path for r in a] == [r.path for r in b]
    assert len(rd.read_chexpert(base, frontal_only=False)) == 5
    with pytest.raises(ValueError, match="uncertain"):
        rd.read_chexpert(base, uncertain="maybe")
    with pytest.raises(ValueError, match="CheXpert"):
        rd.read_chexpert(str(tmp_path / "nothing"))


def make_mimic(root):
    meta = ["dicom_id,subject_id,study_id,PerformedProcedureStepDescription,ViewPosition,Rows,"
            "Columns", "d1,10000032,50414267,CHEST,PA,8,10",
            "d2,10000032,50414267,CHEST,LATERAL,8,10",
            "d3,11000011,53000001,CHEST,AP,8,10", "d4,12000000,54000000,CHEST,PA,8,10"]
    labels = ["subject_id,study_id," + ",".join(rd.CHEXPERT_FINDINGS),
              "10000032,50414267," + ",".join("1.0" if c == "No Finding" else ""
                                                for c in rd.CHEXPERT_FINDINGS),
              "11000011,53000001," + ",".join({"Edema": "-1.0", "Pneumonia": "1.0"}.get(c, "")
                                                for c in rd.CHEXPERT_FINDINGS)]
    split = ["dicom_id,study_id,subject_id,split", "d1,50414267,10000032,train",
             "d2,50414267,10000032,train", "d3,53000001,11000011,validate"]
    write_lines(os.path.join(root, "mimic-cxr-2.0.0-metadata.csv"), meta)
    p = os.path.join(root, "mimic-cxr-2.0.0-chexpert.csv.gz")
    with gzip.open(p, "wt") as f:
        f.write("\n".join(labels) + "\n")
    write_lines(os.path.join(root, "mimic-cxr-2.0.0-split.csv"), split)
    for d, s, st in (("d1", "10000032", "50414267"), ("d2", "10000032", "50414267"),
                     ("d3", "11000011", "53000001")):
        write_jpeg(os.path.join(root, "files", "p" + s[:2], "p" + s, "s" + st, d + ".jpg"), IMG)


def test_mimic(tmp_path):
    make_mimic(str(tmp_path))
    with pytest.warns(UserWarning, match="1 MIMIC-CXR images"):
        recs = rd.read_mimic(str(tmp_path), uncertain="zeros")
    assert [os.path.basename(r.path) for r in recs] == ["d1.jpg", "d3.jpg"]
    d1, d3 = recs
    assert d1.abnormal == 0 and d1.label == "normal" and d1.split == "train"
    assert d1.group == "10000032"
    assert d3.abnormal == 1 and d3.split == "val" and d3.labels["Edema"] == 0.0
    assert d3.labels["Pneumonia"] == 1.0
    with pytest.warns(UserWarning):
        assert len(rd.read_mimic(str(tmp_path), frontal_only=False)) == 3


def test_rle_hand_made_case():
    m = rd.decode_rle("1 2 3 1", 4, 3)
    expected = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(m, expected)
    np.testing.assert_array_equal(rd.decode_rle("2 2 7 1", 4, 3, relative=False), expected)
    assert not rd.decode_rle("-1", 4, 3).any() and rd.decode_rle(" -1", 4, 3).shape == (4, 3)
    with pytest.raises(ValueError, match="outside"):
        rd.decode_rle("10 5", 4, 3)
    with pytest.raises(ValueError, match="odd"):
        rd.decode_rle("1 2 3", 4, 3)


def test_rle_random_masks_match_reference():
    rng = np.random.default_rng(1)
    for h, w in ((7, 5), (16, 16), (1, 9)):
        for p in (0.1, 0.5, 0.9):
            m = (rng.random((h, w)) < p).astype(np.uint8)
            s = encode_rle_relative(m)
            np.testing.assert_array_equal(rd.decode_rle(s, h, w), m)
            np.testing.assert_array_equal(decode_rle_reference(s, h, w), m)


def make_siim(root):
    """Three train images (one with two RLE rows, one empty) + one test image, as .dcm
    placeholders (the reader only indexes them)."""
    h, w = 6, 5
    a = np.zeros((h, w), np.uint8)
    a[1:3, 1:3] = 1
    b = np.zeros((h, w), np.uint8)
    b[4:6, 3] = 1
    c = np.zeros((h, w), np.uint8)
    c[0, 0] = 1
    lines = ["ImageId, EncodedPixels", f"1.2.3.1, {encode_rle_relative(a)}",
             f"1.2.3.1, {encode_rle_relative(b)}", "1.2.3.2, -1",
             f"1.2.3.3, {encode_rle_relative(c)}"]
    write_lines(os.path.join(root, "train-rle.csv"), lines)
    for uid, sub in (("1.2.3.1", "dicom-images-train/s1/r1"),
                     ("1.2.3.2", "dicom-images-train/s2/r2"),
                     ("1.2.3.3", "dicom-images-train/s3/r3"),
                     ("1.2.3.9", "dicom-images-test/s9/r9")):
        d = os.path.join(root, sub)
        os.makedirs(d, exist_ok=True)
        open(os.path.join(d, uid + ".dcm"), "wb").close()
    return (h, w), a | b, c


def test_siim_rows_ored(tmp_path):
    (h, w), ab, c = make_siim(str(tmp_path))
    recs = rd.read_siim(str(tmp_path))
    by = {r.group: r for r in recs}
    assert set(by) == {"1.2.3.1", "1.2.3.2", "1.2.3.3", "1.2.3.9"}
    r1 = by["1.2.3.1"]
    assert r1.abnormal == 1 and r1.split == "train" and len(r1.extra["rle"]) == 2
    m = np.zeros((h, w), np.uint8)
    for s in r1.extra["rle"]:
        m |= rd.decode_rle(s, h, w)
    np.testing.assert_array_equal(m, ab)
    ref = decode_rle_reference(r1.extra["rle"][0], h, w) | decode_rle_reference(
        r1.extra["rle"][1], h, w)
    np.testing.assert_array_equal(m, ref)
    assert by["1.2.3.2"].abnormal == 0 and by["1.2.3.2"].extra["rle"] == []
    assert by["1.2.3.9"].split == "test" and by["1.2.3.9"].abnormal == -1


def test_shared_layout(tmp_path):
    write_lines(str(tmp_path / "k" / "labels.csv"), [
        "filename,label,abnormal,pneumonia_type,group_id,orig_mode",
        "images/IM-1-0001.png,normal,0,,IM-1,L",
        "images/person2_virus_3.png,pneumonia,1,virus,person2,L",
        "images/gone.png,normal,0,,gone,L"])
    for f in ("IM-1-0001.png", "person2_virus_3.png"):
        write_png(str(tmp_path / "k" / "images" / f), IMG)
    with pytest.warns(UserWarning, match="1 files listed in labels.csv"):
        recs = rd.read_shared(str(tmp_path / "k"))
    assert [r.label for r in recs] == ["normal", "pneumonia"]
    assert [r.abnormal for r in recs] == [0, 1]
    assert [r.group for r in recs] == ["IM-1", "person2"]
    assert recs[1].extra["pneumonia_type"] == "virus"
    assert all(r.split == rd.group_split(r.group) for r in recs)

    cols = ",".join(rd.NIH_FINDINGS)
    vals = ",".join("1" if f == "Pneumonia" else "0" for f in rd.NIH_FINDINGS)
    write_lines(str(tmp_path / "n" / "labels.csv"), [
        f"filename,label,abnormal,{cols},patient_id,view",
        f"images/a.png,pneumonia,1,{vals},61,AP"])
    write_png(str(tmp_path / "n" / "images" / "a.png"), IMG)
    (r,) = rd.read_shared(str(tmp_path / "n"))
    assert r.group == "61" and r.labels["Pneumonia"] == 1.0 and r.labels["Edema"] == 0.0
    assert r.extra["view"] == "AP"


def test_read_dataset_dispatch(tmp_path):
    write_png(str(tmp_path / "a.png"), IMG)
    assert len(rd.read_dataset("folder", str(tmp_path))) == 1
    with pytest.raises(ValueError, match="format must be"):
        rd.read_dataset("dicomdir", str(tmp_path))
    with pytest.raises(FileNotFoundError):
        rd.read_dataset("folder", str(tmp_path / "missing"))
