"""CHAIR: Caption Hallucination Assessment with Image Relevance (Rohrbach et al., EMNLP 2018).

An object word in a generated caption is *hallucinated* when its COCO category is not among the image's
ground-truth objects: the categories of its COCO instance annotations plus the categories mentioned in its
reference captions. Over a set of captions:

- CHAIR_S = captions with at least one hallucinated mention / captions;
- CHAIR_I = hallucinated mentions / all object mentions (repeated mentions count each time);
- recall  = ground-truth categories mentioned (per caption, summed) / ground-truth categories (summed);
- mean_length = mean number of words per caption.

All are fractions (papers print them x100). The vocabulary (80 COCO categories, their synonyms and the two-word
rules) is the released one, shipped verbatim in ``data/chair_synonyms.json``; the matching follows the released
``utils/chair.py``:

1. lower-case and tokenise; singularise each token;
2. merge two-word expressions left to right: COCO double words ("hot dog", "teddy bear", "traffic light"...),
   "baby X"/"adult X" -> X for animal words (so "baby elephant" is an elephant, not a person), "passenger jet"/
   "passenger train" -> "jet"/"train", "bow tie" -> "tie", "toilet seat" -> "toilet"; expressions that are not
   objects ("train track", "home plate") are consumed and dropped, so "train tracks" does not mention a train;
3. if the caption contains both "toilet" and "seat", drop "seat" (a toilet seat is not a chair);
4. keep the words in the vocabulary and map each to its category.

Deviations from the released code, all deliberate (see :func:`singularize` and :class:`ChairVocabulary`):

- Singularisation: the original uses ``pattern.en.singularize``, the widely used Python 3 port uses NLTK's
  POS-tagged WordNet lemmatiser. Neither is a dependency here: :func:`singularize` is a small deterministic rule
  set (irregular plurals, -men, -ies, -ves, -es, -s) that only changes a word when the result is a vocabulary
  word. Differences: verb forms are never lemmatised (the WordNet port turns "skiing" into "ski" -> skis,
  "seated" into "seat" -> chair, "bowling" into "bowl"); a plural the rules miss stays unmatched.
- Tokenisation: runs of letters and digits (NLTK's ``word_tokenize`` in the original). Hyphenated words are
  split ("hot-dog" is a hot dog; NLTK keeps "hot-dog" as one unmatched token); "dog's" gives "dog".
- Synonym parsing: the released code splits ``synonyms.txt`` on ``', '`` without stripping, so " motor bike"
  and " cheesecake" (two spaces in the file) and "iPhone" (upper case) can never match. By default entries are
  stripped and lower-cased so they do; ``ChairVocabulary.load(released_quirks=True)`` keeps the released parse.
- mean_length counts word tokens; the released "Len" counts NLTK tokens including punctuation, after two-word
  merging, and is scaled by 0.01.
- An image id missing from the ground truth is an error here; the released code silently scores it against an
  empty object set (every mention hallucinated).

Example:
    >>> [category for _, category in extract_objects("A man eats a hot dog next to two dogs.")]
    ['person', 'hot dog', 'dog']
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

CHAIR_METRIC_NAMES: tuple[str, ...] = ("chair_s", "chair_i", "recall", "mean_length")

COUNT_NAMES: tuple[str, ...] = (
    "n_captions",
    "n_hallucinated_captions",
    "n_hallucinated",
    "n_mentions",
    "n_recalled",
    "n_gt_objects",
    "n_words",
)
"""Column order of :func:`chair_item_counts` (one row per caption)."""

_TOKEN_PATTERN = re.compile(r"[a-z0-9]+")
_COCO_FILE_ID = re.compile(r"(\d+)\.(?:jpg|jpeg|png)$", re.IGNORECASE)

IRREGULAR_PLURALS: Mapping[str, str] = MappingProxyType(
    {
        "people": "person",
        "persons": "person",
        "buses": "bus",
        "men": "man",
        "women": "woman",
        "children": "child",
        "mice": "mouse",
        "geese": "goose",
        "oxen": "ox",
        "feet": "foot",
        "teeth": "tooth",
        "knives": "knife",
        "wolves": "wolf",
        "calves": "calf",
        "halves": "half",
        "leaves": "leaf",
        "loaves": "loaf",
        "shelves": "shelf",
        "wives": "wife",
        "cacti": "cactus",
        "dice": "die",
    }
)
"""Irregular plural -> singular, tried before the suffix rules of :func:`singularize`."""

_INVARIANT_ENDINGS = ("ss", "us", "is")  # glass, bus, tennis: not plurals


def singularize(word: str, known: Iterable[str] | None = None) -> str:
    """Singular form of a lower-case word, by rule (no NLTK / pattern needed).

    With ``known`` (a vocabulary), the word is returned unchanged when it is known, otherwise the first candidate
    singular that is known, otherwise unchanged: a rule can never turn a word into a wrong vocabulary word it
    did not come from. Without ``known``, the first applicable rule's result is returned.

    Rules, in order: irregular table (:data:`IRREGULAR_PLURALS`), "-men" -> "-man", "-ies" -> "-y",
    "-ves" -> "-f" / "-fe", "-es" -> "", "-s" -> "" (not after "ss", "us", "is").

    Args:
        word: A lower-case token.
        known: Optional set of words to accept.

    Returns:
        The singular form (or ``word``).

    Example:
        >>> singularize("ponies"), singularize("buses"), singularize("glass"), singularize("policemen")
        ('pony', 'bus', 'glass', 'policeman')
        >>> singularize("horses", known={"horse"}), singularize("houses", known={"horse"})
        ('horse', 'houses')
    """
    known_set = known if known is None or isinstance(known, (set, frozenset)) else frozenset(known)
    if known_set is not None and word in known_set:
        return word
    candidates: list[str] = []
    if word in IRREGULAR_PLURALS:
        candidates.append(IRREGULAR_PLURALS[word])
    if len(word) > 3 and word.endswith("men"):
        candidates.append(word[:-3] + "man")
    if len(word) > 4 and word.endswith("ies"):
        candidates.append(word[:-3] + "y")
    if len(word) > 3 and word.endswith("ves"):
        candidates.extend([word[:-3] + "f", word[:-3] + "fe"])
    if len(word) > 3 and word.endswith("es"):
        if known_set is not None or word.endswith(("sses", "shes", "ches", "xes", "zes")):
            candidates.append(word[:-2])
    if len(word) > 2 and word.endswith("s") and not word.endswith(_INVARIANT_ENDINGS):
        candidates.append(word[:-1])
    if known_set is None:
        return candidates[0] if candidates else word
    for candidate in candidates:
        if candidate in known_set:
            return candidate
    return word


def tokenize(caption: str) -> list[str]:
    """Lower-case word tokens (runs of letters and digits) of a caption.

    Example:
        >>> tokenize("A hot-dog, and the dog's ball.")
        ['a', 'hot', 'dog', 'and', 'the', 'dog', 's', 'ball']
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}: {caption!r:.80}.")
    return _TOKEN_PATTERN.findall(caption.lower())


