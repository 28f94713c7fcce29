"""The inference engine on its own: window plans, blending weights, seams, nodata, streaming.

The model here is a plain translation-equivariant callable (a fixed 3x3 convolution), so the
blended windowed prediction can be compared with one forward over the whole image.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from geoexplora.inference import engine
from geoexplora.inference.windows import WindowPlan, axis_starts, blend_weights, taper
from geoexplora.io.scene import Scene, SceneOptions, open_scene
from geoexplora.sample import s2_tile_crop


def conv_forward(channels_in: int, k: int = 3, seed: int = 0):
    """A fixed 3x3 conv over (dates x bands), NaN -> 0: translation-equivariant."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(k, channels_in, 3, 3, generator=g) / 1000.0

    def forward(x):
        b, t, c, h, w = x.shape
        z = torch.nan_to_num(x.reshape(b, t * c, h, w), nan=0.0)
        return torch.nn.functional.conv2d(z, weight, padding=1)

    return forward


@pytest.fixture(scope="module")
def scene() -> Scene:
    """The bundled real Sentinel-2 L2A crop (256 x 256, 12 bands), 4 bands kept."""
    return open_scene([s2_tile_crop()], SceneOptions(bands=["B2", "B3", "B4", "B8"]))


def blended(scene, plan, forward, k, blend="cosine", **kw):
    strips = list(
        engine.run(
            scene, plan, [(forward, torch.device("cpu"))], k, blend=blend, batch_size=4, **kw
        )
    )
    values = np.concatenate([s.values for s in strips], axis=1)
    weight = np.concatenate([s.weight for s in strips], axis=0)
    return values / np.where(weight > 0, weight, 1), weight, strips


def test_axis_starts_cover_the_raster_and_end_at_its_edge():
    assert axis_starts(256, 64, 48, 1) == [0, 48, 96, 144, 192]
    assert axis_starts(250, 64, 48, 1) == [0, 48, 96, 144, 186]
    assert axis_starts(40, 64, 48, 1) == [0]  # smaller than a window: one padded window
    assert axis_starts(250, 56, 42, 14) == [0, 42, 84, 126, 168, 196]  # patch multiples


def test_cosine_weights_of_neighbouring_windows_sum_to_one_in_the_overlap():
    w = taper(64, "cosine", 16)
    overlap = w[-16:] + w[:16]
    np.testing.assert_allclose(overlap, 1.0, atol=1e-6)
    assert w.min() > 0 and w[16:48].min() == 1.0


def test_hann_and_none_weights():
    assert taper(8, "none", 4).tolist() == [1.0] * 8
    h = taper(64, "hann", 16)
    assert h.min() > 0 and h.argmax() in (31, 32)


def test_grid_plan_centres_windows_on_stride_cells():
    plan = WindowPlan.grid(100, 130, window=32, overlap=8)
    assert plan.stride == 24 and plan.factor == 24
    assert (plan.out_height, plan.out_width) == (5, 6)
    first = next(plan.tiles())
    assert (first.row, first.col, first.out_row, first.out_col) == (-4, -4, 0, 0)
    assert blend_weights(plan, "cosine").shape == (1, 1)


@pytest.mark.parametrize("overlap", [16, 24, 32])
@pytest.mark.parametrize("blend", ["cosine", "hann"])
def test_blended_windows_equal_one_whole_image_forward(scene, overlap, blend):
    forward = conv_forward(4)
    whole = forward(torch.from_numpy(scene.read()[None]))[0].numpy()
    plan = WindowPlan.dense(scene.height, scene.width, 64, overlap)
    values, weight, _ = blended(scene, plan, forward, 3, blend=blend)
    assert (weight > 0).all()
    inner = (slice(None), slice(2, -2), slice(2, -2))  # away from the raster edge
    scale = np.abs(whole[inner]).mean()
    assert np.abs(values[inner] - whole[inner]).max() < 0.02 * scale


def test_without_overlap_window_borders_show_seams(scene):
    """The control for the test above: windows side by side differ from the whole-image
    forward along their borders, where the conv sees zero padding instead of neighbours."""
    forward = conv_forward(4)
    whole = forward(torch.from_numpy(scene.read()[None]))[0].numpy()
    plan = WindowPlan.dense(scene.height, scene.width, 64, 0)
    values, _, _ = blended(scene, plan, forward, 3, blend="none")
    scale = np.abs(whole).mean()
    assert np.abs(values[:, 63, 2:-2] - whole[:, 63, 2:-2]).max() > 0.05 * scale


def test_nodata_pixels_get_no_weight_and_empty_windows_are_skipped(scene):
    class Holed:
        """The scene with a NaN block covering whole windows and part of others."""

        def __init__(self, base):
            self.base = base
            self.width, self.height, self.dates, self.bands = (
                base.width,
                base.height,
                base.dates,
                base.bands,
            )

        def read(self, window):
            data = self.base.read(window).copy()
            rows = np.arange(int(window.row_off), int(window.row_off) + int(window.height))
            data[:, :, rows < 150, :] = np.nan
            return data

    plan = WindowPlan.dense(scene.height, scene.width, 64, 16)
    timings = engine.Timings()
    _, weight, _ = blended(Holed(scene), plan, conv_forward(4), 3, timings=timings)
    assert (weight[:150] == 0).all() and (weight[150:] > 0).all()
    assert timings.skipped == 10 and timings.windows == len(plan) - 10  # two window rows of 5


def test_strips_come_in_order_cover_each_row_once_and_stay_window_sized(scene):
    plan = WindowPlan.dense(scene.height, scene.width, 64, 16)
    _, _, strips = blended(scene, plan, conv_forward(4), 3)
    rows = [s.row for s in strips]
    assert rows == sorted(rows) and rows[0] == 0
    assert sum(s.weight.shape[0] for s in strips) == scene.height
    assert max(s.weight.shape[0] for s in strips) <= plan.window


def test_a_row_range_equals_the_same_rows_of_the_full_run(scene):
    plan = WindowPlan.dense(scene.height, scene.width, 64, 16)
    full, _, _ = blended(scene, plan, conv_forward(4), 3)
    part, _, strips = blended(scene, plan, conv_forward(4), 3, out_rows=(100, 180))
    assert strips[0].row == 100 and part.shape[1] == 80
    np.testing.assert_array_equal(part, full[:, 100:180])


def test_patch_factor_output_is_at_patch_resolution(scene):
    def patch_mean(x):  # (B,T,C,H,W) -> (B,C,H/16,W/16)
        z = torch.nan_to_num(x[:, 0], nan=0.0)
        return torch.nn.functional.avg_pool2d(z, 16)

    plan = WindowPlan.dense(scene.height, scene.width, 64, 16, factor=16)
    values, weight, _ = blended(scene, plan, patch_mean, 4)
    assert values.shape == (4, 16, 16) and (weight > 0).all()
    expected = patch_mean(torch.from_numpy(scene.read()[None]))[0].numpy()
    np.testing.assert_allclose(values, expected, rtol=1e-5)


def test_a_failing_model_stops_the_run_with_its_error(scene):
    def broken(x):
        raise RuntimeError("model exploded")

    plan = WindowPlan.dense(scene.height, scene.width, 64, 16)
    with pytest.raises(RuntimeError, match="model exploded"):
        list(engine.run(scene, plan, [(broken, torch.device("cpu"))], 3))
