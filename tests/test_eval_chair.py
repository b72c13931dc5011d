"""CHAIR: vocabulary, two-word rules, singularisation, metrics by hand, and an end-to-end run from COCO files."""

import json

import numpy as np
import pytest

from vlm_guard.eval.chair import (
    COUNT_NAMES,
    ChairGroundTruth,
    ChairVocabulary,
    caption_length,
    chair_item_counts,
    chair_metric_fn,
    chair_metrics,
    chair_metrics_from_totals,
    coco_image_id,
    extract_objects,
    score_caption,
    singularize,
    tokenize,
)

COCO_CATEGORIES = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
]


def categories(caption, **kwargs):
    return [category for _, category in extract_objects(caption, **kwargs)]


def test_vocabulary_covers_the_80_coco_categories():
    vocabulary = ChairVocabulary.load()
    assert len(vocabulary.categories) == 80
    assert set(vocabulary.categories) == set(COCO_CATEGORIES)
    for name in COCO_CATEGORIES:
        assert vocabulary.category_of(name) == name
    assert vocabulary.word_to_category["puppy"] == "dog"
    assert vocabulary.word_to_category["sofa"] == "couch"
    assert vocabulary.word_to_category["table"] == "dining table"
    with pytest.raises(ValueError, match="'unicorn' is not a CHAIR object word"):
        vocabulary.category_of("unicorn")


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("A hot dog on a plate.", ["hot dog"]),  # a hot dog, not a dog
        ("Two hot dogs and a dog.", ["hot dog", "dog"]),
        ("A teddy bear on a bed.", ["teddy bear", "bed"]),  # not a bear
        ("A brown bear.", ["bear"]),
        ("A man riding a motor bike.", ["person", "motorcycle"]),
        ("Two dogs and three puppies.", ["dog", "dog"]),
        ("People walking.", ["person"]),
        ("Three women and their children.", ["person", "person"]),
        ("A baby elephant.", ["elephant"]),  # "baby X" is X, not a person
        ("A baby in a crib.", ["person"]),
        ("Adult giraffes.", ["giraffe"]),
        ("A passenger jet on the runway.", ["airplane"]),  # not a passenger (person)
        ("A passenger train.", ["train"]),
        ("Train tracks in the snow.", []),  # "train track" is consumed, no train
        ("A toilet seat.", ["toilet"]),  # not a chair
        ("The seat of the toilet is up.", ["toilet"]),  # toilet + seat anywhere: seat dropped
        ("A chair and a seat.", ["chair", "chair"]),
        ("Wine glasses on a table.", ["wine glass", "dining table"]),
        ("A man wearing glasses.", ["person"]),
        ("A man in a bow tie.", ["person", "tie"]),
        ("A stop sign and traffic lights.", ["stop sign", "traffic light"]),
        ("A fire hydrant.", ["fire hydrant"]),
        ("A cell phone.", ["cell phone"]),
        ("A hot-dog stand.", ["hot dog"]),
        ("Two buses and some knives.", ["bus", "knife"]),
        ("Ponies in a field.", ["horse"]),
        ("Policemen on horses.", ["person", "horse"]),
        ("A row of houses.", []),  # "houses" must not become "horse"
        ("A pair of skis.", ["skis"]),
        ("The dog's ball.", ["dog", "sports ball"]),
        ("A tennis player.", ["person"]),
        ("", []),
    ],
)
def test_extract_objects(caption, expected):
    assert categories(caption) == expected


def test_extract_objects_returns_matched_words_in_order():
    assert extract_objects("A puppy near a sofa and a baby bird.") == [
        ("puppy", "dog"),
        ("sofa", "couch"),
        ("bird", "bird"),
    ]


def test_released_quirks_reproduce_unmatchable_synonyms():
    released = ChairVocabulary.load(released_quirks=True)
    # released split(', ') keeps " motor bike" / " cheesecake" with a leading space and "iPhone" upper-case
    assert categories("A man on a motor bike.", vocabulary=released) == ["person"]
    assert categories("A cheesecake.", vocabulary=released) == []
    assert categories("An iphone.", vocabulary=released) == []
    assert categories("A cheesecake.") == ["cake"]
    assert categories("An iPhone.") == ["cell phone"]
    # everything else is shared
    assert categories("A hot dog and two dogs.", vocabulary=released) == ["hot dog", "dog"]


@pytest.mark.parametrize(
    "word, expected",
    [
        ("dogs", "dog"),
        ("ponies", "pony"),
        ("knives", "knife"),
        ("buses", "bus"),
        ("boxes", "box"),
        ("benches", "bench"),
        ("men", "man"),
        ("policemen", "policeman"),
        ("children", "child"),
        ("mice", "mouse"),
        ("glass", "glass"),
        ("bus", "bus"),
        ("tennis", "tennis"),
        ("horses", "horse"),
        ("ties", "tie"),
    ],
)
def test_singularize_rules(word, expected):
    assert singularize(word) == expected