@dataclass(frozen=True)
class ChairVocabulary:
    """The CHAIR object vocabulary: synonym -> COCO category, plus the two-word rules.

    Build it with :meth:`load`; the default one is shared (it is immutable).

    Attributes:
        categories: The 80 COCO category names, in the released order.
        word_to_category: Every object word or expression (synonyms and category names) -> category.
        double_words: Two-word expression -> the word it stands for (which may not be an object, e.g.
            "train track", and is then dropped).
        known_tokens: Single tokens the singulariser may produce (object words and parts of two-word
            expressions).
        released_quirks: Whether synonyms were parsed exactly like the released code.
    """

    categories: tuple[str, ...]
    word_to_category: Mapping[str, str]
    double_words: Mapping[str, str]
    known_tokens: frozenset[str] = field(repr=False)
    released_quirks: bool = False

    @classmethod
    def load(cls, released_quirks: bool = False, path: str | os.PathLike | None = None) -> ChairVocabulary:
        """Read the vocabulary JSON (default: the shipped ``vlm_guard/eval/data/chair_synonyms.json``).

        Args:
            released_quirks: Parse synonym lines exactly like the released code (split on ``', '``, no
                stripping or lower-casing, so " motor bike", " cheesecake" and "iPhone" never match).
            path: Another JSON file with the same keys.

        Returns:
            The vocabulary.

        Example:
            >>> ChairVocabulary.load().word_to_category["puppy"]
            'dog'
        """
        if path is None:
            if not released_quirks:
                return _default_vocabulary()
            data = _read_shipped_synonyms()
        else:
            data = _read_json_file(Path(path), what="CHAIR vocabulary")
        return cls.from_dict(data, released_quirks=released_quirks)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], released_quirks: bool = False) -> ChairVocabulary:
        """Build from the dict layout of ``chair_synonyms.json`` (see :meth:`load`)."""
        required = (
            "synonym_lines",
            "coco_double_words",
            "animal_words",
            "animal_qualifiers",
            "vehicle_words",
            "vehicle_qualifiers",
            "double_word_overrides",
        )
        missing = [key for key in required if key not in data]
        if missing:
            raise ValueError(
                f"CHAIR vocabulary data lacks key(s) {missing}; expected the layout of chair_synonyms.json."
            )
        categories: list[str] = []
        word_to_category: dict[str, str] = {}
        for line in data["synonym_lines"]:
            if released_quirks:
                group = line.strip().split(", ")
            else:
                group = [entry.strip().lower() for entry in line.split(",") if entry.strip()]
            if not group or not group[0]:
                raise ValueError(f"Empty synonym line in CHAIR vocabulary: {line!r}.")
            categories.append(group[0])
            for synonym in group:
                word_to_category[synonym] = group[0]
        double_words: dict[str, str] = {word: word for word in data["coco_double_words"]}
        for animal in data["animal_words"]:
            for qualifier in data["animal_qualifiers"]:
                double_words[f"{qualifier} {animal}"] = animal
        for vehicle in data["vehicle_words"]:
            for qualifier in data["vehicle_qualifiers"]:
                double_words[f"{qualifier} {vehicle}"] = vehicle
        double_words.update(data["double_word_overrides"])
        known_tokens = set()
        for expression in list(word_to_category) + list(double_words):
            known_tokens.update(expression.split())
        return cls(
            categories=tuple(categories),
            word_to_category=MappingProxyType(word_to_category),
            double_words=MappingProxyType(double_words),
            known_tokens=frozenset(known_tokens),
            released_quirks=released_quirks,
        )

    def category_of(self, name: str) -> str:
        """Category of a COCO category name or synonym.

        Raises:
            ValueError: If ``name`` is not in the vocabulary.
        """
        try:
            return self.word_to_category[name]
        except KeyError:
            raise ValueError(
                f"{name!r} is not a CHAIR object word; categories are the 80 COCO names "
                f"({', '.join(self.categories[:5])}, ...)."
            ) from None


