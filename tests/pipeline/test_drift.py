import re

import numpy as np
import pandas as pd
import pytest

from pipeline import drift


def _compare(ref_texts, cur_texts, ref_labels=None, cur_labels=None, bars=(0.2, 0.2, 0.2)):
    labels = (pd.Series(ref_labels), pd.Series(cur_labels)) if ref_labels is not None else (None, None)
    return drift.compare(pd.Series(ref_texts, dtype=object), pd.Series(cur_texts, dtype=object), *labels, *bars)


def test_words_are_letter_runs_and_single_cjk_characters_without_numbers():
    assert drift.words("Where is ORDER #A12? 我的订单  ready") == [
        "where",
        "is",
        "order",
        "a",
        "我",
        "的",
        "订",
        "单",
        "ready",
    ]
    assert drift.words("Ｆｕｌｌｗｉｄｔｈ") == ["fullwidth"]  # normalised like collect's duplicate detection


def test_psi_is_zero_for_equal_shares_and_grows_with_the_shift():
    same, _ = drift.psi(pd.Series(list("aabb")), pd.Series(list("ab")))
    small, _ = drift.psi(pd.Series(list("ab") * 50), pd.Series(["a"] * 55 + ["b"] * 45))
    large, shares = drift.psi(pd.Series(list("ab") * 50), pd.Series(["a"] * 90 + ["c"] * 10))
    assert same == 0 and 0 < small < 0.1 < 0.25 < large
    assert shares == {
        "a": {"reference": 0.5, "current": 0.9},
        "b": {"reference": 0.5, "current": 0.0},
        "c": {"reference": 0.0, "current": 0.1},
    }
    # By hand: (0.55-0.5)ln(0.55/0.5) + (0.45-0.5)ln(0.45/0.5)
    assert small == pytest.approx(0.05 * np.log(1.1) - 0.05 * np.log(0.9))


def test_compare_flags_each_measure_against_its_bar():
    ref = [f"my order {i} has not arrived" for i in range(200)]
    cur = [f"my order {i} has not arrived" for i in range(150)] + ["the parcel came damaged, broken box"] * 50
    report = _compare(ref, cur, ["late"] * 200, ["late"] * 150 + ["damaged"] * 50)
    checks = {c["check"]: c for c in report["checks"]}
    assert checks["drift_label_psi"]["passed"] is False and checks["drift_label_psi"]["value"] > 1
    # 50 of the 200 current rows are 35 characters long instead of 24-26: the largest CDF gap is 0.25.
    assert checks["drift_length_ks"]["value"] == pytest.approx(0.25)
    assert checks["drift_length_ks"]["passed"] is False
    # 6 new words of 6 in each of 50 rows, against 5 known words in each of 150.
    assert checks["drift_oov_rate"]["value"] == pytest.approx(300 / (300 + 750))
    assert checks["drift_oov_rate"]["rows"] == 50 and checks["drift_oov_rate"]["example_rows"] == [
        150,
        151,
        152,
        153,
        154,
    ]
    assert report["top_oov_words"][0] == ("the", 50)  # ties keep first-seen order
    assert report["rows"] == {"reference": 200, "current": 200}


def test_identical_data_has_no_drift_and_chat_data_no_label_measure():
    texts = ["hello there", "where is my parcel", "refund please"] * 10
    report = _compare(texts, texts)
    assert [c["check"] for c in report["checks"]] == ["drift_length_ks", "drift_oov_rate"]
    assert all(c["passed"] and c["value"] == 0 for c in report["checks"])


def test_length_histogram_shares_bins_and_keeps_outliers_in_the_last_bin():
    hist = drift.length_histogram(np.array([10] * 99 + [100_000]), np.array([20] * 100))
    assert len(hist["edges"]) == drift.LENGTH_BINS + 1 and hist["edges"][-1] < 100_000
    assert sum(hist["reference"]) == pytest.approx(1) and sum(hist["current"]) == pytest.approx(1)
    assert hist["reference"][-1] == pytest.approx(0.01)  # the 100k-character row, clipped into the last bin


def test_the_html_report_is_self_contained_and_draws_both_sides():
    ref = ["short text"] * 40 + ["a somewhat longer text here"] * 10
    cur = ["short text"] * 10 + ["an unseen vocabulary item appears"] * 40
    report = _compare(ref, cur, ["x"] * 40 + ["y"] * 10, ["x"] * 10 + ["y<b>"] * 40)
    page = drift.render_html(report, "Drift of <cur> from <ref>")
    assert not re.search(r"<script|<link|\bsrc=|\bhref=|@import|url\(", page)
    assert "Drift of &lt;cur&gt; from &lt;ref&gt;" in page and "y&lt;b&gt;" in page  # escaped, not markup
    # One reference and one current bar per label (3) and per length bin.
    assert page.count("class='ref'") == page.count("class='cur'") == 3 + drift.LENGTH_BINS
    assert "unseen" in page and "vocabulary" in page and "80.0%" in page  # top OOV words, current share of y<b>
