"""The public Python API: lazy names, typed configurations that refuse mistakes, typed results,
injectable progress, and docs/api.md's example run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import geoexplora
from geoexplora.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_imports_nothing_heavy():
    code = (
        "import sys, geoexplora; geoexplora.PredictConfig; "
        "print(sorted(m for m in ('torch', 'rasterio', 'timm', 'lightning') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_every_public_name_resolves_and_all_lists_exactly_them():
    assert sorted(geoexplora.__all__) == sorted([*geoexplora._API, "__version__"])
    for name in geoexplora._API:
        assert getattr(geoexplora, name).__name__ == name
    with pytest.raises(AttributeError):
        geoexplora.no_such_verb  # noqa: B018


@pytest.mark.parametrize(
    "config,field",
    [
        (lambda: geoexplora.PredictConfig(model="m.pt", inputs="a.tif", output="o.tif"), "inputs"),
        (
            lambda: geoexplora.EmbedConfig(model="m.pt", inputs=Path("a.tif"), output="o.tif"),
            "inputs",
        ),
        (lambda: geoexplora.ProbeConfig(models="m.pt", chips=Path("c")), "models"),
        (lambda: geoexplora.AdaptConfig(inputs="scenes/", output=Path("a.pt")), "inputs"),
    ],
)
def test_a_single_path_where_a_list_is_expected_is_refused(config, field):
    with pytest.raises(UserError) as info:
        config()
    assert info.value.option == field and "pass [" in str(info.value)


def test_modes_are_checked_against_their_literal_types():
    with pytest.raises(UserError) as info:
        geoexplora.PredictConfig(model="m.pt", inputs=["a.tif"], output="o.tif", blend="linear")
    assert str(info.value) == "blend: must be one of cosine, hann, none, not 'linear'"
    with pytest.raises(UserError, match="prob_dtype: must be one of float32, uint8"):
        geoexplora.PredictConfig(model="m.pt", inputs=["a.tif"], output="o.tif", prob_dtype="int8")
    with pytest.raises(UserError, match="objective: must be one of dinov2, mae"):
        geoexplora.AdaptConfig(inputs=["a.tif"], output=Path("a.pt"), objective="simclr")


def test_scene_options_may_be_a_dict_of_their_fields():
    cfg = geoexplora.PredictConfig(
        model="m.pt", inputs=["a.tif"], output="o.tif", scene={"nodata": 0}
    )
    assert isinstance(cfg.scene, geoexplora.SceneOptions) and cfg.scene.nodata == 0
    with pytest.raises(UserError, match="scene: unknown scene option"):
        geoexplora.PredictConfig(
            model="m.pt", inputs=["a.tif"], output="o.tif", scene={"no_data": 0}
        )


def test_an_open_scene_is_a_context_manager_that_closes_its_files():
    from geoexplora.sample import s2_tile_crop

    with geoexplora.open_scene([s2_tile_crop()], geoexplora.SceneOptions()) as scene:
        scene.read(None)
        assert scene._handles
    assert scene._handles == {}


def test_predict_closes_the_scenes_it_opens_and_leaves_the_callers_open(tmp_path, monkeypatch):
    from factories import make_model

    from geoexplora.io.scene import Scene
    from geoexplora.sample import s2_tile_crop

    model = make_model(tmp_path / "m.pt", bands=("sentinel2:B2", "sentinel2:B3", "sentinel2:B4"))
    closed = []
    original = Scene.close
    monkeypatch.setattr(Scene, "close", lambda self: (closed.append(self), original(self)))
    opts = {"bands": ["B2", "B3", "B4"]}
    geoexplora.predict(
        geoexplora.PredictConfig(
            model, [s2_tile_crop()], tmp_path / "a.tif", scene=opts, progress=False
        )
    )
    assert len(closed) == 1  # the scene predict opened from the path
    with geoexplora.open_scene([s2_tile_crop()], geoexplora.SceneOptions(**opts)) as scene:
        geoexplora.predict(
            geoexplora.PredictConfig(model, [scene], tmp_path / "b.tif", progress=False)
        )
        assert scene not in closed and scene.read(None).shape[1] == 3  # still the caller's


def test_progress_goes_to_a_callback_or_nowhere():
    from geoexplora.log import make_progress, reports_progress

    events = []

    @reports_progress
    def verb(cfg):
        with make_progress() as progress:
            task = progress.add_task("work", total=3, info="")
            for _ in range(3):
                progress.advance(task)
        return progress

    class Cfg:
        progress = events.append

    verb(Cfg())
    assert [(e.description, e.completed, e.total) for e in events] == [
        ("work", 0, 3),
        ("work", 1, 3),
        ("work", 2, 3),
        ("work", 3, 3),
    ]

    class Quiet:
        progress = False

    assert verb(Quiet()).disable is True


def api_example() -> str:
    text = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    [block] = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    return block


@pytest.mark.slow
def test_the_documented_pipeline_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(api_example(), "docs/api.md", "exec"), {})  # noqa: S102 (our own docs)
    out = capsys.readouterr().out
    assert "chips:" in out and "prediction: complete" in out
    assert (tmp_path / "api-demo" / "prediction.tif").exists()
