"""The synthetic chest radiograph generator (csrc/core/phantom.c via afire._C.phantom)."""
import numpy as np
import pytest

from afire import _C
from afire.data import phantom_dataset

S = 64


def gen(n, **kw):
    kw.setdefault("size", S)
    return _C.phantom.generate(n, **kw)


def test_shapes_and_dtypes():
    d = gen(3)
    assert set(d) == {"images", "lesion_masks", "organ_labels", "labels"}
    for k in ("images", "lesion_masks", "organ_labels"):
        assert d[k].shape == (3, S, S) and d[k].dtype == np.uint8 and d[k].flags.c_contiguous
    assert d["labels"].shape == (3,) and d["labels"].dtype == np.int32


def test_deterministic_and_indexed_by_subject():
    a = gen(4, seed=7, first_subject=10)
    b = gen(4, seed=7, first_subject=10)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    # subject 12 is the same whichever batch produced it
    c = gen(1, seed=7, first_subject=12)
    np.testing.assert_array_equal(c["images"][0], a["images"][2])
    np.testing.assert_array_equal(c["organ_labels"][0], a["organ_labels"][2])
    # other seed / other subjects differ
    assert not np.array_equal(gen(1, seed=8, first_subject=10)["images"][0], a["images"][0])
    assert not np.array_equal(a["images"][0], a["images"][1])


def test_large_subject_ids_do_not_alias():
    a = gen(1, first_subject=5)["images"][0]
    b = gen(1, first_subject=5 + (1 << 24))["images"][0]
    assert not np.array_equal(a, b)


def test_value_ranges_and_anatomy():
    d = gen(6, size=128, seed=3)
    img, org = d["images"], d["organ_labels"]
    assert org.max() <= 5
    for i in range(len(img)):
        x, o = img[i].astype(np.float64), org[i]
        assert x.std() > 20 and x.min() < 60 and x.max() > 180
        for lab in range(6):
            assert (o == lab).sum() > 0, f"organ label {lab} missing in image {i}"
        lung, bg = x[o == 1].mean(), x[o == 0].mean()
        heart, soft, abd = x[o == 2].mean(), x[o == 5].mean(), x[o == 4].mean()
        assert bg < lung < min(heart, soft, abd), (bg, lung, heart, soft, abd)
        assert heart - lung > 40
        # two lung fields, one on each side of the midline
        cols = np.nonzero(o == 1)[1]
        assert (cols < 64).sum() > 500 and (cols >= 64).sum() > 500
    assert not d["lesion_masks"].any() and not d["labels"].any()


@pytest.mark.parametrize("kind,code", [("nodule", 1), ("consolidation", 2), ("effusion", 3)])
def test_lesions_inside_lungs(kind, code):
    n = 5
    normal = gen(n, seed=2, first_subject=100)
    sick = gen(n, seed=2, first_subject=100, lesion=kind)
    assert (sick["labels"] == code).all()
    np.testing.assert_array_equal(sick["organ_labels"], normal["organ_labels"])
    for i in range(n):
        m = sick["lesion_masks"][i].astype(bool)
        lung = normal["organ_labels"][i] == 1
        assert m.sum() >= 4, f"{kind} mask empty for subject {100 + i}"
        assert set(np.unique(sick["lesion_masks"][i])) <= {0, 1}
        assert not (m & ~lung).any(), "lesion mask leaves the lung field"
        diff = sick["images"][i] != normal["images"][i]
        assert not (diff & ~lung).any(), "lesion changed pixels outside the lungs"
        gain = sick["images"][i][m].astype(float) - normal["images"][i][m].astype(float)
        assert gain.mean() > 15, f"{kind} lesion not brighter: {gain.mean()}"


def test_p_abnormal_and_random_kinds():
    d = gen(300, size=16, seed=5, lesion="random", p_abnormal=0.3)
    lab = d["labels"]
    frac = (lab > 0).mean()
    assert 0.2 < frac < 0.4
    assert set(np.unique(lab[lab > 0])) == {1, 2, 3}
    has_mask = d["lesion_masks"].reshape(300, -1).any(1)
    assert not has_mask[lab == 0].any()
    # p_abnormal with lesion=None draws random kinds; the decision is per subject
    e = gen(300, size=16, seed=5, p_abnormal=0.3)
    np.testing.assert_array_equal(e["labels"] > 0, lab > 0)
    f = gen(50, size=16, seed=5, lesion="effusion", p_abnormal=0.0)
    assert not f["labels"].any()


def test_edge_cases_and_errors():
    d = gen(0)
    assert d["images"].shape == (0, S, S) and d["labels"].shape == (0,)
    assert gen(1, size=8)["images"].shape == (1, 8, 8)
    with pytest.raises(ValueError, match="size"):
        gen(1, size=4)
    with pytest.raises(ValueError, match="n must"):
        gen(-1)
    with pytest.raises(ValueError, match="lesion"):
        gen(1, lesion="tumour")
    with pytest.raises(TypeError, match="lesion"):
        gen(1, lesion=3)
    with pytest.raises(ValueError, match="p_abnormal"):
        gen(1, lesion="nodule", p_abnormal=1.5)
    with pytest.raises(TypeError):
        phantom_dataset(2.0)


def test_python_wrapper_matches_binding():
    a = phantom_dataset(2, size=S, seed=4, first_subject=1, lesion="nodule")
    b = gen(2, seed=4, first_subject=1, lesion="nodule")
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