def _read_json_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {str(path)!r}.")
    try:
        with path.open("r", encoding="utf-8") as handle:
            return json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{what} file {str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); "
            f"it may be truncated: download or regenerate it."
        ) from None
    except UnicodeDecodeError as error:
        raise ValueError(
            f"{what} file {str(path)!r} is not UTF-8 text ({error.reason}); is it the right file?"
        ) from None
    except RecursionError:
        raise ValueError(
            f"{what} file {str(path)!r} is nested too deeply to be JSON this tool wrote; is it the right file?"
        ) from None


def _read_shipped_synonyms() -> dict:
    text = resources.files("vlm_guard.eval").joinpath("data/chair_synonyms.json").read_text(encoding="utf-8")
    return json.loads(text)


@functools.lru_cache(maxsize=1)
def _default_vocabulary() -> ChairVocabulary:
    return ChairVocabulary.from_dict(_read_shipped_synonyms(), released_quirks=False)


@functools.lru_cache(maxsize=1 << 16)
def _singular_known(token: str, known_tokens: frozenset[str]) -> str:
    return singularize(token, known_tokens)


def _caption_words(caption: str, vocabulary: ChairVocabulary) -> tuple[list[str], int]:
    """Singularised, two-word-merged words of a caption, and its number of word tokens."""
    tokens = tokenize(caption)
    words = [_singular_known(token, vocabulary.known_tokens) for token in tokens]
    merged: list[str] = []
    index = 0
    while index < len(words):
        if index + 1 < len(words):
            pair = f"{words[index]} {words[index + 1]}"
            if pair in vocabulary.double_words:
                merged.append(vocabulary.double_words[pair])
                index += 2
                continue
        merged.append(words[index])
        index += 1
    if "toilet" in merged and "seat" in merged:
        merged = [word for word in merged if word != "seat"]
    return merged, len(tokens)


