"""How afire's objects show in Jupyter (``_repr_html_``) and as text, figures returned as
matplotlib Figures, and the progress bars of the evaluation protocols."""
import io
import json

import numpy as np
import pytest
from _util import small_cfg

from afire import AFiRe, Config, _C, pretrain
from afire.cli import main
from afire.data import phantom_dataset
from afire.display import EvalResults, PretrainSummary, flat_rows, fmt
from afire.evaluate import anomaly, finetune, linear_probe

needs_c = pytest.mark.skipif(not hasattr(getattr(_C, "downstream", None), "linear_probe_fit"),
                             reason="afire._C.downstream kernels not in this build")


@pytest.fixture(scope="module")
def model():
    return AFiRe(small_cfg(batch_size=8), steps_per_epoch=5)


@pytest.fixture(scope="module")
def phantom():
    d = phantom_dataset(48, size=32, seed=3, p_abnormal=0.5)
    d["groups"] = np.repeat(np.arange(24), 2).astype(str)
    return d


def test_config_html_marks_the_overrides_and_escapes():
    cfg = Config.preset_config("test", img_size=64, extra={"note": "<script>x</script>"})
    h = cfg._repr_html_()
    assert "preset test: 64 px, patch 8" in h
    assert "<td><b>img_size</b></td><td><b>64</b></td>" in h        # differs from the preset
    assert "<td>patch_size</td><td>8</td>" in h                     # the preset's own value
    assert "<script>" not in h and "&lt;script&gt;" in h
    assert repr(cfg).startswith("Config(preset='test'")             # the plain-text form


def test_model_repr_and_html(model):
    n = model.parameter_counts()
    assert set(n) == {"encoder", "head", "decoder"} and all(v > 0 for v in n.values())
    assert n["encoder"] == sum(v.size for k, v in model.state_tensors().items()
                               if k.startswith("student.encoder."))
    r = repr(model)
    assert r.startswith("AFiRe(preset='test'") and f"parameters={sum(n.values())}" in r
    assert "step=0" in r and "device='cpu'" in r
    h = model._repr_html_()
    assert f"{sum(n.values()):,}" in h and "<td>device</td><td>cpu</td>" in h


def test_fmt_and_flat_rows():
    assert fmt(0.123456789) == "0.1235" and fmt(float("nan")) == "n/a" and fmt(None) == "n/a"
    assert fmt({"mean": 0.9, "std": 0.01, "n": 5}) == "0.9 ± 0.01 (n=5)"
    assert fmt(3) == "3" and fmt(True) == "True" and fmt([1, 2.5]) == "[1, 2.5]"
    rows = flat_rows({"auc": 0.5, "squid": {"acc": 0.75, "threshold": 1.5},
                      "m": {"mean": 1.0, "std": 0.0, "n": 2}})
    assert rows == [("auc", "0.5"), ("squid / acc", "0.75"), ("squid / threshold", "1.5"),
                    ("m", "1 ± 0 (n=2)")]


def test_results_stay_dicts_and_render(model, phantom, tmp_path, capsys):
    r = anomaly(model, phantom, adapt_steps=2, batch=8, out=tmp_path, figures=False)
    assert isinstance(r, EvalResults) and isinstance(r, dict)
    assert r["metrics"]["squid"]["acc"] >= 0 and "arrays" in r and "model" in r
    # the JSON on disk is the same as before: a plain object
    assert json.loads((tmp_path / "results.json").read_text())["protocol"] == "anomaly"
    h = r._repr_html_()
    assert "<b>anomaly</b>" in h and "squid / threshold" in h and "val_threshold / acc" in h
    assert "SQUID protocol (threshold chosen on test)" in h        # what the numbers mean
    assert "adapt_steps" in h and "<td>test</td>" in h
    assert "test_log_score" not in h                                # arrays stay out
    t = repr(r)
    assert t.startswith("EvalResults(anomaly)") and "auc" in t and len(t) < 3000
    # the adaptation's progress bar went to stderr (not a terminal: one line per redraw)
    err = capsys.readouterr().err
    assert "evaluate anomaly: adapt: 100%|" in err and "2/2" in err and "loss" in err


def test_progress_off_prints_nothing(model, phantom, capsys):
    anomaly(model, phantom, adapt_steps=2, batch=8, progress=False)
    assert "evaluate anomaly" not in capsys.readouterr().err


@needs_c
@pytest.mark.filterwarnings("ignore:validation score is NaN")
def test_linear_probe_and_finetune_bars(model, phantom, capsys):
    r = linear_probe(model, phantom, folds=2, epochs=5)
    err = capsys.readouterr().err
    assert isinstance(r, EvalResults) and "mean_auc" in repr(r)
    assert "evaluate linear-probe: features: 100%|" in err and "48/48" in err
    finetune(model, phantom, folds=2, epochs=2, batch=8, patience=1)
    err = capsys.readouterr().err
    # 2 folds x 2 epochs; early-stopped epochs are counted as done
    assert "evaluate finetune: 100%|" in err and "4/4" in err


def test_cli_evaluate_quiet(model, tmp_path, capsys):
    ck = tmp_path / "ck.safetensors"
    model.save(ck)
    assert main(["prepare", "60", str(tmp_path / "ph"), "--format", "phantom", "--size", "32",
                 "--p-abnormal", "0.5", "--quiet", "--workers", "1"]) == 0
    args = ["evaluate", "anomaly", "--checkpoint", str(ck), "--data", str(tmp_path / "ph"),
            "--adapt-steps", "2", "--batch", "8", "--no-figures", "--overwrite"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    assert "evaluate anomaly: adapt" in capsys.readouterr().err
    assert main(args + ["--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert "evaluate anomaly: adapt" not in capsys.readouterr().err


def test_pretrain_summary_is_a_dict_with_a_table(tmp_path):
    s = pretrain(small_cfg(img_size=32, batch_size=4), data=8, out=str(tmp_path / "run"),
                 max_steps=2, report=False, progress=False, stream=io.StringIO())
    assert isinstance(s, PretrainSummary) and s["steps"] == 2 and s["stopped"] == "max_steps"
    h = s._repr_html_()
    assert "<td>steps</td><td>2/4 (max_steps), 2 this run</td>" in h
    assert "final losses (step 1)" in h and "last.safetensors" in h
    assert repr(s).startswith("PretrainSummary\n") and "final losses" in repr(s)


def test_figures_return_matplotlib_figures(tmp_path):
    pytest.importorskip("matplotlib")
    from matplotlib.figure import Figure

    from afire.evaluate import figures as F

    x = phantom_dataset(3, size=32, seed=0)["images"]
    maps = np.random.default_rng(0).random((3, 4, 4))
    fig = F.overlay_figure(x, maps)                     # no path: a Figure, no file
    assert isinstance(fig, Figure) and not list(tmp_path.iterdir())
    fig = F.roc_figure({"a": (np.array([0, 0.5, 1]), np.array([0, 0.8, 1]), 0.7)},
                       tmp_path / "roc.png", return_figure=True)
    assert isinstance(fig, Figure) and (tmp_path / "roc.png").stat().st_size > 1000
    assert F.grid_figure({"x": x}, tmp_path / "g.png") == str(tmp_path / "g.png")
    # figures are made outside pyplot: nothing left open there, its backend untouched
    import matplotlib.pyplot as plt

    assert plt.get_fignums() == []
