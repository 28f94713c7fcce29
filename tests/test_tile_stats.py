"""robust_band_stats: per-band statistics over valid pixels (geoexplora/io/stats.py)."""

import numpy as np
import pytest

from geoexplora.errors import UserError
from geoexplora.io.stats import robust_band_stats


def _sample():
    rng = np.random.default_rng(0)
    x = rng.normal([1000.0, 3000.0], [100.0, 400.0], size=(20_000, 2)).astype(np.float32)
    x[::4, 1] = np.nan  # band 2 has nodata where band 1 is valid
    return x


def test_statistics_ignore_nan_per_band():
    x = _sample()
    stats = robust_band_stats(x)
    for c in range(2):
        valid = x[:, c][np.isfinite(x[:, c])].astype(np.float64)
        assert stats["mean"][c] == pytest.approx(valid.mean(), rel=1e-9)
        assert stats["std"][c] == pytest.approx(valid.std(), rel=1e-6)
        assert stats["p2"][c] == pytest.approx(np.percentile(valid, 2), rel=1e-6)
        assert stats["p98"][c] == pytest.approx(np.percentile(valid, 98), rel=1e-6)


def test_streamed_chunks_give_the_same_moments_as_one_array():
    x = _sample()
    whole = robust_band_stats(x)
    streamed = robust_band_stats(iter(np.array_split(x, 9)))
    assert streamed["mean"] == pytest.approx(whole["mean"], rel=1e-9)
    assert streamed["std"] == pytest.approx(whole["std"], rel=1e-9)


def test_percentiles_from_a_bounded_reservoir_stay_close():
    x = _sample()
    exact = robust_band_stats(x)
    sampled = robust_band_stats(iter(np.array_split(x, 5)), max_samples=5_000)
    assert sampled["p2"] == pytest.approx(exact["p2"], rel=0.02)
    assert sampled["p98"] == pytest.approx(exact["p98"], rel=0.02)


def test_a_band_without_valid_pixels_is_an_error():
    x = np.ones((10, 3), dtype=np.float32)
    x[:, 2] = np.nan
    with pytest.raises(UserError, match="band"):
        robust_band_stats(x)
