"""`vlm-guard caption` on the shipped default model: the README's main job."""

import pytest

from vlm_guard.cli import main
from vlm_guard.defaults import DEFAULT_MODEL_DIR, EXAMPLES_DIR

pytestmark = pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").exists(), reason="the default model is not shipped")


def test_caption_prints_plain_and_guarded_with_flags(capsys):
    image = sorted(EXAMPLES_DIR.glob("*.png"))[0]
    code = main(["caption", str(image), "--methods", "vhr,gift", "--max-new-tokens", "12", "--check"])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    assert any(line.startswith("plain ") for line in lines)
    assert any(line.startswith("guarded (vhr,gift)") for line in lines)
    assert sum(line.startswith("flagged in ") for line in lines) == 2


def test_caption_without_image_uses_a_bundled_example(capsys):
    assert main(["caption", "--methods", "none", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "(bundled example)" in out and "guarded (none)" in out


def test_caption_bad_inputs_give_clear_errors(tmp_path, capsys):
    assert main(["caption", str(tmp_path / "missing.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    assert main(["caption", str(corrupt)]) == 2
    assert "could not read" in capsys.readouterr().err
    assert main(["caption", "--methods", "magic"]) == 2
    assert "unknown method" in capsys.readouterr().err
    assert main(["caption", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens=0 is out of range" in capsys.readouterr().err
