"""``visinstruct curate``: drop unusable pairs, each with its reason; repair mojibake, record NSFW scores and faces.

Graph (element shapes in comments; the image branch runs only when a check needs a model)::

    tar paths -> ReadShardSamples -> ((path, key), (image bytes, caption))
      -> DecodeForClip(open_nsfw) -> RunInference(NSFW) -> (path, (key, score)); ((path, key), embedding)
      -> DecodeForClip(CLIP) -> RunInference(CLIP) -> ((path, key), embedding)       (semdedup.embedding: clip)
    embeddings -> benchmark embedding check -> (path, (key, Decision))
    embeddings of samples no other check drops -> SemDeDup -> (path, (key, Decision))
    (scores, decisions, rejections, paths) -> CoGroupByKey(path) -> RewriteShard(curate judge) -> ShardStats

Only small records (scores, embeddings, decisions) are grouped; each shard is rewritten by re-reading its tar,
where the judge (:mod:`visinstruct.transforms.curate_stages`) also checks captions, conversations, pHashes and
faces. Dead letters go to ``rejected/curate-*.parquet``; every input row keeps its index row.
"""

from __future__ import annotations

from functools import partial

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from visinstruct.configs import ClipModelConfig, CurateConfig
from visinstruct.configs.curate import DecontaminateConfig
from visinstruct.pipelines.options import pipeline_options
from visinstruct.pipelines.report import (
    check_inputs,
    counter_value,
    dead_letter_reasons,
    input_rows,
    summarize,
    write_report,
)
from visinstruct.transforms.curate_stages import (
    DECONTAM_STAGE,
    FACES_BLURRED,
    FIXED_MOJIBAKE,
    STAGE,
    benchmark_image_check,
    caption_passes,
    decontam_shard_judge,
    nsfw_dropped,
    reference_matrix,
    shard_judge,
)
from visinstruct.transforms.filter_stages import (
    DecodeForClip,
    ReadShardSamples,
    SplitUnscored,
    failed_batch_rejections,
)
from visinstruct.transforms.rewrite_stage import RewriteShard
from visinstruct.transforms.text_quality import unknown_languages

COUNTERS = (FIXED_MOJIBAKE, FACES_BLURRED, "semdedup_comparisons", "semdedup_clusters", "semdedup_splits")


def checks_benchmark_embeddings(cfg: CurateConfig) -> bool:
    """Whether images are compared with benchmark images by embedding (some benchmark has images, a threshold)."""
    contamination = cfg.decontaminate
    return bool(contamination and contamination.embedding_threshold is not None) and any(
        b.images for b in contamination.benchmarks
    )


def embedding_kind(cfg: CurateConfig) -> str | None:
    """Which image embedding the stage computes: semantic dedup's choice, else open_nsfw's features when the
    benchmark embedding check needs one; ``None`` when nothing needs an embedding."""
    if cfg.semdedup is not None:
        return cfg.semdedup.embedding
    contamination = cfg.decontaminate
    if (
        contamination
        and contamination.embedding_threshold is not None
        and any(b.images for b in contamination.benchmarks)
    ):
        return "open_nsfw"
    return None


def runs_nsfw(cfg: CurateConfig) -> bool:
    """Whether the NSFW model runs: for its score, or for its features as the embedding."""
    scoring = cfg.safety is not None and cfg.safety.nsfw_threshold is not None
    return scoring or embedding_kind(cfg) == "open_nsfw"


class EmbedImages(beam.PTransform):
    """``((path, key), (image bytes, caption))`` -> ``((path, key), output)`` from one RunInference model;
    tagged side ``rejected``: ``(path, Rejection)`` (damaged images, failed batches, unscored examples)."""

    def __init__(self, handler, preprocess, threads: int, accelerator: str | None = None, text: bool = False):
        super().__init__()
        self.handler, self.preprocess, self.threads = handler, preprocess, threads
        self.accelerator, self.text = accelerator, text

    def expand(self, samples):
        decoded = samples | "Decode" >> beam.ParDo(DecodeForClip(self.preprocess, self.threads, STAGE)).with_outputs(
            "rejected", main="images"
        )
        if self.text:  # CLIP's (image, text) examples: no caption, only the image embedding is used
            examples = decoded.images | "NoCaption" >> beam.MapTuple(lambda k, example: (k, (example[0], "")))
        else:  # ((path, key), (array, caption)) -> ((path, key), array)
            examples = decoded.images | "ImageOnly" >> beam.MapTuple(lambda k, example: (k, example[0]))
        inference = RunInference(KeyedModelHandler(self.handler))
        if self.accelerator:
            inference = inference.with_resource_hints(accelerator=self.accelerator)
        results, failed = examples | "Infer" >> inference.with_exception_handling()
        outputs = (
            results
            | "Unwrap" >> beam.MapTuple(lambda k, result: (k, result.inference))
            | "SplitUnscored" >> beam.ParDo(SplitUnscored(STAGE)).with_outputs("rejected", main="scored")
        )
        failures = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(failed_batch_rejections, stage=STAGE)
        rejected = (decoded.rejected, outputs.rejected, failures) | "Rejected" >> beam.Flatten()
        return outputs.scored, rejected


