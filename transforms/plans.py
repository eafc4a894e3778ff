"""What generation asks for one sample: its plan, a part per kind, in one or two passes. Plain functions, no Beam.

A sample gets ``per_image`` kinds, drawn by weight per key (:func:`~visinstruct.transforms.prompts.choose_kinds`);
each is a :class:`Part` with its own request and seed, and the kept parts' turns join into one multi-turn row, as
LLaVA-665k's rows mix kinds. Kinds whose template says ``image: true`` see the image (:class:`PreparedImage`).

With ``recaption_first`` there are two passes: the image is re-captioned first (the ``recaption`` kind; a part of
its own that is not written unless ``recaption`` was drawn too), and the text-only kinds are asked afterwards,
reading the kept re-caption in place of the web caption (:func:`after_recaption`). Their parts start without a
request (``request is None``): the handler builds it once the re-caption is in (:func:`make_request`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace

from visinstruct.configs import GenerateConfig
from visinstruct.schemas import Decision, SampleMeta
from visinstruct.transforms.llm_openai import ChatRequest
from visinstruct.transforms.prompts import KindTemplate, Templates, build_messages, choose_kinds, derive_seed, pick
from visinstruct.transforms.vision import PreparedImage

RECAPTION = "recaption"


@dataclass(frozen=True)
class Part:
    """One kind asked about one sample.

    Attributes:
        kind: The template kind.
        format: ``qa`` or ``description``.
        question: The instruction a description kind answers (drawn per sample), else None.
        sees_image: Whether the kind sees the image.
        seed: The part's sampling seed.
        request: What to ask; None for a second-pass part until the re-caption is in.
        written: False for the re-caption asked first only to feed the text-only kinds (not one of the drawn kinds).
        context: The metadata this part's reply is checked against (the sample's, or the re-captioned one).
    """

    kind: str
    format: str
    question: str | None
    sees_image: bool
    seed: int
    request: ChatRequest | None
    written: bool = True
    context: SampleMeta | None = None


@dataclass(frozen=True)
class Plan:
    """One sample's generation job: where it comes from, its parts in order, and the image its vision kinds see."""

    path: str
    key: str
    meta: SampleMeta
    parts: tuple[Part, ...]
    image: PreparedImage | None = None

    @property
    def kind(self) -> str:
        return "+".join(p.kind for p in self.parts if p.written)

    @classmethod
    def single(
        cls,
        path: str,
        meta: SampleMeta,
        request: ChatRequest,
        kind: str = "conversation",
        format: str = "qa",
        question: str | None = None,
    ) -> Plan:
        """A plan of one part that asks ``request`` as it is (tests, benchmarks, callers with their own prompts)."""
        part = Part(kind, format, question, request.image is not None, request.seed or 0, request)
        return cls(path, meta.key, meta, (part,), request.image)


def check_kinds(cfg: GenerateConfig, templates: Templates) -> None:
    """Refuse, before a run, kinds the template file lacks and two-pass runs without a ``recaption`` kind."""
    source = cfg.templates or "the bundled file"
    unknown = set(cfg.kinds) - set(templates.kinds)
    if unknown:
        raise ValueError(f"kinds {sorted(unknown)} have no template in {source}")
    if cfg.recaption_first and RECAPTION not in templates.kinds:
        raise ValueError(f"recaption_first needs a '{RECAPTION}' kind in {source}")
    if cfg.recaption_first and not templates.kinds[RECAPTION].image:
        raise ValueError(f"recaption_first needs the '{RECAPTION}' kind to see the image (image: true) in {source}")
    weighted = [k for k, w in cfg.kinds.items() if w > 0]
    if cfg.per_image > len(weighted):
        raise ValueError(f"per_image {cfg.per_image} asks for more kinds per image than the {len(weighted)} weighted")
    recaptions = cfg.recaption_first or RECAPTION in weighted
    if cfg.recaption_caption != "keep" and not recaptions:
        raise ValueError(f"recaption_caption: {cfg.recaption_caption} needs a '{RECAPTION}' kind or recaption_first")
    if cfg.grounding is not None and not needs_image(cfg, templates):
        raise ValueError("grounding scores replies of kinds that see the image, and none of these kinds does")
    if cfg.grounding is not None and cfg.grounding.model is not None:
        ignored = ignored_model_keys(cfg.grounding.model)
        if ignored:
            raise ValueError(
                f"grounding.model.{ignored[0]} has no effect (the scorer runs inside generation): remove it"
            )
    if cfg.grounding is not None and cfg.grounding.model is None:
        raise ValueError(
            "generate.grounding.model names the CLIP that scores replies (in a build, null takes the filter's)"
        )
    if cfg.backend == "caption_only" and needs_image(cfg, templates):
        raise ValueError("kinds that see the image need a vision model: backend caption_only runs none")