def extract_objects(caption: str, vocabulary: ChairVocabulary | None = None) -> list[tuple[str, str]]:
    """COCO object mentions of a caption, in order, with the CHAIR matching rules.

    Args:
        caption: Generated or reference caption.
        vocabulary: Defaults to the shipped vocabulary.

    Returns:
        ``[(word, category), ...]``: ``word`` is the matched (singularised, merged) word, ``category`` the COCO
        category name. A repeated object appears once per mention.

    Example:
        >>> extract_objects("Two teddy bears and a baby elephant on a motor bike.")
        [('teddy bear', 'teddy bear'), ('elephant', 'elephant'), ('motor bike', 'motorcycle')]
    """
    vocabulary = vocabulary or _default_vocabulary()
    words, _ = _caption_words(caption, vocabulary)
    return [(word, vocabulary.word_to_category[word]) for word in words if word in vocabulary.word_to_category]


def caption_length(caption: str) -> int:
    """Number of word tokens of a caption (see :func:`tokenize`).

    Example:
        >>> caption_length("A dog, on a red sofa.")
        6
    """
    return len(tokenize(caption))


def score_caption(caption: str, gt_objects: Iterable[str], vocabulary: ChairVocabulary | None = None) -> dict[str, Any]:
    """Per-caption CHAIR record: mentions, hallucinated mentions, recalled ground-truth objects, counts.

    Args:
        caption: Generated caption.
        gt_objects: Ground-truth COCO categories of its image (from :class:`ChairGroundTruth`).
        vocabulary: Defaults to the shipped vocabulary.

    Returns:
        JSON-ready dict: ``mentions`` and ``hallucinated`` (lists of ``[word, category]``),
        ``gt_objects`` and ``recalled_objects`` (sorted category lists), and the counts ``n_mentions``,
        ``n_hallucinated``, ``hallucinated_caption`` (bool), ``n_gt_objects``, ``n_recalled``, ``n_words``.

    Example:
        >>> record = score_caption("A dog and a cat.", {"dog"})
        >>> record["hallucinated"], record["n_recalled"]
        ([['cat', 'cat']], 1)
    """
    vocabulary = vocabulary or _default_vocabulary()
    if isinstance(gt_objects, str):
        raise ValueError(f"gt_objects must be a collection of category names, got the string {gt_objects!r}.")
    words, n_words = _caption_words(caption, vocabulary)
    mentions = [[word, vocabulary.word_to_category[word]] for word in words if word in vocabulary.word_to_category]
    return mention_record(mentions, gt_objects, n_words)


