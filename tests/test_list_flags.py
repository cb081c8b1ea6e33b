"""Comma-list flags refuse an empty item (`0.5,,0.75` is a typo, not two widths) with one `error:` line and
exit 2, in every script; a folder given where a data file is expected is bad input (exit 2) as well."""

from __future__ import annotations

import pytest

import reproduce
import run_glue
import train_gate
import utils_glue
from cli import run_cli


@pytest.mark.parametrize("parse, flag, value", [
    (run_glue.parse_args, "--width_mult_list", "0.5,,0.75"),
    (run_glue.parse_args, "--depth_mult_list", "0.5,1.0,"),
    (train_gate.parse_args, "--gate_setting", ",0.5,1.0"),
    (train_gate.parse_args, "--off_ramps", "1,,2"),
    (reproduce.parse_args, "--seeds", "1,,2"),
])
def test_an_empty_list_item_is_refused(parse, flag, value, capsys):
    with pytest.raises(SystemExit) as info:
        parse([flag, value])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: argument {flag}: '{value}' has an empty item")


def test_lists_without_empty_items_still_parse():
    args = run_glue.parse_args(["--width_mult_list", "0.5, 0.75", "--depth_mult_list", "1.0"])
    assert args.width_mult_list == [0.5, 0.75] and args.depth_mult_list == [1.0]


def test_a_folder_for_a_glue_file_exits_2(tmp_path, capsys):
    (tmp_path / "dev.tsv").mkdir()
    with pytest.raises(SystemExit) as info:
        run_cli(lambda: utils_glue.get_examples("RTE", tmp_path, "dev"))
    assert info.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'dev.tsv'}: is a folder, not a data file"
