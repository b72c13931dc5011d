"""Loading checkpoints: safetensors only by default; pickle-only checkpoints are refused unless --allow-pickle
(issue 17, item 12)."""

import pytest
import torch

from vlm_guard.cli import build_parser, main
from vlm_guard.models.loading import PickleCheckpointError, load_pretrained_model, weights_format_kwargs
from vlm_guard.testing import tiny_model


@pytest.fixture(scope="module")
def pickle_folder(tmp_path_factory):
    """A model folder with config.json and only pytorch_model.bin (as older checkpoints ship)."""
    folder = tmp_path_factory.mktemp("pickle_only")
    model = tiny_model("llava", seed=4)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder, model


def _loaders():
    from vlm_guard.cli.calibrate import load_model as calibrate_load
    from vlm_guard.eval.runner import load_model as eval_load
    from vlm_guard.models.loading import load_model as caption_load

    loaders = {"caption": caption_load, "calibrate": calibrate_load, "eval": lambda source: eval_load(source)}
    try:
        from vlm_guard.demo.session import load_model as demo_load

        loaders["demo"] = demo_load
    except ImportError:  # the demo extra is not installed
        pass
    return loaders


def test_pickle_only_folder_is_refused_by_every_loader(pickle_folder):
    folder, _ = pickle_folder
    with pytest.raises(PickleCheckpointError, match=r"only pickle checkpoints \(pytorch_model.bin\).*--allow-pickle"):
        weights_format_kwargs(folder)
    for load in _loaders().values():
        with pytest.raises(PickleCheckpointError, match="--allow-pickle"):
            load(str(folder))


def test_allow_pickle_loads_it(pickle_folder):
    folder, model = pickle_folder
    loaded = load_pretrained_model(folder, allow_pickle=True)
    assert all(torch.equal(loaded.state_dict()[key], value) for key, value in model.state_dict().items())


def test_safetensors_is_preferred_when_both_exist(tmp_path):
    model = tiny_model("llava", seed=5)
    model.save_pretrained(tmp_path)
    other = tiny_model("llava", seed=6)
    torch.save(other.state_dict(), tmp_path / "pytorch_model.bin")
    assert weights_format_kwargs(tmp_path) == {"use_safetensors": True}
    loaded = load_pretrained_model(tmp_path)
    key = "lm_head.weight"
    assert torch.equal(loaded.state_dict()[key], model.state_dict()[key])


def test_cli_refuses_with_one_line_and_every_model_command_has_the_flag(pickle_folder, capsys):
    folder, _ = pickle_folder
    assert main(["caption", "--model", str(folder)]) == 2
    error = capsys.readouterr().err
    assert "only pickle checkpoints" in error and "--allow-pickle" in error and "Traceback" not in error
    parser = build_parser()
    commands = {
        "caption": ["caption"],
        "calibrate": ["calibrate", "--images", "x", "--out", "y"],
        "eval": ["eval", "synthetic", "--out", "r.jsonl"],
    }
    if "demo" in parser._subparsers._group_actions[0].choices:
        commands["demo"] = ["demo"]
    for name, argv in commands.items():
        assert parser.parse_args([*argv, "--allow-pickle"]).allow_pickle is True, name
        assert parser.parse_args(argv).allow_pickle is False, name