def mention_record(mentions: list[list[str]], gt_objects: Iterable[str], n_words: int) -> dict[str, Any]:
    """The CHAIR record of one caption from its object mentions (shared by COCO and the synthetic world).

    Args:
        mentions: ``[word, category]`` per occurrence, in caption order.
        gt_objects: the image's ground-truth categories.
        n_words: caption length in words.

    Returns:
        the JSON-ready record described in :func:`score_caption`.

    Example:
        >>> mention_record([["dog", "dog"], ["cat", "cat"]], {"dog"}, 5)["n_hallucinated"]
        1
    """
    gt_set = set(gt_objects)
    hallucinated = [mention for mention in mentions if mention[1] not in gt_set]
    recalled = sorted({category for _, category in mentions if category in gt_set})
    return {
        "mentions": mentions,
        "hallucinated": hallucinated,
        "gt_objects": sorted(gt_set),
        "recalled_objects": recalled,
        "n_mentions": len(mentions),
        "n_hallucinated": len(hallucinated),
        "hallucinated_caption": bool(hallucinated),
        "n_gt_objects": len(gt_set),
        "n_recalled": len(recalled),
        "n_words": n_words,
    }


def _scored(record: Mapping[str, Any], index: int, vocabulary: ChairVocabulary | None) -> Mapping[str, Any]:
    if "n_mentions" in record:
        return record
    if "caption" in record and "gt_objects" in record:
        return score_caption(record["caption"], record["gt_objects"], vocabulary)
    raise ValueError(
        f"records[{index}] has keys {sorted(record)}; pass records from score_caption() or dicts with "
        f"'caption' and 'gt_objects'."
    )


