"""Series datasets: the .ts reader, UCR sets from the sktime wheel, normalisation, hashing, sines."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from difforge.core.errors import InvalidArgumentError, UnknownChoiceError
from difforge.data import DatasetError, SeriesDataset, load_dataset, load_sines, load_ucr
from difforge.data.timeseries import (
    normalize_series,
    read_series_csv,
    read_ts,
    resample,
    series_from_array,
)

needs_sktime = pytest.mark.skipif(
    importlib.util.find_spec("sktime") is None, reason="the signals extra (sktime) is not installed"
)

TS = """# a comment
@problemName Tiny
@timeStamps false
@missing false
@univariate false
@equalLength true
@classLabel true b a
@data
1,2,3,4:5,6,7,8:b
0,0,1,1:2,2,3,3:a
"""


def test_read_ts_channels_and_labels(tmp_path):
    (tmp_path / "t.ts").write_text(TS)
    x, labels = read_ts(tmp_path / "t.ts")
    assert x.shape == (2, 2, 4) and labels == ["b", "a"]
    np.testing.assert_array_equal(x[0, 1], [5, 6, 7, 8])
    (tmp_path / "m.ts").write_text(TS.replace("@missing false", "@missing true"))
    with pytest.raises(DatasetError, match="@missing"):
        read_ts(tmp_path / "m.ts")
    (tmp_path / "r.ts").write_text(TS.replace("0,0,1,1:", "0,0,1:"))
    with pytest.raises(DatasetError, match="differ in length"):
        read_ts(tmp_path / "r.ts")


def test_normalize_and_resample():
    rng = np.random.default_rng(0)
    x = 3.0 + 2.0 * rng.standard_normal((4, 2, 50))
    z = normalize_series(x, "series")
    np.testing.assert_allclose(z.mean(-1), 0, atol=1e-12)
    np.testing.assert_allclose(z.std(-1), 1, atol=1e-12)
    assert normalize_series(x, "none") is x
    with pytest.raises(UnknownChoiceError, match="series"):
        normalize_series(x, "minmax")
    line = np.linspace(0, 1, 7)[None, None]
    np.testing.assert_allclose(resample(line, 13)[0, 0], np.linspace(0, 1, 13), atol=1e-12)


def test_sines_are_deterministic_and_hashed():
    a, b = load_sines(64, 32, 3, seed=1), load_sines(64, 32, 3, seed=1)
    assert a.content_hash == b.content_hash and torch.equal(a.series, b.series)
    assert load_sines(64, 32, 3, seed=2).content_hash != a.content_hash
    assert a.series.shape == (64, 1, 32) and a.sample_shape == (1, 32)
    # class k has k + 1 periods: the dominant frequency bin of a clean-ish series is k + 1
    freq = np.abs(np.fft.rfft(a.series[:, 0].numpy(), axis=1)).argmax(1)
    np.testing.assert_array_equal(freq, a.labels.numpy() + 1)
    assert (
        load_dataset({"kind": "sines", "n": 64, "length": 32, "seed": 1}).content_hash
        == a.content_hash
    )
    with pytest.raises(InvalidArgumentError, match="length"):
        load_sines(length=1)


def test_series_dataset_checks_and_subset():
    with pytest.raises(InvalidArgumentError, match=r"float32 \(N, C, T\)"):
        SeriesDataset("bad", torch.zeros(3, 4), None, 0)
    d = load_sines(20, 16, 2)
    sub = d.subset(d.labels.numpy() == 1)
    assert len(sub) == int((d.labels == 1).sum()) and (sub.labels == 1).all()
    assert sub.content_hash != d.content_hash


def test_csv_round_trip(tmp_path):
    p = tmp_path / "s.csv"
    p.write_text("a,b,c,d\n1,2,3,4\n4,3,2,1\n")
    x = read_series_csv(p)
    assert x.shape == (2, 4)
    ds = series_from_array(x, "s", length=8)
    assert ds.series.shape == (2, 1, 8) and ds.normalize == "series"
    p.write_text("1,2,3\n1,x,3\n")
    with pytest.raises(DatasetError, match="not a CSV of numbers"):
        read_series_csv(tmp_path / "s.csv")


@needs_sktime
def test_ucr_gunpoint_splits_kept_apart():
    train, test = load_ucr("GunPoint", "train"), load_ucr("GunPoint", "test")
    assert train.series.shape == (50, 1, 150) and test.series.shape == (150, 1, 150)
    assert train.class_names == test.class_names == ("1", "2") and train.num_classes == 2
    assert train.content_hash != test.content_hash
    assert load_ucr("GunPoint", "train").content_hash == train.content_hash  # deterministic
    np.testing.assert_allclose(train.series.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(train.series.std(-1, correction=0), 1, atol=1e-4)
    raw = load_ucr("GunPoint", "train", normalize="none")
    assert raw.content_hash != train.content_hash and raw.normalize == "none"
    short = load_ucr("GunPoint", "test", length=128)
    assert short.series.shape == (150, 1, 128)
    torch.testing.assert_close(short.labels, test.labels)


@needs_sktime
def test_ucr_errors_list_the_choices():
    with pytest.raises(UnknownChoiceError, match="GunPoint"):
        load_ucr("ECG200")
    with pytest.raises(UnknownChoiceError, match="train"):
        load_ucr("GunPoint", "val")
