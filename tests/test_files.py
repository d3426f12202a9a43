import pytest

from pneumo_data.common.files import replacing, write_text


def test_write_text_replaces_whole_file(tmp_path):
    path = write_text(tmp_path / "sub" / "report.json", "new\n")
    assert path.read_text() == "new\n"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_failure_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "figure.png"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with replacing(path) as tmp:
            assert tmp.name == "figure.partial.png"  # the extension is kept
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["figure.png"]