def chair_item_counts(records: Sequence[Mapping[str, Any]], vocabulary: ChairVocabulary | None = None) -> np.ndarray:
    """Per-caption counts in the columns :data:`COUNT_NAMES` (the fast input for bootstrap statistics).

    Args:
        records: Scored records (:func:`score_caption`) or dicts with ``caption`` and ``gt_objects``.
        vocabulary: Used only to score raw records.

    Returns:
        Array ``[n_captions, 7]``, dtype int64.

    Example:
        >>> chair_item_counts([{"caption": "A dog and a cat.", "gt_objects": ["dog"]}]).tolist()
        [[1, 1, 1, 2, 1, 1, 5]]
    """
    counts = np.zeros((len(records), len(COUNT_NAMES)), dtype=np.int64)  # [n_captions, n_counts]
    for index, record in enumerate(records):
        scored = _scored(record, index, vocabulary)
        counts[index] = (
            1,
            int(bool(scored["n_hallucinated"])),
            scored["n_hallucinated"],
            scored["n_mentions"],
            scored["n_recalled"],
            scored["n_gt_objects"],
            scored["n_words"],
        )
    return counts


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(np.broadcast(numerator, denominator).shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def chair_metrics_from_totals(totals: np.ndarray) -> dict[str, np.ndarray]:
    """CHAIR metrics from summed counts ``[..., 7]`` (columns :data:`COUNT_NAMES`); vectorised over leading axes.

    Zero denominators (no captions, no mentions, no ground-truth objects) give 0.0, never NaN.

    Example:
        >>> float(chair_metrics_from_totals(np.array([2, 1, 1, 4, 2, 3, 20]))["chair_i"])
        0.25
    """
    totals = np.asarray(totals, dtype=np.float64)
    if totals.shape[-1:] != (len(COUNT_NAMES),):
        raise ValueError(
            f"totals must have a last axis of size {len(COUNT_NAMES)} {COUNT_NAMES}, got shape {totals.shape}."
        )
    n_captions, n_hallucinated_captions, n_hallucinated, n_mentions, n_recalled, n_gt_objects, n_words = (
        totals[..., column] for column in range(len(COUNT_NAMES))
    )
    return {
        "chair_s": _safe_divide(n_hallucinated_captions, n_captions),
        "chair_i": _safe_divide(n_hallucinated, n_mentions),
        "recall": _safe_divide(n_recalled, n_gt_objects),
        "mean_length": _safe_divide(n_words, n_captions),
    }


def chair_metrics(records: Sequence[Mapping[str, Any]], vocabulary: ChairVocabulary | None = None) -> dict:
    """CHAIR_S, CHAIR_I, recall and mean caption length over captions.

    Args:
        records: One per caption: a record from :func:`score_caption` / :meth:`ChairGroundTruth.score_caption`,
            or a dict with ``caption`` and ``gt_objects`` (scored here).
        vocabulary: Used only to score raw records.

    Returns:
        ``{"chair_s", "chair_i", "recall", "mean_length"}`` as floats (fractions, not percentages; 0.0 for a zero
        denominator) plus the integer totals of :data:`COUNT_NAMES`.

    Example:
        >>> m = chair_metrics([{"caption": "A dog and a cat.", "gt_objects": ["dog"]},
        ...                    {"caption": "A dog.", "gt_objects": ["dog", "person"]}])
        >>> m["chair_s"], round(m["chair_i"], 4), round(m["recall"], 4)
        (0.5, 0.3333, 0.6667)
    """
    totals = chair_item_counts(records, vocabulary).sum(axis=0)
    metrics = {name: float(value) for name, value in chair_metrics_from_totals(totals).items()}
    metrics.update({name: int(value) for name, value in zip(COUNT_NAMES, totals)})
    return metrics


def chair_metric_fn(name: str):
    """A bootstrap-ready metric over :func:`chair_item_counts` rows (for :mod:`vlm_guard.eval.stats`).

    Args:
        name: One of :data:`CHAIR_METRIC_NAMES`.

    Returns:
        A :class:`~vlm_guard.eval.stats.TotalsMetric`.

    Example:
        >>> from vlm_guard.eval.stats import bootstrap_ci
        >>> counts = chair_item_counts([{"caption": "A cat.", "gt_objects": ["cat"]}] * 10)
        >>> bootstrap_ci(counts, chair_metric_fn("chair_s"), n_resamples=50)
        (0.0, 0.0, 0.0)
    """
    from vlm_guard.eval.stats import TotalsMetric

    return TotalsMetric.pick("chair", name, CHAIR_METRIC_NAMES, chair_metrics_from_totals)


def coco_image_id(value: int | str) -> int:
    """COCO image id from an int, a digit string or a file name like ``COCO_val2014_000000310196.jpg``.

    Example:
        >>> coco_image_id("COCO_val2014_000000310196.jpg"), coco_image_id("42")
        (310196, 42)
    """
    if isinstance(value, bool):
        raise ValueError(f"not a COCO image id: {value!r}.")
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, str):
        stripped = value.strip()
        if stripped.isdigit():
            return int(stripped)
        match = _COCO_FILE_ID.search(stripped)
        if match:
            return int(match.group(1))
    raise ValueError(
        f"not a COCO image id: {value!r}; pass an int, a digit string or a COCO file name "
        f"('COCO_val2014_000000310196.jpg')."
    )


def _require_keys(data: Any, keys: Sequence[str], path: Path, what: str) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"{what} file {str(path)!r} should hold a JSON object, got {type(data).__name__}.")
    missing = [key for key in keys if key not in data]
    if missing:
        raise ValueError(
            f"{what} file {str(path)!r} lacks key(s) {missing} (has {sorted(data)}); expected the COCO "
            f"annotation format (e.g. annotations/{'instances' if 'categories' in keys else 'captions'}_val2014.json)."
        )


