"""`vlm-guard bench`: runs end to end on a very small LLaVA-1.5-shaped model and writes its JSON report.

No timing assertions: only the structure of the report and that every configuration ran.
"""

from __future__ import annotations

import json

import pytest
import torch

import vlm_guard.eval.bench as bench
from vlm_guard.cli import build_parser

pytestmark = pytest.mark.slow  # runs the benchmark


def test_bench_command_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        [
            "bench",
            "--model",
            "random",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--hidden-size",
            "128",
            "--layers",
            "4",
            "--vocab-size",
            "512",
            "--long-prompt",
            "0",
            "--out",
            str(out),
            "--markdown",
            str(tmp_path / "bench.md"),
        ]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    report = json.loads(out.read_text())
    configs = report["models"]["llava15_shaped"]["configs"]
    assert list(configs) == list(bench.CONFIGURATIONS)
    assert report["models"]["llava15_shaped"]["prompt_length"] == 1 + 40 + 576
    for name, result in configs.items():
        assert len(result["runs"]) == 1
        assert result["median"]["prefill_ms"] > 0 and result["median"]["decode_ms"] > 0
        assert result["ratio_to_plain"]["decode_ms"] > 0
        assert name in printed
    assert configs["plain"]["ratio_to_plain"]["decode_ms"] == 1.0
    assert "ops/step" in printed and "prefill ops" in printed
    assert "op_count" in report["settings"]
    for result in configs.values():  # new fields: ops per decoding step and prefill, their ratios; prefill ratio
        median, ratio = result["median"], result["ratio_to_plain"]
        assert median["decode_ops"] > 0 and median["prefill_ops"] > median["decode_ops"]
        assert ratio["prefill_ms"] > 0 and ratio["decode_ops"] > 0 and ratio["prefill_ops"] > 0
        assert result["runs"][0]["decode_ops"] == median["decode_ops"]
    assert configs["plain"]["ratio_to_plain"]["decode_ops"] == 1.0
    assert configs["plain"]["ratio_to_plain"]["prefill_ops"] == 1.0
    # the contrastive baseline runs a second forward per step: clearly more ops than plain
    assert configs["vcd"]["ratio_to_plain"]["decode_ops"] > 1.5
    assert configs["var"]["config"]["var"]["sink_dims"] == [bench.PLANTED_SINK_DIM]
    assert configs["vhr+var+gift"]["decode_target"] == 1.3 and configs["off"]["decode_target"] == 1.03
    assert (
        configs["off"]["ops_target"] == 1.02 and configs["off"]["ops_target_met"] is True
    )  # off dispatches plain's ops
    # every method really acts: its prefill logits move, and it keeps decode layers (VAR's planted BOS sink is recycled)
    for name in ("vhr", "var", "gift", "vhr+var+gift", "pai"):
        acts = configs[name]["acts"]
        assert acts["max_prefill_logit_change"] > 0 and any(acts["decode_layers"].values()), name
    assert configs["off"]["acts"]["max_prefill_logit_change"] == 0.0 and "acts:" in printed
    # no head map with tuned values for a random model: every row runs its configuration as written
    assert all(result["acts"] is None or result["acts"]["tuned_settings"] == [] for result in configs.values())
    assert "head map's tuned" not in printed
    assert "long_prompt" not in report
    markdown = (tmp_path / "bench.md").read_text()
    assert "| off |" in markdown and "(<= 1.03" in markdown and "ops x" in markdown
    assert "tuned section" not in markdown


def test_planted_sink_is_found_by_var():
    """The random model's planted massive activation makes BOS a VAR sink (so VAR really runs in the bench)."""
    import vlm_guard

    model = bench.llava15_shaped_model(
        hidden_size=512, num_layers=4, num_heads=32, vocab_size=512
    )  # phi <= sqrt(512) > tau
    inputs = bench.llava15_inputs(model)
    guarded = vlm_guard.wrap(model, config=bench.method_configs(random_model=True)["var"])
    try:
        guarded(**inputs)
        sinks = guarded.last_generation.states["var"].sink_mask
        assert sinks and all(bool(mask[0, 0]) for mask in sinks.values())
    finally:
        guarded.unwrap()


def test_long_prompt_memory_runs_each_configuration_in_a_fresh_process():
    """The long-prompt pass on a 1024-token prompt for plain and VAR: a peak for each, ratios to plain, the target
    on VAR only among those (it is a paper method), and the table names both."""
    report = bench.long_prompt_memory(1024, configs=("plain", "var"))
    assert report["prompt_length"] == 1024 and list(report["configs"]) == ["plain", "var"]
    plain, var = report["configs"]["plain"], report["configs"]["var"]
    assert plain["peak_mib"] > 0 and var["peak_mib"] > 0 and plain["ratio_to_plain"] == 1.0
    assert var["memory_target"] == bench.MEMORY_TARGET and plain["memory_target"] is None
    assert var["memory_target_met"] == (var["ratio_to_plain"] <= bench.MEMORY_TARGET)
    table = bench.format_long_prompt(report)
    assert "1024-token prompt" in table and "var" in table


def test_bench_var_settings_make_var_act_on_a_model_without_massive_activations():
    """The default-model recipe: the largest first-token ratio's dimension, tau at half BOS's smallest phi (so BOS is a
    sink in every VAR layer), text sinks recycled; on a tiny model (64 wide, no planted sink) VAR then edits."""
    from vlm_guard.testing import build_batch, tiny_model

    model = tiny_model("llava")
    inputs = build_batch(model, [(True, 6)])
    settings = bench.bench_var_settings(model, inputs)
    assert settings["require_visual_sink"] is False and len(settings["sink_dims"]) == 1
    assert 0 < settings["tau"] < min(settings["bos_phi"])
    acts = bench.method_action(model, None, bench.method_configs(False, settings)["var"], inputs)
    assert acts["decode_layers"]["var"] == [2, 3] and acts["max_prefill_logit_change"] > 0


