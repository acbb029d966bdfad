"""`afire evaluate anomaly --score NAME`: the headline score is selectable, every score and
the baselines are written to results.json with the protocol actually used."""
import json

import pytest

from afire import AFiRe, Config
from afire.cli import main
from afire.evaluate.anomaly import DEFAULT_SCORE
from afire.model import ANOMALY_SCORES


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("anomaly_cli")
    root = tmp / "ph"
    assert main(["prepare", "160", str(root), "--format", "phantom", "--size", "32",
                 "--p-abnormal", "0.5", "--quiet", "--workers", "1"]) == 0
    ck = tmp / "ck.safetensors"
    AFiRe(Config.preset_config("test", img_size=32, batch_size=8), steps_per_epoch=2).save(ck)
    return tmp, root, ck


def run(setup, name, *extra):
    tmp, root, ck = setup
    out = tmp / name
    assert main(["evaluate", "anomaly", "--checkpoint", str(ck), "--data", str(root),
                 "--adapt-steps", "1", "--batch", "8", "--no-figures", "--out", str(out),
                 *extra]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("score", ["eq51", "inpaint_ratio_z", None])
def test_score_choice_is_recorded(setup, score):
    r = run(setup, f"s-{score}", *(["--score", score] if score else []))
    want = score or DEFAULT_SCORE
    m = r["metrics"]
    assert r["settings"]["score"] == m["score"] == want
    assert m["score_in_paper"] == (want == "eq51")
    assert m["auc"] == pytest.approx(m["scores"][want]["auc"])
    assert set(m["scores"]) == set(ANOMALY_SCORES) == set(r["settings"]["scores"])
    assert set(m["baselines"]) == {"blur", "image_std", "pixel_pca"}
    ref = r["settings"]["reference"]
    assert ref["normal_images"] == r["counts"]["adapt_normal"]
    assert {"inpaint_stride", "knn_k", "shrinkage"} <= set(ref)
    assert want in r["description"]


def test_unknown_score_is_refused(setup, capsys):
    tmp, root, ck = setup
    with pytest.raises(SystemExit):
        main(["evaluate", "anomaly", "--checkpoint", str(ck), "--data", str(root),
              "--score", "blur"])
    assert "invalid choice" in capsys.readouterr().err
