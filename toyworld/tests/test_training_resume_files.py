"""A toy-model training run resumes from ``train_config.json`` and ``checkpoint/state.json``: a damaged or hand-edited
file is refused with one line naming the file and the field (before: a TypeError or KeyError traceback, or a run
that silently restarts from another point), and every file a real run writes still reads (vlm_guard.schema)."""

from __future__ import annotations

import json

import pytest

from vlm_guard import fileio
from vlm_guard.schema import (
    FileSchemaError,
    check_dataclass,
    check_train_state,
    read_json,
)
from vlm_guard.synthetic.everyday.testing import tiny_language_model

# (field as named in the message, a change that damages it); applied to a valid state.json
STATE_DAMAGES = [
    ("step", lambda s: s.update(step="3")),
    ("step", lambda s: s.update(step=-1)),
    ("stage", lambda s: s.update(stage="nope")),
    ("elapsed_s", lambda s: s.update(elapsed_s=None)),
    ("losses", lambda s: s.update(losses=[[0, 1.0]])),
    ("losses.vision[0]", lambda s: s["losses"].update(vision=[["0", 1.0]])),
    ("param_groups", lambda s: s.update(param_groups={"params": [0]})),
    ("param_groups[0].params", lambda s: s["param_groups"][0].update(params="0")),
    ("stage", lambda s: s.pop("stage")),
]
CONFIG_DAMAGES = [
    ("seed", lambda c: c.update(seed="0")),
    ("spec", lambda c: c.update(spec="tiny")),
    ("spec.vision_hidden", lambda c: c["spec"].update(vision_hidden=32.5)),
    ("vision_steps", lambda c: c.update(vision_steps=None)),
    ("no_such_setting", lambda c: c.update(no_such_setting=1)),
]


def _state(stage: str, step: int = 3) -> dict:
    return {
        "stage": stage,
        "step": step,
        "elapsed_s": 1.5,
        "losses": {stage: [[0, 2.5], [1, float("nan")]]},
        "param_groups": [{"params": [0, 1], "lr": 0.001, "base_lr": 0.001, "betas": [0.9, 0.98]}],
    }


def _damage(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _assert_one_line(error, path, field) -> None:
    message = str(error.value)
    assert "\n" not in message, message
    assert message.startswith(f"{path}: field {field} "), message
    assert "restore it from a copy, or start a new --out" in message, message


# ---------------------------------------------------------------------------------------------- toy model (v1)
def _v1_run(tmp_path):
    from toyworld.shapes.train import TINY_SPEC, TrainConfig

    config = TrainConfig(out_dir=str(tmp_path / "run"), spec=TINY_SPEC, vision_steps=4)
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    fileio.atomic_write_json(tmp_path / "run" / "train_config.json", config.to_dict(), indent=1)
    fileio.atomic_write_json(tmp_path / "run" / "checkpoint" / "state.json", _state("vision"), allow_nan=True)
    return config


@pytest.mark.parametrize("field,change", STATE_DAMAGES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(STATE_DAMAGES)])
def test_v1_resume_refuses_a_damaged_state_in_one_line(tmp_path, field, change):
    from toyworld.shapes.train import train

    config = _v1_run(tmp_path)
    path = tmp_path / "run" / "checkpoint" / "state.json"
    _damage(path, change)
    with pytest.raises(ValueError) as error:
        train(config, resume=True, progress=False)
    _assert_one_line(error, path, field)


@pytest.mark.parametrize("field,change", CONFIG_DAMAGES, ids=[f for f, _ in CONFIG_DAMAGES])
def test_v1_resume_and_export_refuse_a_damaged_config_in_one_line(tmp_path, field, change):
    from toyworld.shapes.train import export_checkpoint, train

    config = _v1_run(tmp_path)
    path = tmp_path / "run" / "train_config.json"
    _damage(path, change)
    with pytest.raises(ValueError) as error:
        train(config, resume=True, progress=False)
    _assert_one_line(error, path, field)
    with pytest.raises(ValueError) as error:
        export_checkpoint(tmp_path / "run")
    _assert_one_line(error, path, field)


def test_a_state_that_is_not_json_is_one_line(tmp_path):
    from toyworld.shapes.train import train

    config = _v1_run(tmp_path)
    path = tmp_path / "run" / "checkpoint" / "state.json"
    path.write_text('{"stage": "vision", "step": 3,')  # cut off
    with pytest.raises(ValueError) as error:
        train(config, resume=True, progress=False)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"{path}: not valid JSON (") and "--out" in message, message


def test_a_config_value_the_settings_refuse_names_the_file(tmp_path):
    from toyworld.shapes.train import read_train_config

    _v1_run(tmp_path)
    path = tmp_path / "run" / "train_config.json"
    _damage(path, lambda c: c.update(question_fraction=2.0))
    with pytest.raises(ValueError) as error:
        read_train_config(path)
    assert str(error.value).startswith(f"{path}: question_fraction must lie in [0, 1]"), str(error.value)