@dataclass(frozen=True)
class ChairGroundTruth:
    """Ground-truth COCO categories per image: instance annotations plus objects named in reference captions.

    Attributes:
        objects: COCO image id -> frozenset of category names (images without any object map to an empty set).
        vocabulary: The vocabulary used to parse reference captions (and to score captions).

    Example:
        >>> gt = ChairGroundTruth({1: frozenset({"dog"})})
        >>> gt.score_caption(1, "A dog on a couch.")["hallucinated"]
        [['couch', 'couch']]
    """

    objects: Mapping[int, frozenset[str]]
    vocabulary: ChairVocabulary = field(default_factory=_default_vocabulary, repr=False, compare=False)

    @classmethod
    def from_coco(
        cls,
        instances_path: str | os.PathLike,
        captions_path: str | os.PathLike,
        image_ids: Iterable[int | str] | None = None,
        vocabulary: ChairVocabulary | None = None,
    ) -> ChairGroundTruth:
        """Build from COCO ``instances_val2014.json`` and ``captions_val2014.json``.

        Args:
            instances_path: COCO instances file (``images``, ``annotations`` with ``image_id``/``category_id``,
                ``categories`` with ``id``/``name``).
            captions_path: COCO captions file (``annotations`` with ``image_id``/``caption``).
            image_ids: Keep only these images (much faster for a 500-image CHAIR run). Ids absent from both
                files raise.
            vocabulary: Defaults to the shipped vocabulary.

        Returns:
            The ground truth.

        Raises:
            FileNotFoundError: For a missing file.
            ValueError: For a file that is not JSON, lacks COCO keys, or names an unknown category.

        Example:
            >>> import json, tempfile
            >>> from pathlib import Path
            >>> tmp = tempfile.TemporaryDirectory()
            >>> instances = Path(tmp.name) / "instances_val2014.json"     # COCO's annotations/ files, cut down
            >>> captions = Path(tmp.name) / "captions_val2014.json"
            >>> _ = instances.write_text(json.dumps({"categories": [{"id": 18, "name": "dog"}],
            ...                                      "annotations": [{"image_id": 42, "category_id": 18}]}))
            >>> _ = captions.write_text(json.dumps({"annotations": [{"image_id": 42, "caption": "A dog on a sofa."}]}))
            >>> gt = ChairGroundTruth.from_coco(instances, captions)
            >>> sorted(gt.objects_for(42))                   # annotated, plus named by a reference caption
            ['couch', 'dog']
            >>> tmp.cleanup()
        """
        vocabulary = vocabulary or _default_vocabulary()
        instances_path, captions_path = Path(instances_path), Path(captions_path)
        instances = _read_json_file(instances_path, what="COCO instances")
        _require_keys(instances, ("annotations", "categories"), instances_path, "COCO instances")
        captions = _read_json_file(captions_path, what="COCO captions")
        _require_keys(captions, ("annotations",), captions_path, "COCO captions")

        wanted = None if image_ids is None else {coco_image_id(image_id) for image_id in image_ids}
        objects: dict[int, set[str]] = {}
        for source in (instances, captions):
            for image in source.get("images", []):
                if isinstance(image, dict) and "id" in image:
                    image_id = int(image["id"])
                    if wanted is None or image_id in wanted:
                        objects.setdefault(image_id, set())

        category_names: dict[int, str] = {}
        for position, category in enumerate(instances["categories"]):
            if not isinstance(category, dict) or "id" not in category or "name" not in category:
                raise ValueError(
                    f"{instances_path}: categories[{position}] needs 'id' and 'name', got {category!r:.120}."
                )
            category_names[category["id"]] = vocabulary.category_of(category["name"])

        for position, annotation in enumerate(instances["annotations"]):
            try:
                image_id, category_id = int(annotation["image_id"]), annotation["category_id"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{instances_path}: annotations[{position}] needs 'image_id' and 'category_id', "
                    f"got {annotation!r:.120}."
                ) from None
            if wanted is not None and image_id not in wanted:
                continue
            if category_id not in category_names:
                raise ValueError(
                    f"{instances_path}: annotations[{position}] has category_id {category_id!r}, which is not in "
                    f"'categories' ({len(category_names)} ids)."
                )
            objects.setdefault(image_id, set()).add(category_names[category_id])

        n_captions = 0
        for position, annotation in enumerate(captions["annotations"]):
            try:
                image_id, caption = int(annotation["image_id"]), annotation["caption"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"{captions_path}: annotations[{position}] needs 'image_id' and 'caption', got {annotation!r:.120}."
                ) from None
            if wanted is not None and image_id not in wanted:
                continue
            objects.setdefault(image_id, set()).update(category for _, category in extract_objects(caption, vocabulary))
            n_captions += 1

        if wanted is not None:
            absent = sorted(wanted - set(objects))
            if absent:
                raise ValueError(
                    f"{len(absent)} requested image id(s) are in neither {instances_path.name} nor "
                    f"{captions_path.name} (first: {absent[:5]}); are they from another split?"
                )
        logger.info(
            "CHAIR ground truth: %d images from %s and %d reference captions from %s",
            len(objects),
            instances_path,
            n_captions,
            captions_path,
        )
        return cls(objects={image_id: frozenset(names) for image_id, names in objects.items()}, vocabulary=vocabulary)

    def objects_for(self, image_id: int | str) -> frozenset[str]:
        """Ground-truth categories of one image.

        Raises:
            ValueError: If the image is unknown (the released code would score it against an empty set).
        """
        key = coco_image_id(image_id)
        try:
            return self.objects[key]
        except KeyError:
            raise ValueError(
                f"image id {image_id!r} is not in the CHAIR ground truth ({len(self.objects)} images); build it "
                f"from the annotation files of the split the image comes from (val2014 for the usual setup)."
            ) from None

    def score_caption(self, image_id: int | str, caption: str) -> dict[str, Any]:
        """:func:`score_caption` against this image's ground truth; the record also holds ``image_id``/``caption``.

        Example:
            >>> ChairGroundTruth({7: frozenset({"cat"})}).score_caption(7, "A cat.")["n_hallucinated"]
            0
        """
        record = {"image_id": coco_image_id(image_id), "caption": caption}
        record.update(score_caption(caption, self.objects_for(image_id), self.vocabulary))
        return record

    def to_json(self, path: str | os.PathLike) -> None:
        """Save the per-image objects as JSON (a cache: parsing all val2014 captions takes seconds)."""
        payload = {
            "format": "vlm_guard.chair_ground_truth/1",
            "released_quirks": self.vocabulary.released_quirks,
            "objects": {str(image_id): sorted(names) for image_id, names in sorted(self.objects.items())},
        }
        from vlm_guard.fileio import atomic_write_json

        atomic_write_json(path, payload)  # a cache: a failed write keeps the previous one whole

    @classmethod
    def from_json(cls, path: str | os.PathLike, vocabulary: ChairVocabulary | None = None) -> ChairGroundTruth:
        """Load what :meth:`to_json` saved."""
        path = Path(path)
        data = _read_json_file(path, what="CHAIR ground-truth cache")
        if not isinstance(data, dict) or data.get("format") != "vlm_guard.chair_ground_truth/1":
            raise ValueError(f"{str(path)!r} is not a CHAIR ground-truth cache written by ChairGroundTruth.to_json.")
        fix = "the cache is damaged or was edited: write it again with ChairGroundTruth.to_json."
        quirks = data.get("released_quirks", False)
        if not isinstance(quirks, bool):
            raise ValueError(f"{path}: field released_quirks is {quirks!r}, not true or false; {fix}")
        entries = data.get("objects")
        if not isinstance(entries, dict):
            raise ValueError(
                f"{path}: field objects is {str(entries)[:60]!r}, not an object {{image id: [object, ...]}}; {fix}"
            )
        objects = {}
        for image_id, names in entries.items():
            if not image_id.isdigit():
                raise ValueError(f"{path}: field objects has the key {image_id!r}, not a COCO image id; {fix}")
            if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
                raise ValueError(
                    f"{path}: field objects[{image_id!r}] is {str(names)[:60]!r}, not a list of object names; {fix}"
                )
            objects[int(image_id)] = frozenset(names)
        vocabulary = vocabulary or ChairVocabulary.load(released_quirks=quirks)
        return cls(objects=objects, vocabulary=vocabulary)