def nsfw_model(cfg: CurateConfig):
    """The NSFW handler (with its pooled features when they are the stage's embedding) and its preprocessing."""
    from visinstruct.configs import SafetyConfig
    from visinstruct.transforms.nsfw import NsfwHandler, nsfw_preprocess

    safety = cfg.safety or SafetyConfig(nsfw_threshold=None, faces=False)
    return NsfwHandler(safety, with_embeddings=embedding_kind(cfg) == "open_nsfw"), nsfw_preprocess, safety


def clip_model(cfg: CurateConfig) -> ClipModelConfig:
    if cfg.semdedup is None or cfg.semdedup.model is None:
        raise ValueError("curate: semdedup.embedding clip needs semdedup.model (a build takes the filter's model)")
    return cfg.semdedup.model


class ReferenceEmbeddings(beam.PTransform):
    """The benchmarks' images embedded by the stage's model: ``PBegin`` -> one ``decontam.ReferenceEmbeddings``."""

    def __init__(self, cfg: CurateConfig):
        super().__init__()
        self.cfg = cfg

    def expand(self, pbegin):
        from visinstruct.transforms.decontam import read_reference, reference_files

        files = [
            (b.name, path) for b in self.cfg.decontaminate.benchmarks if b.images for path in reference_files(b.images)
        ]
        images = (
            pbegin
            | "ReferenceFiles" >> beam.Create(files)
            | "SpreadFiles" >> beam.Reshuffle()
            | "ReferenceImages"
            >> beam.FlatMapTuple(lambda name, path: (((name, ref), (data, "")) for ref, data in read_reference(path)))
        )
        embedded, _ = images | "EmbedReferences" >> image_embeddings(self.cfg)
        return (
            embedded
            | "Rows" >> beam.MapTuple(lambda k, output: (k[0], k[1], embedding_of(output)))
            | "All" >> beam.combiners.ToList()
            | "Matrix" >> beam.Map(reference_matrix)
        )


def image_embeddings(cfg: CurateConfig) -> EmbedImages:
    """The model that gives the stage's image embedding (``embedding_kind``), as an :class:`EmbedImages`."""
    if embedding_kind(cfg) == "clip":
        from visinstruct.transforms.clip import make_handler

        model = clip_model(cfg)
        handler = make_handler(model, with_embeddings=True, stage=STAGE)
        return EmbedImages(handler, handler.preprocessor(), model.decode_threads, model.accelerator, text=True)
    handler, preprocess, safety = nsfw_model(cfg)
    return EmbedImages(handler, preprocess, safety.decode_threads)


def embedding_of(output) -> np.ndarray:
    """The image embedding of a model output (the NSFW model's features, or CLIP's image embedding)."""
    vector = getattr(output, "image_embedding", None)
    return np.asarray(output.embedding if vector is None else vector, dtype=np.float32)