def test_bad_arguments_are_rejected():
    parser = build_parser()
    for argv in (["bench", "--repeats", "0"], ["bench", "--new-tokens", "1"], ["bench", "--long-prompt", "100"]):
        with pytest.raises(SystemExit):  # refused while the arguments are parsed (vlm_guard.cli.bench)
            parser.parse_args(argv)


def test_op_counter_counts_exactly_on_a_hand_made_case():
    """x + 1, y * y, sum: three ops; x @ w on a vector: unsqueeze, mm, squeeze_; linear on a view: view, t, mm."""
    x, w = torch.ones(3), torch.ones(3, 3)
    with torch.no_grad(), bench.OpCounter() as counter:
        y = x + 1
        z = y * y
        z.sum()
        x @ w
        torch.nn.functional.linear(x.view(1, 3), w)
    assert counter.total == 9
    assert dict(counter.by_op) == {
        "aten.add.Tensor": 1,
        "aten.mul.Tensor": 1,
        "aten.sum.default": 1,
        "aten.unsqueeze.default": 1,
        "aten.mm.default": 2,
        "aten.squeeze_.dim": 1,
        "aten.view.default": 1,
        "aten.t.default": 1,
    }
    before = counter.total
    _ = x + 1  # outside the mode: not counted
    assert counter.total == before == 9


def test_op_counts_per_step_are_differences_of_running_totals():
    """A fake generate that does 5 ops of prefill then 2 ops per step: prefill 5, per decoding step 2."""

    class FakeModel:
        def generate(self, stopping_criteria, max_new_tokens, **kwargs):
            ids = torch.zeros(1, 1, dtype=torch.long)
            for _ in range(4):
                ids.add(1).mul(2).sub(1)  # 3 ops
            stopping_criteria[0](ids, None)  # its own torch.zeros: 1 op (prefill: 12 + 1 = 13)
            for _ in range(max_new_tokens - 1):
                ids.add(1)
                stopping_criteria[0](ids, None)  # 1 + 1 = 2 ops per step

    prefill_ops, decode_ops = bench.count_ops_once(FakeModel(), None, None, {}, new_tokens=4)
    assert (prefill_ops, decode_ops) == (13, 2)


def test_default_v2_without_weights_is_skipped_with_a_note(tmp_path, capsys):
    """``--model default-v2`` with a folder that holds no v2 weights reports why it skipped, and still succeeds."""
    args = build_parser().parse_args(
        ["bench", "--model", "default-v2", "--v2-weights", str(tmp_path / "none"), "--long-prompt", "0", "--out", ""]
    )
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "default model v2 skipped" in printed and "no v2 weights" in printed


def test_fixture_model_is_benched_under_its_own_name(tmp_path, capsys):
    """``--model fixture``: the 3.6M test fixture, whatever the default model is; its VAR acts (bench settings), the
    markdown has a peak-memory ratio column, and VAR's decoding step costs fewer operations than the old 25 per
    layer over plain (four VAR layers: at most 18 each)."""
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(
        [
            "bench",
            "--model",
            "fixture",
            "--repeats",
            "1",
            "--new-tokens",
            "2",
            "--long-prompt",
            "0",
            "--out",
            str(out),
            "--markdown",
            str(tmp_path / "bench.md"),
        ]
    )
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert list(report["models"]) == ["fixture"] and "3.6M test fixture" in report["models"]["fixture"]["description"]
    configs = report["models"]["fixture"]["configs"]
    var_layers = configs["var"]["acts"]["decode_layers"]["var"]
    assert len(var_layers) == 4 and configs["var"]["acts"]["max_prefill_logit_change"] > 0
    extra = configs["var"]["median"]["decode_ops"] - configs["plain"]["median"]["decode_ops"]
    assert 0 < extra <= 18 * len(var_layers)
    assert configs["off"]["median"]["decode_ops"] == configs["plain"]["median"]["decode_ops"]
    assert "peak memory x" in (tmp_path / "bench.md").read_text()


def test_rows_that_take_the_head_maps_tuned_values_say_so(tmp_path, monkeypatch):
    """On default model v3 the shipped head map tunes PAI (its caption profile): the bench's "pai" row runs with
    those values (as ``wrap`` does) and the report names them (``acts.tuned_settings``, a line under the tables)."""
    from vlm_guard.calibration.head_map import CACHE_ENV
    from vlm_guard.config import GuardConfig
    from vlm_guard.synthetic.default import DEFAULT_MODEL_ENV, V3_WEIGHTS

    if not V3_WEIGHTS.exists():
        pytest.skip("default model v3 is not shipped")
    monkeypatch.setenv(DEFAULT_MODEL_ENV, "v3")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))  # the shipped map, not one a user tuned
    from vlm_guard.defaults import load_default

    model, processor = load_default()
    inputs = bench.default_model_inputs(processor)
    acts = bench.method_action(model, processor, GuardConfig.from_methods("pai"), inputs)
    tuned = acts["tuned_settings"]
    assert len(tuned) == 1 and tuned[0].startswith("pai: alpha=0.2 (tuned), gamma=1.0 (tuned)"), tuned
    assert bench.method_action(model, processor, GuardConfig.from_methods("vhr"), inputs)["tuned_settings"] == []
    row = {"median": {}, "acts": acts}
    assert bench.tuned_lines({"plain": {"acts": None}, "pai": row}) == [f"pai ({tuned[0]})"]
