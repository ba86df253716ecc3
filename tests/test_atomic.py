"""cpt_jax.atomic: outputs get the permissions an ordinary open() gives under the umask, and
a failed write leaves the previous file and no temp file."""

import os

import pytest

from cpt_jax import atomic


@pytest.fixture
def umask():
    """Sets the process umask for one test and restores it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_files_honour_the_umask(tmp_path, umask, mask):
    umask(mask)
    out = tmp_path / "results.json"
    atomic.write_json(str(out), {"a": 1})
    with open(tmp_path / "plain.txt", "w") as f:  # the reference: an ordinary open()
        f.write("x")
    mode = out.stat().st_mode & 0o777
    assert mode == 0o666 & ~mask == (tmp_path / "plain.txt").stat().st_mode & 0o777
    atomic.write_text(str(out), "replaced")  # replacing keeps the umask's mode too
    assert out.stat().st_mode & 0o777 == 0o666 & ~mask and out.read_text() == "replaced"


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    out = tmp_path / "report.md"
    atomic.write_text(str(out), "old")

    with pytest.raises(TypeError):
        atomic.write_bytes(str(out), object())  # not bytes: fails while writing
    assert out.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.md"]