def test_singularize_with_vocabulary_only_maps_to_known_words():
    known = {"horse", "glass", "skis", "tie", "doggy"}
    assert singularize("horses", known) == "horse"
    assert singularize("houses", known) == "houses"
    assert singularize("glasses", known) == "glass"
    assert singularize("skis", known) == "skis"
    assert singularize("ties", known) == "tie"
    assert singularize("doggies", known) == "doggy"


def test_tokenize_and_length():
    assert tokenize("A Dog, a CAT.") == ["a", "dog", "a", "cat"]
    assert caption_length("There are 2 dogs on a red sofa.") == 8
    with pytest.raises(ValueError, match="caption must be a string"):
        tokenize(None)


def test_score_caption_record():
    record = score_caption("A dog and a cat on a dog bed.", {"dog", "bed", "person"})
    assert record["mentions"] == [["dog", "dog"], ["cat", "cat"], ["dog", "dog"], ["bed", "bed"]]
    assert record["hallucinated"] == [["cat", "cat"]]
    assert record["recalled_objects"] == ["bed", "dog"]
    assert (record["n_mentions"], record["n_hallucinated"], record["n_gt_objects"], record["n_recalled"]) == (
        4,
        1,
        3,
        2,
    )
    assert record["hallucinated_caption"] is True
    assert record["n_words"] == 9
    json.dumps(record)  # JSON-ready
    with pytest.raises(ValueError, match="collection of category names"):
        score_caption("A dog.", "dog")


HAND_RECORDS = [
    # mentions dog, cat, couch; cat hallucinated; recalls dog, couch of 3; 9 words
    {"caption": "A dog and a cat sit on a couch.", "gt_objects": ["dog", "couch", "person"]},
    # mentions pizza, table (dining table), pizza; none hallucinated; recalls 2 of 2; 9 words
    {"caption": "A pizza on a table next to a pizza.", "gt_objects": ["pizza", "dining table"]},
    # mentions person (people), bus, truck; all hallucinated; recalls 0 of 1; 8 words
    {"caption": "Two people near a bus and a truck.", "gt_objects": ["car"]},
]


def test_chair_metrics_by_hand():
    metrics = chair_metrics(HAND_RECORDS)
    assert metrics["chair_s"] == pytest.approx(2 / 3)
    assert metrics["chair_i"] == pytest.approx(4 / 9)
    assert metrics["recall"] == pytest.approx(4 / 6)
    assert metrics["mean_length"] == pytest.approx(26 / 3)
    assert (
        metrics["n_captions"],
        metrics["n_hallucinated_captions"],
        metrics["n_hallucinated"],
        metrics["n_mentions"],
        metrics["n_recalled"],
        metrics["n_gt_objects"],
        metrics["n_words"],
    ) == (3, 2, 4, 9, 4, 6, 26)


def test_chair_metrics_accepts_scored_records_and_counts_agree():
    scored = [score_caption(r["caption"], r["gt_objects"]) for r in HAND_RECORDS]
    assert chair_metrics(scored) == chair_metrics(HAND_RECORDS)
    counts = chair_item_counts(scored)
    assert counts.shape == (3, len(COUNT_NAMES))
    assert counts[:, 0].tolist() == [1, 1, 1]
    assert float(chair_metric_fn("chair_i")(counts)) == pytest.approx(4 / 9)
    with pytest.raises(ValueError, match=r"records\[0\] has keys"):
        chair_metrics([{"text": "A dog."}])
    with pytest.raises(ValueError, match="CHAIR metric must be one of"):
        chair_metric_fn("chair_x")


def test_chair_zero_denominators():
    metrics = chair_metrics([{"caption": "A sunny day.", "gt_objects": []}])
    assert metrics["chair_s"] == 0.0 and metrics["chair_i"] == 0.0 and metrics["recall"] == 0.0
    assert metrics["mean_length"] == 3.0
    empty = chair_metrics_from_totals(np.zeros(len(COUNT_NAMES)))
    assert all(float(value) == 0.0 for value in empty.values())


def test_coco_image_id():
    assert coco_image_id(5) == 5
    assert coco_image_id(np.int64(7)) == 7
    assert coco_image_id(" 12 ") == 12
    assert coco_image_id("COCO_val2014_000000310196.jpg") == 310196
    with pytest.raises(ValueError, match="not a COCO image id: 'abc'"):
        coco_image_id("abc")


# ---- end to end from files in the official COCO formats ----

CATEGORY_IDS = {
    "person": 1,
    "bicycle": 2,
    "car": 3,
    "cat": 17,
    "dog": 18,
    "pizza": 59,
    "couch": 63,
    "dining table": 67,
    "teddy bear": 88,
}


