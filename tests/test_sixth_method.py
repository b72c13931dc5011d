"""A sixth method, defined in this file and registered with one call, runs everywhere the built-in ones do: through
``wrap`` + ``generate``, GuardConfig (dicts, JSON files, presets, describe_settings), ``vlm-guard tune``'s grid and the
demo's controls, without a library file naming it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import vlm_guard
from vlm_guard.config import (
    ALL_METHODS,
    METHOD_ORDER,
    GuardConfig,
    MethodConfig,
    check_layers,
    check_range,
    preset_field,
)
from vlm_guard.core.contract import EVERY_ROW, Intervention, LayerContext, RowSelection
from vlm_guard.methods.registry import MethodUI, get_method, method_names, register_method, unregister_method
from vlm_guard.testing import build_batch, tiny_model

NAME = "image_scale"
ROWS = [(True, 5), (False, 3), (True, 9)]
NEW_TOKENS = 4
LIBRARY = Path(vlm_guard.__file__).resolve().parent


@dataclass
class ImageScaleConfig(MethodConfig):
    """Scale the post-softmax attention to image tokens by ``factor`` and renormalise each row."""

    method = NAME
    factor: float = preset_field("multiplier of the attention to image tokens (1 = off)", released=1.5, paper=2.0)
    layers: list[int] | None = field(default=None, metadata={"help": "layers to edit; None = every layer"})

    def validate(self) -> None:
        check_range("ImageScaleConfig", "factor", self.factor, 0.0, 100.0, low_inclusive=False)
        check_layers("ImageScaleConfig", "layers", self.layers)


class ImageScale(Intervention):
    name = NAME
    uses_weights = True
    chunkable_rows = True  # each row's edit is its own

    def __init__(self, config: ImageScaleConfig, num_layers: int):
        self.factor = config.factor
        self._layers = set(range(num_layers) if config.layers is None else config.layers)

    def layers(self) -> set[int]:
        return self._layers

    def rows(self, ctx: LayerContext):
        return EVERY_ROW if ctx.all_generated else ctx.predicting_rows()

    def on_weights(self, ctx: LayerContext, weights: torch.Tensor, rows: RowSelection) -> torch.Tensor:
        image = ctx.keys(ctx.prompt.spans.image).to(weights.device)  # [B, K]
        scale = torch.where(image, self.factor, 1.0).to(weights.dtype)[:, None, None, :]
        edited = weights * scale
        return edited / edited.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def build(config: ImageScaleConfig, adapter, head_map):
    if config.factor == 1.0:
        return None  # the identity: nothing to run
    return ImageScale(config, adapter.geometry.num_layers)


@pytest.fixture(scope="module")
def registered():
    spec = register_method(  # the one registration call
        NAME,
        ImageScaleConfig,
        build,
        strength_field="factor",
        ui=MethodUI("Image scale", 0.5, 10.0, 0.5, 1.5, "factor: multiplier of the attention to image tokens"),
        tuning_grid=lambda num_layers, head_map: [{"factor": factor} for factor in (1.25, 1.5, 3.0)],
        bench_fields={},
    )
    yield spec
    unregister_method(NAME)


def test_no_library_file_names_it():
    hits = [str(path) for path in LIBRARY.rglob("*.py") if NAME in path.read_text(encoding="utf-8")]
    assert hits == []


def test_unknown_before_it_is_registered():  # runs before the module fixture registers it
    assert NAME not in method_names()
    with pytest.raises(ValueError, match="unknown method"):
        GuardConfig.from_methods(NAME)
    with pytest.raises(ValueError, match="unknown method"):
        GuardConfig.from_dict({NAME: {"factor": 2.0}})


def test_registry_lists_it_after_the_built_in_methods(registered):
    assert method_names()[-1] == NAME and NAME in METHOD_ORDER
    assert get_method(NAME) is registered and registered.order > get_method("vcd").order
    assert NAME not in ALL_METHODS and not registered.contrastive
    assert vlm_guard.ImageScaleConfig is ImageScaleConfig
    with pytest.raises(ValueError, match="already registered"):
        register_method(NAME, ImageScaleConfig, build)


@pytest.fixture(scope="module")
def llava():
    model = tiny_model("llava")
    return model, build_batch(model, ROWS)


def _greedy(guarded, inputs):
    return guarded.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_generate_changes_output_when_strong_and_matches_plain_when_off(registered, llava):
    model, inputs = llava
    guarded = vlm_guard.wrap(model, config=GuardConfig(image_scale=ImageScaleConfig(factor=60.0)))
    try:
        assert [i.name for i in guarded.interventions] == [NAME]
        strong = _greedy(guarded, inputs)
        with guarded.disabled():
            plain = _greedy(guarded, inputs)
        assert not torch.equal(strong, plain)
        has_image = torch.tensor([row[0] for row in ROWS])
        assert torch.equal(strong[~has_image], plain[~has_image])  # rows without an image are left alone
        guarded.set_config(GuardConfig())
        assert guarded.interventions == [] and torch.equal(_greedy(guarded, inputs), plain)
        guarded.set_config(GuardConfig(image_scale=ImageScaleConfig(factor=1.0)))
        assert guarded.interventions == [] and torch.equal(_greedy(guarded, inputs), plain)
        guarded.set_config(NAME)  # a method list names it too
        assert guarded.guard_config.image_scale.factor == 1.5
        guarded.set_config(GuardConfig.from_methods(f"vhr,{NAME}"))
        assert [i.name for i in guarded.interventions] == ["vhr", NAME]  # the registry's run order
    finally:
        guarded.unwrap()


def test_guard_config_round_trips(registered, tmp_path):
    config = GuardConfig(vhr={"alpha": 1.5}, image_scale=ImageScaleConfig(factor=3.0, layers=[1]))
    data = config.to_dict()
    assert data[NAME] == {"preset": "released", "factor": 3.0, "layers": [1]}
    assert GuardConfig.from_dict(data) == config
    assert GuardConfig.from_dict(json.loads(json.dumps(data))) == config
    config.save(tmp_path / "config.json")
    loaded = GuardConfig.load(tmp_path / "config.json")
    assert loaded == config and loaded.image_scale.layers == [1] and loaded.enabled_methods == ["vhr", NAME]
    config.image_scale = {"factor": 4.0}
    assert config.image_scale.factor == 4.0
    with pytest.raises(ValueError, match=r"ImageScaleConfig\.factor=0.0 is out of range"):
        config.image_scale.factor = 0.0
    assert GuardConfig.from_methods(NAME).image_scale.factor == 1.5
    assert GuardConfig.from_methods(NAME, preset="paper").image_scale.factor == 2.0
    assert GuardConfig().image_scale is None and config.replace(image_scale=None).enabled_methods == ["vhr"]
    assert "image_scale=ImageScaleConfig(" in repr(config)


def test_describe_settings_lists_it(registered):
    from vlm_guard.settings import describe_settings, resolve_config

    resolved, sources = resolve_config(GuardConfig(image_scale=ImageScaleConfig(factor=2.5)))
    lines = describe_settings(resolved, sources)
    assert lines == [
        f"{NAME}: preset='released' (released default), factor=2.5 (config), layers=None (released default)"
    ]


def test_tune_grid_reads_the_registry(registered):
    from vlm_guard.tuning.space import STRENGTH_FIELD, TUNABLE_METHODS, forward_passes, method_candidates

    assert NAME in TUNABLE_METHODS and STRENGTH_FIELD[NAME] == "factor"
    grid = method_candidates(NAME, num_layers=4)
    assert [c.label for c in grid] == [f"{NAME} factor=1.25", f"{NAME} factor=1.5", f"{NAME} factor=3"]
    config = grid[-1].guard_config()
    assert config.image_scale.factor == 3.0 and config.enabled_methods == [NAME]
    assert forward_passes(grid[0]) == 1


def test_demo_controls_read_the_registry(registered):
    from vlm_guard.demo.session import METHOD_CONTROLS, build_guard_config, method_availability

    control = next(c for c in METHOD_CONTROLS if c.name == NAME)
    assert (control.label, control.strength_field, control.minimum, control.maximum) == (
        "Image scale",
        "factor",
        0.5,
        10.0,
    )
    availability = method_availability()
    assert availability[NAME].available and availability[NAME].default == 1.5
    config, notes = build_guard_config({NAME: 3.0, "vhr": None}, availability)
    assert config.enabled_methods == [NAME] and config.image_scale.factor == 3.0 and notes == []


def test_bench_has_its_row(registered):
    from vlm_guard.eval import bench

    assert bench.CONFIGURATIONS[-1] == NAME
    assert bench.method_configs(random_model=False)[NAME].enabled_methods == [NAME]
    assert NAME in bench.MEMORY_TARGET_CONFIGS and NAME not in bench.DECODE_TARGETS