# The filter's RunInference keys, which the grounding scorer (inside the generation handler) does not use.
_SCORER_IGNORES = ("min_batch_size", "large_model", "model_copies", "decode_threads", "accelerator")


def scorer_defaults() -> dict:
    """Those keys at their defaults (a build's grounding check takes the filter's model without them)."""
    from visinstruct.configs import ClipModelConfig

    default = ClipModelConfig()
    return {k: getattr(default, k) for k in _SCORER_IGNORES}


def ignored_model_keys(model) -> list[str]:
    """Keys of a grounding ``model`` section set away from their defaults that the scorer would ignore."""
    return [k for k, default in scorer_defaults().items() if getattr(model, k) != default]


def needs_image(cfg: GenerateConfig, templates: Templates) -> bool:
    """Whether any kind of this config may see an image (so the backend must be a vision model)."""
    drawn = [k for k, w in cfg.kinds.items() if w > 0]
    return cfg.recaption_first or any(templates.kinds[k].image for k in drawn)


def make_request(template: KindTemplate, meta: SampleMeta, cfg: GenerateConfig, seed: int, image) -> ChatRequest:
    """The chat request of one kind for ``meta`` (raises ``UnicodeEncodeError`` for a prompt no backend can send)."""
    messages = build_messages(template, meta)
    json.dumps(messages, ensure_ascii=False).encode("utf-8")  # lone surrogates from JSON escapes: this sample's fault
    return ChatRequest(
        key=meta.key,
        messages=messages,
        max_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        seed=seed,
        image=image if template.image else None,
    )


def part_seed(cfg: GenerateConfig, key: str, index: int, kind: str) -> int:
    """The first part keeps the seed single-kind plans always had; others derive theirs from their kind."""
    return derive_seed(cfg.seed, key) if index == 0 else derive_seed(cfg.seed, key, f"part:{kind}")


def part_kinds(key: str, cfg: GenerateConfig, templates: Templates) -> list[tuple[str, bool]]:
    """The kinds asked for ``key`` in order, each with whether its turns are written.

    In two-pass runs the re-caption goes first; it is asked even when not drawn (then not written) when a drawn kind
    is text-only and so reads it.
    """
    drawn = choose_kinds(key, cfg.kinds, cfg.seed, cfg.per_image)
    if not cfg.recaption_first:
        return [(k, True) for k in drawn]
    rest = [k for k in drawn if k != RECAPTION]
    feeds = any(not templates.kinds[k].image for k in rest)
    first = [(RECAPTION, RECAPTION in drawn)] if RECAPTION in drawn or feeds else []
    return first + [(k, True) for k in rest]


def sample_sees_image(key: str, cfg: GenerateConfig, templates: Templates) -> bool:
    """Whether one of the kinds asked for ``key`` sees the image (so its image must be prepared)."""
    return any(templates.kinds[k].image for k, _ in part_kinds(key, cfg, templates))


def plan_parts(
    path: str, meta: SampleMeta, cfg: GenerateConfig, templates: Templates, image: PreparedImage | None
) -> Plan | Decision[SampleMeta]:
    """The sample's plan: its kinds as parts (:func:`part_kinds`), or a drop when a prompt cannot be encoded."""
    parts = []
    try:
        for i, (kind, written) in enumerate(part_kinds(meta.key, cfg, templates)):
            template = templates.kinds[kind]
            seed = part_seed(cfg, meta.key, i, kind)
            second_pass = cfg.recaption_first and not template.image
            question = (
                pick(template.questions, meta.key, cfg.seed, "question") if template.format == "description" else None
            )
            request = None if second_pass else make_request(template, meta, cfg, seed, image)
            parts.append(Part(kind, template.format, question, template.image, seed, request, written))
    except UnicodeEncodeError as e:
        return Decision.drop("bad_characters", f"the prompt cannot be encoded: {e}")
    return Plan(path, meta.key, meta, tuple(parts), image)


def after_recaption(meta: SampleMeta, recaption: str) -> SampleMeta:
    """What the text-only kinds of a two-pass run read: the re-caption as the only caption (boxes and tags kept)."""
    return replace(meta, caption=recaption, captions=[])


def second_pass_part(
    part: Part, template: KindTemplate, meta: SampleMeta, recaption: str, cfg: GenerateConfig
) -> Part:
    """A second-pass part with its request, built from the kept re-caption."""
    context = after_recaption(meta, recaption)
    return replace(part, request=make_request(template, context, cfg, part.seed, None), context=context)


def with_caption(meta: SampleMeta, recaption: str | None, mode: str) -> SampleMeta:
    """The sample's captions once a re-caption is kept (``generate.recaption_caption``): keep, replace, extend."""
    if recaption is None or mode == "keep":
        return meta
    if mode == "replace":
        return replace(meta, caption=recaption, captions=[c for c in [meta.caption, *meta.captions] if c])
    return replace(meta, captions=[*meta.captions, recaption])
