"""Grounding checker: score each object a caption mentions against the image with an open_clip model.

A checker knows one world (:attr:`GroundingChecker.world`): the shipped one was trained on the shapes world and
says nothing true about the everyday world's images (the default model's); :func:`truth_mentions` judges a
caption of a bundled example against its ground truth instead.

The default checker is a small open_clip CLIP trained by ``python -m toyworld toy train-checker`` on the
synthetic world (shipped in ``vlm_guard/assets/checker``: ``open_clip_config.json`` +
``open_clip_model.safetensors`` + the word tokenizer). It is trained with a sigmoid (SigLIP-style)
loss on "a {object}" prompts, so ``sigmoid(scale * cos + bias)`` is the probability that the object
is in the image. For real images, ``GroundingChecker.from_open_clip(name, pretrained)`` wraps any
open_clip model whose weights you have locally; without a learned bias its score is the raw cosine
similarity, flagged below ``threshold`` (a heuristic: calibrate it on your data).

Example:
    >>> from vlm_guard.synthetic.world import Scene, SceneObject, render
    >>> image = render(Scene((SceneObject("house", "red", "big", 0, 0),)))   # a toy scene with one house
    >>> checker = GroundingChecker.default()
    >>> for mention in checker.check(image, "a big red house , a small green tree ."):
    ...     print(mention.word, mention.object, round(mention.score, 1), mention.flagged)
    house house 1.0 False
    tree tree 0.0 True
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlm_guard.eval.chair import ChairVocabulary

logger = logging.getLogger(__name__)

DEFAULT_CHECKER_DIR = Path(__file__).resolve().parent.parent / "assets" / "checker"
"""Folder of the shipped toy checker (open_clip ``local-dir:`` layout)."""

COCO_OBJECTS: tuple[str, ...] = ChairVocabulary.load().categories
"""Default vocabulary for real images: the 80 COCO categories, from the CHAIR data shipped with the package."""


@dataclass(frozen=True)
class Mention:
    """One object mention in a caption and its grounding score.

    Attributes:
        word: the word(s) as written in the caption.
        object: the canonical object name it maps to.
        score: presence probability (checkers with a learned bias) or cosine similarity (plain CLIP).
        flagged: True when ``score < threshold``: the mention is risky (possibly hallucinated).
    """

    word: str
    object: str
    score: float
    flagged: bool
    source: str = "checker"
    """``"checker"`` (scored by a grounding checker) or ``"ground truth"`` (a bundled example's objects)."""


TRUTH = "ground truth"


def truth_mentions(
    caption: str,
    objects: Sequence[str],
    mentions_with_words: Callable[[str], list] | None = None,
    vocabulary: Sequence[str] = (),
) -> list[Mention]:
    """Mentions of ``caption`` judged against an image's known ``objects`` (a bundled example's ground truth): a
    mentioned object in ``objects`` is grounded (score 1), any other is flagged (score 0).

    Args:
        mentions_with_words: the world's own mention parser (``(word, object)`` pairs, synonyms included), else
            :func:`find_mentions` over ``vocabulary`` and ``objects``.
    """
    present = set(objects)
    found = (
        mentions_with_words(caption)
        if mentions_with_words is not None
        else find_mentions(caption, sorted(set(vocabulary) | present))
    )
    return [Mention(word, name, 1.0 if name in present else 0.0, name not in present, TRUTH) for word, name in found]


def world_of_vocabulary(vocabulary: Sequence[str]) -> str | None:
    """The synthetic world whose object types are exactly ``vocabulary`` (``"shapes"``, ``"everyday"``), or None."""
    from vlm_guard.synthetic.worlds import WORLD_NAMES, world_kind

    for name in WORLD_NAMES:
        if set(world_kind(name).object_types) == set(vocabulary):
            return name
    return None


def find_mentions(caption: str, vocabulary: Sequence[str]) -> list[tuple[str, str]]:
    """``(word as written, object)`` for each vocabulary object (singular or simple plural) in ``caption``."""
    found: list[tuple[int, str, str]] = []
    spans: list[tuple[int, int]] = []
    for name in sorted(vocabulary, key=len, reverse=True):  # longest first: "hot dog" before "dog"
        pattern = r"\b(" + re.escape(name) + r"(?:s|es)?)\b"
        for match in re.finditer(pattern, caption, flags=re.IGNORECASE):
            if any(start <= match.start() < end for start, end in spans):
                continue
            spans.append(match.span())
            found.append((match.start(), match.group(1), name))
    return [(word, name) for _, word, name in sorted(found)]


class GroundingChecker:
    """Scores caption mentions against an image with a CLIP-style model.

    Args:
        model: an open_clip CLIP model (``encode_image`` / ``encode_text``).
        preprocess: PIL image -> tensor ``[3, H, W]``.
        tokenize: list of strings -> token ids ``[n, context]``.
        vocabulary: object names to look for in captions.
        prompt: text template with one ``{}`` for the object name.
        threshold: mentions scoring below it are flagged.
        world: the synthetic world the checker was trained on (``"shapes"``, ``"everyday"``), None for a checker of
            real images; its verdicts mean nothing on another world's images (:meth:`knows_world`).
    """

    def __init__(
        self,
        model,
        preprocess: Callable,
        tokenize: Callable,
        vocabulary: Sequence[str],
        prompt: str = "a photo of a {}",
        threshold: float | None = None,
        device: str = "cpu",
        world: str | None = None,
    ):
        if "{}" not in prompt:
            raise ValueError(f"prompt must contain '{{}}' for the object name, got {prompt!r}")
        if not vocabulary:
            raise ValueError("vocabulary is empty; pass the object names to look for")
        self.model = model.to(device).eval()
        self.preprocess, self.tokenize = preprocess, tokenize
        self.vocabulary, self.prompt, self.device = tuple(vocabulary), prompt, device
        self.calibrated = getattr(model, "logit_bias", None) is not None
        self.threshold = threshold if threshold is not None else (0.5 if self.calibrated else 0.2)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.world = world

    def knows_world(self, world: str | None) -> bool:
        """Whether this checker can judge images of ``world`` (a synthetic world's name, None for real images)."""
        return self.world == world

    # ---- constructors ---------------------------------------------------------------------------------------
    @classmethod
    def default(cls, device: str = "cpu", threshold: float | None = None) -> GroundingChecker:
        """The checker trained on the synthetic world and shipped with the package."""
        return cls.from_folder(DEFAULT_CHECKER_DIR, device=device, threshold=threshold)

    @classmethod
    def from_folder(cls, folder: str | Path, device: str = "cpu", threshold: float | None = None):
        """Load a checker written by ``python -m toyworld toy train-checker`` (open_clip ``local-dir:`` layout)."""
        import open_clip

        folder = Path(folder)
        config_path = folder / "open_clip_config.json"
        if not config_path.exists():
            raise FileNotFoundError(
                f"no open_clip_config.json in {folder}; train one with `python -m toyworld toy train-checker --ship`"
            )
        config = json.loads(config_path.read_text())
        model = open_clip.create_model(f"local-dir:{folder}", device=device)
        checker_cfg = config.get("vlm_guard", {})
        tokenize = WordTokenizer(folder / "tokenizer.json", config["model_cfg"]["text_cfg"]["context_length"])
        preprocess = ToyPreprocess(
            config["preprocess_cfg"]["size"], config["preprocess_cfg"]["mean"], config["preprocess_cfg"]["std"]
        )
        vocabulary = checker_cfg.get("vocabulary", [])
        world = checker_cfg.get("world") or world_of_vocabulary(vocabulary)  # the shipped one: the shapes world
        return cls(
            model,
            preprocess,
            tokenize,
            vocabulary,
            prompt=checker_cfg.get("prompt", "a {}"),
            threshold=threshold,
            device=device,
            world=world,
        )

    @classmethod
    def from_open_clip(
        cls,
        name: str,
        pretrained: str | None = None,
        vocabulary: Sequence[str] = COCO_OBJECTS,
        prompt: str = "a photo of a {}",
        threshold: float | None = None,
        device: str = "cpu",
    ):
        """Any open_clip model, e.g. ``("ViT-B-32", "laion2b_s34b_b79k")``; its weights must be available
        locally (open_clip's cache or a file path as ``pretrained``), otherwise open_clip tries to download them."""
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=pretrained, device=device)
        tokenizer = open_clip.get_tokenizer(name)
        return cls(model, preprocess, tokenizer, vocabulary, prompt=prompt, threshold=threshold, device=device)

    # ---- scoring --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _text_features(self, names: Sequence[str]) -> torch.Tensor:
        missing = [n for n in names if n not in self._text_cache]
        if missing:
            tokens = self.tokenize([self.prompt.format(n) for n in missing]).to(self.device)
            features = self.model.encode_text(tokens, normalize=True)
            for n, f in zip(missing, features):
                self._text_cache[n] = f
        return torch.stack([self._text_cache[n] for n in names])  # [objects, embed]

    @torch.no_grad()
    def scores(self, image, objects: Sequence[str]) -> list[float]:
        """Presence score of each object name for ``image`` (PIL)."""
        if not objects:
            return []
        pixels = self.preprocess(image).unsqueeze(0).to(self.device)
        image_features = self.model.encode_image(pixels, normalize=True)  # [1, embed]
        cosine = (image_features @ self._text_features(objects).T)[0]  # [objects]
        if self.calibrated:
            logits = self.model.logit_scale.exp() * cosine + self.model.logit_bias
            return torch.sigmoid(logits).tolist()
        return cosine.tolist()

    def check(self, image, caption: str) -> list[Mention]:
        """Every vocabulary object mentioned in ``caption``, scored against ``image``, in caption order."""
        mentions = find_mentions(caption, self.vocabulary)
        values = self.scores(image, [name for _, name in mentions])
        return [Mention(word, name, float(s), float(s) < self.threshold) for (word, name), s in zip(mentions, values)]


class WordTokenizer:
    """Word-level tokenizer (a ``tokenizers`` JSON file) producing open_clip-style fixed-length ids with EOS."""

    def __init__(self, path: str | Path, context_length: int):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(path))
        self.context_length = context_length
        self.eos_id = self.tokenizer.token_to_id("</s>")
        self.pad_id = self.tokenizer.token_to_id("<pad>")

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        texts = [texts] if isinstance(texts, str) else list(texts)
        ids = torch.full((len(texts), self.context_length), self.pad_id, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = self.tokenizer.encode(text).ids[: self.context_length - 1] + [self.eos_id]
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids


class ToyPreprocess:
    """Nearest-neighbour resize to ``size`` and normalisation (keeps the synthetic images' pixels exact)."""

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        self.size = size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, image) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        image = image.convert("RGB")
        if image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.NEAREST)
        array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]
        return (array - self.mean) / self.std


__all__ = [
    "COCO_OBJECTS",
    "DEFAULT_CHECKER_DIR",
    "TRUTH",
    "GroundingChecker",
    "Mention",
    "find_mentions",
    "truth_mentions",
    "world_of_vocabulary",
]
