"""The learning-curve mode's bookkeeping (issue 22) on made-up points: resume keys, copies between the
tables, the stopping rule, the crossings and the report. The training itself is smoke-tested by hand at a
tiny budget (the command is in benchmarks/replicate_curves.py); it takes minutes, too long for CI."""

from __future__ import annotations

from benchmarks import replicate_curves as rc
from benchmarks.replicate_report import crossings, curve_points, write_curves_report


def _point(exp, method, seed, step, fid):
    return {"exp": exp, "method": method, "seed": seed, "step": step, "metrics": {"fid": fid},
            "train_s": 2.0 * step, "eval_s": 1.0}


def _results():
    pts = [_point("table2_digits", "teacher", s, 0, 6.0 + s) for s in range(2)]
    for s in range(2):
        for step, (free, dkdm, based) in zip((10, 20, 30), ((90, 80, 100), (60, 65, 50), (40, 35, 13))):
            pts += [_point("table2_digits", "data_free", s, step, free + s), _point("table2_digits", "dkdm", s, step, dkdm),
                    _point("table2_digits", "data_based", s, step, based)]
    return {"points": pts, "eval_every": 10, "steps": 20, "max_steps": 30, "jobs": 2, "cpu_count": 2,
            "budget": {"seeds": 2, "digits_eval": 32, "digits_chain": "10", "sample_steps": "10"}}


def test_methods_and_their_parts():
    assert rc.methods_of("table2_digits")[0] == "teacher" and rc.methods_of("table2_digits")[-1] == "dkdm"
    assert len(rc.methods_of("table2_digits")) == 8 and len(rc.methods_of("table5_cross")) == 10
    assert rc.split_method("table5_cross", "ViTS_CNNT_data_free") == ("CNN", "ViT", "data_free")
    assert rc.split_method("table5_cross", "teacher_ViT") == ("ViT", None, "teacher")
    assert rc.split_method("table2_digits", "data_limited_5") == ("CNN", "CNN", "data_limited_5")


def test_table5_cnn_on_cnn_points_are_copied_from_table2_once():
    results = {"points": [_point("table2_digits", "dkdm", 0, 10, 50.0), _point("table2_digits", "data_based", 0, 10, 9.0)]}
    copies = {src: dst for dst, src in rc.SAME_AS.items()}
    done = {rc.key(p) for p in results["points"]}
    for p in list(results["points"]):
        rc.add_copy(results, p, copies, done)
    rc.add_copy(results, results["points"][0], copies, {rc.key(p) for p in results["points"]})   # already there
    copied = [p for p in results["points"] if "copy_of" in p]
    assert [(p["exp"], p["method"], p["copy_of"]) for p in copied] == [
        ("table5_cross", "CNNS_CNNT_dkdm", "table2_digits/dkdm")]


def test_the_curves_stop_when_data_based_is_within_2x_of_the_teacher():
    r = _results()      # teacher mean 6.5: data-based 50 at step 20 (no), 13 at step 30 (yes)
    assert not rc.converged(r, 20) and rc.converged(r, 30)
    assert rc.converged({"points": []}, 20)        # no Table 2: nothing to wait for


def test_crossings_and_report(tmp_path):
    r = _results()
    curves = curve_points(r, "table2_digits")
    assert list(curves) == ["teacher", "data_based", "data_free", "dkdm"]
    assert curves["data_free"][10] == [90, 91]
    text = crossings(curves, "dkdm", "data_free")
    assert "cross between 10 and 20" in text and "between 20 and 30" in text
    assert "below" in crossings(curves, "data_based", "dkdm") and crossings(curves, "dkdm", "nothing") is None
    path = write_curves_report(r, tmp_path)
    md = path.read_text()
    assert (tmp_path / "replication" / "curves_table2_digits.png").stat().st_size > 1000
    assert "replication/curves_table2_digits.png" in md and "| Data-Free Training (0%) | 30 | 40.50 ± 0.71 |" in md
    assert "table5" not in md.split("## Measured cost")[0].lower().replace("table 5", "")
