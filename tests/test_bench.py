"""`vlm-guard bench`: runs end to end on a very small LLaVA-1.5-shaped model and writes its JSON report.

No timing assertions: only the structure of the report and that every configuration ran.
"""

from __future__ import annotations

import json

import pytest

from vlm_guard.cli import build_parser
from vlm_guard.decoding import bench


def test_bench_command_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = build_parser().parse_args(["bench", "--model", "random", "--repeats", "1", "--new-tokens", "2", "--hidden-size", "128",
                                      "--layers", "4", "--vocab-size", "512", "--out", str(out)])
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
    assert configs["var"]["config"]["var"]["sink_dims"] == [bench.PLANTED_SINK_DIM]
    assert configs["vhr+var+gift"]["decode_target"] == 1.3


def test_planted_sink_is_found_by_var():
    """The random model's planted massive activation makes BOS a VAR sink (so VAR really runs in the bench)."""
    import vlm_guard

    model = bench.llava15_shaped_model(hidden_size=512, num_layers=4, num_heads=32, vocab_size=512)  # phi <= sqrt(512) > tau
    inputs = bench.llava15_inputs(model)
    guarded = vlm_guard.wrap(model, config=bench.method_configs(random_model=True)["var"])
    try:
        guarded(**inputs)
        sinks = guarded.interventions[0].sink_mask
        assert sinks and all(bool(mask[0, 0]) for mask in sinks.values())
    finally:
        guarded.unwrap()


def test_bad_arguments_are_rejected():
    parser = build_parser()
    for argv in (["bench", "--repeats", "0"], ["bench", "--new-tokens", "1"]):
        args = parser.parse_args(argv)
        with pytest.raises(ValueError):
            args.func(args)
