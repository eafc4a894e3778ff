"""The pipelines translate for Dataflow offline (``--dry_run=True``): every DoFn pickles, GPUs go only where asked.

Nothing is submitted and no network is used; this is the check a user would otherwise make by paying for a job.
"""

import apache_beam as beam
import pytest
from apache_beam.options.pipeline_options import PipelineOptions

from visinstruct.configs import FilterConfig, IngestConfig, from_dict
from visinstruct.pipelines.filter import Filter
from visinstruct.pipelines.ingest import Ingest

pytest.importorskip("apache_beam.runners.dataflow.internal.apiclient")
ACCELERATOR = "type:nvidia-l4;count:1;install-nvidia-driver"


def dataflow_pipeline() -> beam.Pipeline:
    return beam.Pipeline(
        options=PipelineOptions(
            [
                "--runner=DataflowRunner",
                "--dry_run=True",
                "--project=demo-project",
                "--region=us-central1",
                "--temp_location=gs://demo-bucket/tmp",
                "--experiments=use_runner_v2",
                "--no_auth",
            ]
        )
    )


def unpickled_dofns(pipeline: beam.Pipeline) -> list[str]:
    """Class names of every DoFn in the translated graph, each unpickled from its payload as a worker would."""
    from apache_beam.internal import pickler
    from apache_beam.portability import common_urns
    from apache_beam.portability.api import beam_runner_api_pb2

    names = []
    for transform in pipeline.to_runner_api().components.transforms.values():
        if transform.spec.urn == common_urns.primitives.PAR_DO.urn:
            payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
            fn = pickler.loads(payload.do_fn.payload)[0]  # (dofn, args, kwargs, side inputs, windowing)
            names.append(type(fn).__name__)
    return names


def leaf_hints(pipeline: beam.Pipeline) -> dict[str, dict]:
    proto = pipeline.to_runner_api()
    envs = proto.components.environments
    return {
        t.unique_name: dict(envs[t.environment_id].resource_hints) if t.environment_id else {}
        for t in proto.components.transforms.values()
        if not t.subtransforms
    }


def test_filter_translates_with_a_gpu_on_the_scoring_step_only():
    cfg = from_dict(
        FilterConfig,
        {
            "model": {
                "name": "ViT-B-32",
                "pretrained": "laion2b_s34b_b79k",
                "accelerator": ACCELERATOR,
                "model_copies": 1,
            },
            "threshold": 0.28,
            "write": {"path": "gs://demo-bucket/filtered"},
        },
    )
    p = dataflow_pipeline()
    _ = p | "Filter" >> Filter(cfg, ["gs://demo-bucket/in/00000.tar", "gs://demo-bucket/in/00001.tar"])
    result = p.run()
    assert result.state == "DONE"  # translated (every DoFn pickled), not submitted
    hints = leaf_hints(p)
    gpu = {name for name, h in hints.items() if h.get("beam:resources:accelerator:v1") == ACCELERATOR.encode()}
    assert gpu and all("ScoreWithClip" in name for name in gpu)
    assert any("RewriteShard" in name for name in hints) and not any("RewriteShard" in name for name in gpu)


def test_ingest_translates_for_dataflow(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("https://example.com/a.jpg\n")
    # resume off: a real run lists finished shards in the bucket first, which needs GCS
    cfg = from_dict(
        IngestConfig, {"read": {"path": str(urls)}, "write": {"path": "gs://demo-bucket/shards", "resume": False}}
    )
    p = dataflow_pipeline()
    _ = p | "Ingest" >> Ingest(cfg)
    assert p.run().state == "DONE"
    names = set(leaf_hints(p))
    # per_host_rps is set by default: downloads are routed by host (pipelines/ingest.py, PoliteDownload)
    routed = ("PlanShard", "CountPerHost", "FetchRobots", "FetchPartition", "BuildShard")
    for stage in ("ReadUnits", "GroupByShard", *routed, "FindDuplicateImages", "FinalizeShard"):
        assert any(stage in name for name in names), stage


@pytest.mark.parametrize("source", ["dict", "bundled dataflow.yaml"])
def test_build_translates_with_every_stage_and_gpus_only_on_model_steps(tmp_path, source):
    from visinstruct.configs import CONFIG_DIR, BuildConfig, load
    from visinstruct.pipelines.build import Build

    urls = tmp_path / "urls.txt"
    urls.write_text("https://example.com/a.jpg\n")
    if source == "dict":
        cfg = from_dict(
            BuildConfig,
            {
                "out": "gs://demo-bucket/dataset",
                "ingest": {"read": {"path": str(urls)}, "write": {"resume": False}},
                "filter": {"model": {"name": "ViT-B-32", "accelerator": ACCELERATOR}, "threshold": 0.28},
                "generate": {
                    "backend": "vllm",
                    "model": "Qwen/Qwen2.5-7B-Instruct",
                    "vllm": {"accelerator": ACCELERATOR},
                },
            },
        )
    else:  # what the README tells Dataflow users to run (a local URL list: the dry run reads no bucket)
        overrides = [f"ingest.read.path={urls}", "ingest.write.resume=false"]
        cfg = load(BuildConfig, CONFIG_DIR / "build" / "dataflow.yaml", overrides)
        assert cfg.filter.model.accelerator and cfg.generate.vllm.accelerator and cfg.generate.backend == "vllm"
    p = dataflow_pipeline()
    _ = p | "Build" >> Build(cfg)
    assert p.run().state == "DONE"
    hints = leaf_hints(p)
    for stage in (
        "Ingest/",
        "FetchPartition",  # per_host_rps is set: downloads are routed by host
        "Filter/",
        "ScoreWithClip",
        "Generate/",
        "GenerateWithLLM",
        "RewriteShard",
    ):
        assert any(stage in name for name in hints), stage
    gpu = {name for name, h in hints.items() if h.get("beam:resources:accelerator:v1")}
    assert gpu and all("ScoreWithClip" in name or "GenerateWithLLM" in name for name in gpu)
    dofns = unpickled_dofns(p)  # every DoFn comes back from its pickle, ours among them
    ours_all = (
        "PlanShard",
        "FetchPartition",
        "BuildShard",
        "FinalizeShard",
        "ReadShardSamples",
        "DecodeForClip",
        "PlanSamples",
        "RewriteShard",
    )
    for ours in ours_all:
        assert ours in dofns, (ours, sorted(set(dofns)))
