"""The cost estimate (issue 19): a build's measured busy seconds, scaled to a job size and priced."""

import pytest

from visinstruct.configs import BuildConfig, from_dict
from visinstruct.pipelines.cost import MILLION, Prices, estimate, format_estimate, gpu_stages_of, vcpu_dollars_per_hour

REPORT = {
    "inputs": 200,
    "seconds": 30.0,
    "stages": [
        {"stage": "ingest", "in": 200, "out": 180, "busy_seconds": 72.0},
        {"stage": "filter", "in": 180, "out": 90, "busy_seconds": 36.0},
        {"stage": "generate", "in": 90, "out": 80, "busy_seconds": 180.0},
    ],
    "prompt_tokens_spent": 40_000,
    "completion_tokens_spent": 10_000,
}


def test_busy_seconds_scale_linearly_to_hours_and_dollars_at_the_given_utilization():
    prices = Prices(utilization=0.5)
    cost = estimate(REPORT, MILLION, prices)
    # 72 busy seconds for 200 pairs: 360,000 s per million pairs, 100 busy hours, 200 paid hours at 50%
    assert [s["vcpu_hours"] for s in cost["stages"]] == [200.0, 100.0, 500.0]
    assert cost["vcpu_hours"] == 800.0 and cost["gpu_hours"] == 0.0
    assert cost["dollars"] == pytest.approx(800 * vcpu_dollars_per_hour(prices), abs=0.01)
    double = estimate(REPORT, 2 * MILLION, prices)
    assert double["vcpu_hours"] == 1600.0 and double["dollars"] == pytest.approx(2 * cost["dollars"], abs=0.02)


def test_gpu_stages_are_gpu_hours_and_an_api_llm_is_priced_by_its_tokens():
    prices = Prices(utilization=1.0, gpu_hour=2.0, llm_prompt_per_million=1.0, llm_completion_per_million=4.0)
    cost = estimate(REPORT, MILLION, prices, frozenset({"filter"}))
    filter_stage = next(s for s in cost["stages"] if s["stage"] == "filter")
    assert filter_stage == {"stage": "filter", "gpu_hours": 50.0, "dollars": 100.0}
    assert cost["llm_tokens"] == {"prompt": 200_000_000, "completion": 50_000_000}
    assert cost["llm_dollars"] == 200.0 + 200.0
    assert cost["dollars"] == pytest.approx(100 + 400 + 350 * vcpu_dollars_per_hour(prices), abs=0.01)
    text = format_estimate(cost)
    assert "GPU stages: filter" in text and "1,000,000 input pairs" in text and "LLM API" in text


def test_prices_refuse_what_they_would_misprice_in_one_line():
    assert Prices.parse(["gpu_hour=2.9", "utilization=0.8"]) == Prices(gpu_hour=2.9, utilization=0.8)
    with pytest.raises(ValueError, match="NAME one of"):
        Prices.parse(["tpu_hour=1"])
    with pytest.raises(ValueError, match="not a number"):
        Prices.parse(["gpu_hour=cheap"])
    with pytest.raises(ValueError, match=">= 0"):
        Prices(vcpu_hour=-1)
    with pytest.raises(ValueError, match="utilization"):
        Prices(utilization=0)
    with pytest.raises(ValueError, match="read no rows"):
        estimate({"inputs": 0, "stages": []})


def test_the_stages_that_run_on_a_gpu_come_from_the_config():
    def build(**sections):
        return from_dict(BuildConfig, {"out": "x", "input": "in/", "ingest": None, **sections})

    cpu_filter = {"model": {"name": "ViT-B-32", "device": "cpu"}}
    assert gpu_stages_of(build(filter=cpu_filter)) == frozenset()
    assert gpu_stages_of(build(filter={"model": {"name": "ViT-B-32"}}), cuda_available=True) == {"filter"}
    assert gpu_stages_of(build(filter={"model": {"name": "ViT-B-32"}}), cuda_available=False) == frozenset()
    hinted = {"model": {"name": "ViT-B-32", "device": "cpu", "accelerator": "type:nvidia-l4;count:1"}}
    assert gpu_stages_of(build(filter=hinted)) == {"filter"}
    vllm = {"backend": "vllm", "model": "some/model"}
    assert gpu_stages_of(build(filter=cpu_filter, generate=vllm)) == {"generate"}


def test_the_cost_command_scales_and_reprices_a_run_report(tmp_path, capsys):
    import json

    from visinstruct.cli.main import main

    (tmp_path / "run_report.json").write_text(json.dumps(REPORT | {"cost": {"gpu_stages": ["filter"]}}))
    assert main(["cost", str(tmp_path), "--pairs", "400M", "--price", "utilization=1", "--json"]) == 0
    cost = json.loads(capsys.readouterr().out)
    assert cost["pairs"] == 400_000_000 and cost["gpu_stages"] == ["filter"]
    assert cost["gpu_hours"] == 36 * 2_000_000 / 3600 and cost["vcpu_hours"] == (72 + 180) * 2_000_000 / 3600
    assert main(["cost", str(tmp_path / "run_report.json"), "--gpu-stage", "generate"]) == 0
    assert "GPU stages: generate" in capsys.readouterr().out
    assert main(["cost", str(tmp_path), "--pairs", "lots"]) == 2
    assert "--pairs takes a count" in capsys.readouterr().err
    (tmp_path / "other.json").write_text("[]")
    assert main(["cost", str(tmp_path / "other.json")]) == 2
    assert "not a build's run report" in capsys.readouterr().err