def test_v1_states_and_configs_that_runs_write_still_read(tmp_path):
    """A real checkpoint (a NaN loss included, as a diverged run writes it) passes the checks."""
    import torch

    from toyworld.shapes.train import (
        TINY_SPEC,
        CellHeads,
        TrainConfig,
        _save_checkpoint,
        read_state,
        read_train_config,
    )
    from vlm_guard.synthetic.model import build_model, build_processor

    config = TrainConfig(out_dir=str(tmp_path), spec=TINY_SPEC)
    fileio.atomic_write_json(tmp_path / "train_config.json", config.to_dict(), indent=1, allow_nan=True)
    assert read_train_config(tmp_path / "train_config.json") == config
    processor = build_processor(TINY_SPEC)
    model = build_model(TINY_SPEC, processor.tokenizer, seed=0)
    heads = CellHeads(TINY_SPEC.vision_hidden, TINY_SPEC.image_size // TINY_SPEC.patch_size)
    optimizer = torch.optim.AdamW(list(heads.parameters()), lr=1e-3)
    heads(torch.zeros(1, (TINY_SPEC.image_size // TINY_SPEC.patch_size) ** 2, TINY_SPEC.vision_hidden))[
        "type"
    ].sum().backward()
    optimizer.step()
    state = {"stage": "lm", "step": 7, "elapsed_s": 2.0, "losses": {"vision": [[0, float("nan")]], "lm": [[0, 3.0]]}}
    _save_checkpoint(tmp_path / "checkpoint", model, heads, optimizer, state)
    assert read_state(tmp_path / "checkpoint")["step"] == 7


# ---------------------------------------------------------------------------------------------- default model v2
@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_language_model()


def _v2_run(tmp_path):
    from toyworld.everyday.train import V2TrainConfig
    from vlm_guard.synthetic.everyday.model import V2Spec

    config = V2TrainConfig(
        out_dir=str(tmp_path / "run"), spec=V2Spec(vision_hidden=32, vision_layers=1, vision_heads=2, lora_rank=2)
    )
    (tmp_path / "run" / "checkpoint").mkdir(parents=True)
    fileio.atomic_write_json(tmp_path / "run" / "train_config.json", config.to_dict(), indent=1)
    fileio.atomic_write_json(tmp_path / "run" / "checkpoint" / "state.json", _state("prealign"), allow_nan=True)
    return config


@pytest.mark.parametrize(
    "which,field,change",
    [
        ("state", "step", lambda s: s.update(step="3")),
        ("state", "losses.nope", lambda s: s["losses"].update(nope=[])),
        ("config", "mixture", lambda c: c.update(mixture=[0.5])),
        ("config", "spec.lora_targets[0]", lambda c: c["spec"].update(lora_targets=[1])),
    ],
)
def test_v2_resume_refuses_damaged_files_in_one_line(tmp_path, tiny_lm, which, field, change):
    from toyworld.everyday.train import train

    config = _v2_run(tmp_path)
    path = tmp_path / "run" / ("checkpoint/state.json" if which == "state" else "train_config.json")
    _damage(path, change)
    lm, tokenizer = tiny_lm
    with pytest.raises(ValueError) as error:
        train(config, resume=True, progress=False, lm=lm, lm_tokenizer=tokenizer)
    _assert_one_line(error, path, field)


# ---------------------------------------------------------------------------------------------- default model v3
def _v3_state() -> dict:
    return {
        **_state("align", 9),
        "cpu_s": 0.5,
        "files": {
            "trainable": {"name": "trainable-align-000009.safetensors", "sha256": "a" * 64},
            "optimizer": {"name": "optimizer-align-000009.safetensors", "sha256": "b" * 64},
        },
    }


@pytest.mark.parametrize(
    "field,change",
    [
        ("step", lambda s: s.update(step=9.0)),
        ("cpu_s", lambda s: s.update(cpu_s="1")),
        ("files", lambda s: s.pop("files")),
        ("files.trainable.sha256", lambda s: s["files"]["trainable"].update(sha256=None)),
        ("files.optimizer.name", lambda s: s["files"]["optimizer"].update(name="../../etc/passwd")),
        ("files.optimizer", lambda s: s["files"].update(optimizer="optimizer.safetensors")),
    ],
)
def test_v3_checkpoint_with_a_damaged_state_is_one_line(tmp_path, field, change):
    from toyworld.v3.train import read_checkpoint

    path = tmp_path / "state.json"
    fileio.atomic_write_json(path, _v3_state(), allow_nan=True)
    _damage(path, change)
    with pytest.raises(ValueError) as error:
        read_checkpoint(tmp_path)
    _assert_one_line(error, path, field)


def test_v3_resume_with_a_damaged_config_is_one_line_and_exit_2(tmp_path, capsys):
    from toyworld.v3.train import CONFIG_NAME, V3TrainConfig, main

    path = tmp_path / CONFIG_NAME
    fileio.atomic_write_json(path, V3TrainConfig(out_dir=str(tmp_path)).to_dict(), indent=1)
    _damage(path, lambda c: c.update(align_mixture="caption"))
    assert main(["--out", str(tmp_path), "--resume"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith(f'error: {path}: field align_mixture is "caption"'), error


def test_v3_resume_refuses_a_damaged_state_before_training(tmp_path):
    from toyworld.v3.train import CHECKPOINT_DIR, STATE_FILE, V3TrainConfig, train
    from vlm_guard.synthetic.everyday_v3.model import V3Spec

    config = V3TrainConfig(
        out_dir=str(tmp_path), spec=V3Spec(vision_hidden=32, vision_layers=1, vision_heads=2, lora_rank=2)
    )
    fileio.atomic_write_json(tmp_path / "train_config.json", config.to_dict(), indent=1)
    (tmp_path / CHECKPOINT_DIR).mkdir()
    path = tmp_path / CHECKPOINT_DIR / STATE_FILE
    fileio.atomic_write_json(path, {**_v3_state(), "stage": 3}, allow_nan=True)
    lm, tokenizer = tiny_language_model()
    with pytest.raises(ValueError) as error:
        train(config, resume=True, lm=lm, lm_tokenizer=tokenizer)
    _assert_one_line(error, path, "stage")


def test_v3_files_in_the_format_the_running_job_writes_still_read(tmp_path):
    """The v3 run started before these checks (format of /root/vlm-guard-runs/v3 at 05:55 UTC) resumes: its
    train_config.json and state.json, as written, pass."""
    from toyworld.v3.train import STAGES, V3TrainConfig, read_train_config

    config = {
        "out_dir": "/root/vlm-guard-runs/v3",
        "seed": 0,
        "spec": {
            "image_size": 192,
            "patch_size": 16,
            "vision_hidden": 192,
            "vision_layers": 3,
            "vision_heads": 4,
            "lora_rank": 8,
            "lora_alpha": 16.0,
            "lora_targets": ["q_proj", "k_proj", "v_proj", "o_proj"],
        },
        "pair_prob": 0.97,
        "vision_steps": 400,
        "prealign_steps": 300,
        "align_steps": 150,
        "instruct_steps": 700,
        "vision_batch": 32,
        "prealign_batch": 32,
        "chat_batch": 8,
        "vision_lr": 0.002,
        "prealign_lr": 0.002,
        "align_lr": 0.001,
        "lora_lr": 0.001,
        "align_mixture": {"caption": 0.5, "detail": 0.5},
        "instruct_mixture": {"caption": 0.2, "detail": 0.45, "question": 0.35},
        "warmup_steps": 20,
        "checkpoint_minutes": 5.0,
        "threads": 1,
    }
    fileio.atomic_write_json(tmp_path / "train_config.json", config, indent=1)
    loaded = read_train_config(tmp_path / "train_config.json")
    assert isinstance(loaded, V3TrainConfig) and loaded.spec.image_size == 192 and loaded.to_dict()["seed"] == 0
    state = {
        "stage": "align",
        "step": 9,
        "elapsed_s": 3832.55,
        "cpu_s": 593.02,
        "losses": {"vision": [[0, 8.67159], [10, 6.40142]], "prealign": [[0, 1.68077]], "align": [[0, 3.58069]]},
        "param_groups": [
            {
                "lr": 0.00045,
                "base_lr": 0.001,
                "betas": [0.9, 0.98],
                "eps": 1e-08,
                "weight_decay": 0.0,
                "amsgrad": False,
                "maximize": False,
                "foreach": None,
                "capturable": False,
                "differentiable": False,
                "fused": None,
                "decoupled_weight_decay": True,
                "params": [0, 1, 2, 3],
            }
        ],
        "files": {
            "trainable": {"name": "trainable-align-000009.safetensors", "sha256": "13ab" + "0" * 60},
            "optimizer": {"name": "optimizer-align-000009.safetensors", "sha256": "48cc" + "0" * 60},
        },
    }
    fileio.atomic_write_json(tmp_path / "state.json", state, indent=1)
    assert (
        check_train_state(
            tmp_path / "state.json",
            read_json(tmp_path / "state.json", "r"),
            STAGES,
            "r",
            optimizer=True,
            files=("trainable", "optimizer"),
        )
        == state
    )


def test_check_dataclass_allows_missing_fields_and_refuses_a_list_for_an_object(tmp_path):
    from toyworld.shapes.train import TrainConfig

    assert check_dataclass("f.json", {"seed": 1}, TrainConfig, "fix it") == {"seed": 1}  # older files: defaults
    with pytest.raises(
        FileSchemaError, match=r"^f\.json: field \(the whole file\) is \[1\], not a JSON object; fix it$"
    ):
        check_dataclass("f.json", [1], TrainConfig, "fix it")
    with pytest.raises(FileSchemaError, match=r"^f\.json: field pair_prob is NaN, not a finite number; fix it$"):
        check_dataclass("f.json", {"pair_prob": float("nan")}, TrainConfig, "fix it")