class CurateShards(beam.PTransform):
    """Tar paths -> ``ShardStats`` of the shards written (``write.path``; it may be the input folder itself)."""

    def __init__(self, cfg: CurateConfig, positions: dict[str, int] | None = None):
        super().__init__()
        if cfg.write is None or not cfg.write.path:
            raise ValueError("curate needs write.path (the output folder)")
        if cfg.text and cfg.text.languages and (unknown := unknown_languages(cfg.text.languages)):
            raise ValueError(f"curate: text.languages {unknown} are not languages py3langid knows (ISO 639-1)")
        if embedding_kind(cfg) == "clip":
            clip_model(cfg)
        self.cfg, self.positions = cfg, positions or {}

    def expand(self, paths):
        cfg = self.cfg
        groups = {"paths": paths | "EveryShard" >> beam.Map(lambda p: (p, p))}  # shards with no sample get written
        nsfw, kind = runs_nsfw(cfg), embedding_kind(cfg)
        if nsfw or kind:
            read = paths | "ReadShardSamples" >> beam.ParDo(ReadShardSamples(STAGE)).with_outputs(
                "rejected", main="samples"
            )
            rejected, embeddings = [read.rejected], None
            if nsfw:
                handler, preprocess, safety = nsfw_model(cfg)
                scored, failed = read.samples | "Nsfw" >> EmbedImages(handler, preprocess, safety.decode_threads)
                rejected.append(failed)
                groups["nsfw"] = scored | "NsfwScores" >> beam.MapTuple(lambda k, out: (k[0], (k[1], out.score)))
                if kind == "open_nsfw":
                    embeddings = scored | "NsfwFeatures" >> beam.MapTuple(lambda k, out: (k, embedding_of(out)))
            if kind == "clip":
                scored, failed = read.samples | "Clip" >> image_embeddings(cfg)
                rejected.append(failed)
                embeddings = scored | "ClipFeatures" >> beam.MapTuple(lambda k, out: (k, embedding_of(out)))
            groups["rejections"] = tuple(rejected) | "AllRejected" >> beam.Flatten()
            if embeddings is not None:
                groups["decisions"] = embeddings | "ImageChecks" >> ImageChecks(cfg, read.samples, groups.get("nsfw"))
        return (
            groups
            | "JoinByShard" >> beam.CoGroupByKey()  # (path, {"nsfw": [..], "decisions": [..], ...})
            | "RewriteShard"
            >> beam.ParDo(RewriteShard(STAGE, cfg.write.path, self.positions, partial(shard_judge, cfg, nsfw)))
        )


class ImageChecks(beam.PTransform):
    """``((path, key), embedding)`` -> ``(path, (key, Decision))`` drops: benchmark images by embedding, then
    semantic duplicates among the samples no other image-side check drops (so a duplicate group never loses its
    kept member to a later drop; pHash and conversation benchmark checks run in the writer, and the copies of an
    image they drop are copies of a benchmark image too)."""

    def __init__(self, cfg: CurateConfig, samples, nsfw_scores):
        super().__init__()
        self.cfg, self.samples, self.nsfw_scores = cfg, samples, nsfw_scores

    def expand(self, embeddings):
        cfg, outputs = self.cfg, []
        contamination = cfg.decontaminate
        candidates = embeddings
        if (
            contamination
            and contamination.embedding_threshold is not None
            and any(b.images for b in contamination.benchmarks)
        ):
            references = beam.pvalue.AsSingleton(embeddings.pipeline | "References" >> ReferenceEmbeddings(cfg))
            threshold = cfg.decontaminate.embedding_threshold
            checked = embeddings | "BenchmarkImages" >> beam.Map(
                lambda kv, refs: (kv[0], kv[1], benchmark_image_check(kv[1], refs, threshold)), refs=references
            )
            outputs.append(
                checked
                | "BenchmarkDrops" >> beam.Filter(lambda c: not c[2].kept)
                | "ByShard" >> beam.Map(lambda c: (c[0][0], (c[0][1], c[2])))  # (path, (key, Decision))
            )
            candidates = checked | "NotBenchmark" >> beam.FlatMap(lambda c: [(c[0], c[1])] if c[2].kept else [])
        if cfg.semdedup is not None:
            from visinstruct.transforms.semdedup import SemDeDup

            eligible = self.eligible(candidates)
            outputs.append(eligible | "SemDeDup" >> SemDeDup(cfg.semdedup, STAGE))
        if not outputs:
            return embeddings.pipeline | "NoDrops" >> beam.Create([])
        return tuple(outputs) | "Drops" >> beam.Flatten()

    def eligible(self, embeddings):
        """The embeddings of samples whose caption and NSFW score pass (semantic dedup compares only those)."""
        cfg = self.cfg
        captions = self.samples | "Captions" >> beam.MapTuple(
            lambda k, sample: (k, caption_passes(sample[1], cfg.text))
        )
        joined = {"vector": embeddings, "caption": captions}
        threshold = cfg.safety.nsfw_threshold if cfg.safety else None
        scoring = self.nsfw_scores is not None and threshold is not None
        if scoring:
            joined["nsfw"] = self.nsfw_scores | "KeyScores" >> beam.MapTuple(
                lambda path, ks: ((path, ks[0]), nsfw_dropped(ks[1], threshold))
            )

        def keep(kv):  # one passing caption, and (when scoring) one score under the threshold
            k, g = kv
            ok = list(g["caption"]) == [True] and (not scoring or list(g["nsfw"]) == [False])
            return [(k, v) for v in g["vector"]] if ok else []

        return joined | "JoinChecks" >> beam.CoGroupByKey() | "Eligible" >> beam.FlatMap(keep)


