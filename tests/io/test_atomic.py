import os
import subprocess
import sys

import pytest

from segformer_fast.utils.atomic import atomic_path, atomic_write_text


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path):
    return os.stat(path).st_mode & 0o777


def test_atomic_write_gives_umask_mode_and_keeps_an_existing_mode(tmp_path, umask_022):
    new = tmp_path / "new.txt"
    atomic_write_text(new, "a")
    assert _mode(new) == 0o644  # as open(path, "w") gives under umask 022, not mkstemp's 0600
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    os.chmod(kept, 0o640)
    atomic_write_text(kept, "new")
    assert kept.read_text() == "new" and _mode(kept) == 0o640


def test_stale_temp_file_of_a_killed_writer_is_removed_at_the_next_save(tmp_path):
    # a writer killed mid-save: its temp file stays, full size, under our temp-name pattern
    code = ("import os, sys\n"
            "from segformer_fast.utils.atomic import atomic_path\n"
            "with atomic_path(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'x' * 100000)\n"
            "    os._exit(9)\n")
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "model.safetensors")], check=False)
    stale = [n for n in os.listdir(tmp_path) if n != "model.safetensors"]
    assert len(stale) == 1 and os.path.getsize(tmp_path / stale[0]) == 100000
    assert not (tmp_path / "model.safetensors").exists()
    user_file = tmp_path / ".tmp-user-notes"  # not ours: never touched
    user_file.write_text("keep")
    atomic_write_text(tmp_path / "metrics.json", "{}")
    assert sorted(os.listdir(tmp_path)) == [".tmp-user-notes", "metrics.json"]


def test_temp_file_of_a_live_writer_is_left_alone(tmp_path):
    with atomic_path(tmp_path / "a.bin") as tmp:
        open(tmp, "wb").write(b"1")
        atomic_write_text(tmp_path / "b.txt", "b")  # another save into the folder meanwhile
        assert os.path.exists(tmp)
    assert (tmp_path / "a.bin").read_bytes() == b"1"


def test_atomic_write_json_is_strict_json(tmp_path):
    import json

    from segformer_fast.utils.atomic import atomic_write_json

    path = tmp_path / "m.json"
    atomic_write_json(path, {"loss": float("nan"), "iou": [0.5, float("inf"), -float("inf")]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {"loss": None,
                                                                                    "iou": [0.5, None, None]}