def _write_coco(tmp_path):
    instances = {
        "info": {},
        "licenses": [],
        "images": [
            {"id": 101, "file_name": "COCO_val2014_000000000101.jpg"},
            {"id": 102, "file_name": "COCO_val2014_000000000102.jpg"},
            {"id": 103, "file_name": "COCO_val2014_000000000103.jpg"},
        ],
        "annotations": [
            {"id": 1, "image_id": 101, "category_id": CATEGORY_IDS["dog"], "bbox": [0, 0, 1, 1]},
            {"id": 2, "image_id": 101, "category_id": CATEGORY_IDS["dog"], "bbox": [0, 0, 1, 1]},
            {"id": 3, "image_id": 102, "category_id": CATEGORY_IDS["pizza"], "bbox": [0, 0, 1, 1]},
            {"id": 4, "image_id": 103, "category_id": CATEGORY_IDS["car"], "bbox": [0, 0, 1, 1]},
        ],
        "categories": [{"id": cid, "name": name, "supercategory": "x"} for name, cid in CATEGORY_IDS.items()],
    }
    captions = {
        "info": {},
        "licenses": [],
        "images": instances["images"],
        "annotations": [
            {"id": 11, "image_id": 101, "caption": "A man and his puppy on a sofa."},  # adds person, couch
            {"id": 12, "image_id": 102, "caption": "A pizza on a wooden table."},  # adds dining table
            {"id": 13, "image_id": 103, "caption": "A red car parked on the street."},
        ],
    }
    instances_path = tmp_path / "instances_val2014.json"
    captions_path = tmp_path / "captions_val2014.json"
    instances_path.write_text(json.dumps(instances))
    captions_path.write_text(json.dumps(captions))
    return instances_path, captions_path


def test_ground_truth_from_coco_files(tmp_path):
    instances_path, captions_path = _write_coco(tmp_path)
    ground_truth = ChairGroundTruth.from_coco(instances_path, captions_path)
    assert ground_truth.objects_for(101) == {"dog", "person", "couch"}
    assert ground_truth.objects_for("COCO_val2014_000000000102.jpg") == {"pizza", "dining table"}
    assert ground_truth.objects_for("103") == {"car"}
    with pytest.raises(ValueError, match="image id 999 is not in the CHAIR ground truth"):
        ground_truth.objects_for(999)
    subset = ChairGroundTruth.from_coco(instances_path, captions_path, image_ids=[102])
    assert set(subset.objects) == {102}
    with pytest.raises(ValueError, match="in neither"):
        ChairGroundTruth.from_coco(instances_path, captions_path, image_ids=[102, 555])
    cache = tmp_path / "gt.json"
    ground_truth.to_json(cache)
    assert ChairGroundTruth.from_json(cache).objects == ground_truth.objects


def test_end_to_end_chair_from_files(tmp_path):
    instances_path, captions_path = _write_coco(tmp_path)
    generated = tmp_path / "captions_generated.jsonl"
    generated.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"image_id": 101, "caption": "A dog and a cat sit on a couch."},
                {"image_id": 102, "caption": "A pizza on a table next to a pizza."},
                {"image_id": 103, "caption": "Two people near a bus and a truck."},
            ]
        )
        + "\n"
    )
    ground_truth = ChairGroundTruth.from_coco(instances_path, captions_path)
    records = [
        ground_truth.score_caption(r["image_id"], r["caption"])
        for r in map(json.loads, generated.read_text().splitlines())
    ]
    assert records[0]["hallucinated"] == [["cat", "cat"]]
    metrics = chair_metrics(records)
    # same captions and ground truth as HAND_RECORDS except image 101's gt (dog, person, couch) -> identical
    assert metrics["chair_s"] == pytest.approx(2 / 3)
    assert metrics["chair_i"] == pytest.approx(4 / 9)
    assert metrics["recall"] == pytest.approx(4 / 6)
    assert metrics["mean_length"] == pytest.approx(26 / 3)


def test_ground_truth_file_errors(tmp_path):
    instances_path, captions_path = _write_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        ChairGroundTruth.from_coco(tmp_path / "instances_train2014.json", captions_path)
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_text(instances_path.read_text()[:50])
    with pytest.raises(ValueError, match="corrupt.json' is not valid JSON"):
        ChairGroundTruth.from_coco(corrupt, captions_path)
    with pytest.raises(ValueError, match=r"lacks key\(s\) \['categories'\]"):
        ChairGroundTruth.from_coco(captions_path, captions_path)  # captions file passed as instances
    bad_category = json.loads(instances_path.read_text())
    bad_category["categories"].append({"id": 999, "name": "unicorn"})
    bad_path = tmp_path / "bad_instances.json"
    bad_path.write_text(json.dumps(bad_category))
    with pytest.raises(ValueError, match="'unicorn' is not a CHAIR object word"):
        ChairGroundTruth.from_coco(bad_path, captions_path)
    bad_annotation = json.loads(instances_path.read_text())
    bad_annotation["annotations"].append({"id": 9, "image_id": 101, "category_id": 12345})
    bad_path.write_text(json.dumps(bad_annotation))
    with pytest.raises(ValueError, match="category_id 12345"):
        ChairGroundTruth.from_coco(bad_path, captions_path)
