"""Library errors carry option names as data; the CLI renders them as flags."""

import pickle

import pytest

from geoexplora.errors import RuntimeFailure, UserError, cli_flag, opt


def test_an_option_error_names_the_field_in_python_and_the_flag_on_the_command_line():
    err = UserError("must be at least 1", option="batch_size")
    assert str(err) == "batch_size: must be at least 1"
    assert err.render(cli_flag) == "--batch-size: must be at least 1"
    assert err.option == "batch_size"


def test_options_marked_inside_a_message_are_rendered_by_the_caller():
    err = UserError(f"{opt('window')} (100) and {opt('overlap')} (28) must be multiples of 14")
    assert str(err) == "window (100) and overlap (28) must be multiples of 14"
    assert err.render(cli_flag) == "--window (100) and --overlap (28) must be multiples of 14"
    assert (
        RuntimeFailure(f"free space, then use {opt('resume')}").render(cli_flag)
        == "free space, then use --resume"
    )


def test_errors_keep_their_option_across_processes():
    err = pickle.loads(pickle.dumps(UserError("bad", option="crop_size")))
    assert (type(err), err.option, str(err)) == (UserError, "crop_size", "crop_size: bad")


def test_a_window_plan_error_names_the_option_without_speaking_cli():
    from geoexplora.inference.windows import WindowPlan

    with pytest.raises(UserError) as info:
        WindowPlan.dense(100, 100, 56, 56, factor=14)
    assert info.value.option == "overlap" and "--" not in str(info.value)


def test_the_cli_prints_the_flag(capsys):
    from geoexplora.cli import main

    assert main(["predict", "nothing.pt", "nothing.tif", "-o", "x.tif", "--shard", "3"]) == 2
    assert (
        capsys.readouterr().err.strip().splitlines()[-1]
        == "geoexplora: error: --shard: '3' is not I/N (e.g. 1/4)"
    )


def test_an_error_that_names_options_in_its_text_carries_the_first_as_data():
    err = UserError(f"{opt('label_field')} crop: not a field of fields.gpkg")
    assert (
        err.option == "label_field" and str(err) == "label_field crop: not a field of fields.gpkg"
    )
    assert (
        pickle.loads(pickle.dumps(err)).render(cli_flag)
        == "--label-field crop: not a field of fields.gpkg"
    )