class DecontaminateShards(beam.PTransform):
    """Tar paths -> ``ShardStats``: the benchmark question check over conversations (a build runs it after
    generate, stage ``decontam``, rewriting the shards in place)."""

    def __init__(self, cfg: DecontaminateConfig, out_dir: str, positions: dict[str, int] | None = None):
        super().__init__()
        self.cfg, self.out_dir, self.positions = cfg, out_dir, positions or {}

    def expand(self, paths):
        make_judge = partial(decontam_shard_judge, self.cfg)
        return (
            paths
            | "ByShard" >> beam.Map(lambda p: (p, {}))  # the judge needs nothing grouped
            | "RewriteShard" >> beam.ParDo(RewriteShard(DECONTAM_STAGE, self.out_dir, self.positions, make_judge))
        )


class Curate(beam.PTransform):
    """The whole curation stage over a list of tars: ``PBegin`` -> ``ShardStats``."""

    def __init__(self, cfg: CurateConfig, inputs: list[str]):
        super().__init__()
        self.cfg, self.inputs = cfg, inputs
        self.shards = CurateShards(cfg, {path: i for i, path in enumerate(inputs)})

    def expand(self, pbegin):
        return (
            pbegin
            | "Shards" >> beam.Create(self.inputs)
            | "SpreadShards" >> beam.Reshuffle()
            | "CurateShards" >> self.shards
        )


def curation_summary(out_dir: str) -> dict:
    """NSFW score quantiles and face counts from the indexes (every row the stage scored, kept or dropped)."""
    from visinstruct.pipelines.report import column_values, quantiles

    scores = [s for s in column_values(out_dir, "nsfw_score") if s is not None]
    faces = [f for f in column_values(out_dir, "faces") if f is not None]
    return {
        "nsfw": quantiles(scores),
        "faces": {"images_checked": len(faces), "images_with_faces": sum(1 for f in faces if f), "faces": sum(faces)},
    }


def add_curation(report: dict, result, out_dir: str) -> dict:
    """A run report's curation figures: counters, NSFW distribution, faces, and each reason's rate."""
    for name in COUNTERS:
        report[name] = counter_value(result, STAGE, name) or 0
    report.update(curation_summary(out_dir))
    return report


def curate_rates(report: dict, out_dir: str) -> dict:
    """A standalone run's drops by reason and their rates over the rows that reached curation (the dead letters of
    this stage, not the reasons earlier stages rejected rows for)."""
    dropped = dict(dead_letter_reasons(out_dir)[STAGE].most_common())
    into = report["written"] + sum(dropped.values())
    report["dropped_by_reason"] = dropped
    report["rate_by_reason"] = {r: round(n / into, 4) for r, n in dropped.items()} if into else {}
    return report


def run(cfg: CurateConfig, inputs: list[str], beam_args: list[str] | None = None) -> dict:
    """Run curation over tar paths; returns the run report (reasons, NSFW distribution, faces, repairs)."""
    if cfg.write is None or not cfg.write.path:
        raise ValueError("curate needs write.path (the output folder)")
    rows_before = input_rows(inputs)  # read before the run: it may rewrite these shards in place
    p = beam.Pipeline(options=pipeline_options(beam_args))
    _ = p | "Curate" >> Curate(cfg, inputs)
    result = p.run()
    result.wait_until_finish()
    report = check_inputs(summarize(cfg.write.path, stage=STAGE, result=result), rows_before, len(inputs))
    add_curation(report, result, cfg.write.path)
    curate_rates(report, cfg.write.path)
    write_report(cfg.write.path, report)
    return report
