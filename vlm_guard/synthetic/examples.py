"""The example images shipped in ``vlm_guard/assets/examples_shapes`` (PNG, 256x256 = 4x nearest upscale of 64x64),
and the rule that picks the everyday world's bundled examples (:func:`select_examples`,
``scripts/make_everyday_examples.py``).

``examples.json`` lists, per image: the file, the objects (type/colour/size/grid cell), the set of types,
the reference caption and the *absent partners* (usual partners of present objects that are missing:
what a biased model is expected to hallucinate).
"""

from __future__ import annotations

from pathlib import Path

from vlm_guard.synthetic.world import Scene, SceneObject, caption, partner_of, render

EXAMPLE_SCENES: dict[str, tuple[tuple[str, str, str, int, int], ...]] = {
    # name: (type, colour, size, row, col), ...
    "house_and_tree": (("house", "red", "big", 1, 1), ("tree", "green", "big", 1, 2)),
    "house_without_tree": (("house", "blue", "big", 0, 1), ("ring", "yellow", "small", 2, 3)),
    "moon_without_star": (("moon", "yellow", "big", 1, 0), ("cross", "white", "big", 2, 2)),
    "cup_without_plate": (
        ("cup", "purple", "big", 1, 2),
        ("ball", "red", "small", 3, 0),
        ("kite", "green", "big", 0, 0),
    ),
    "table_set": (
        ("cup", "white", "small", 0, 3),
        ("plate", "blue", "big", 1, 3),
        ("star", "yellow", "big", 2, 1),
        ("moon", "white", "big", 3, 1),
    ),
}


EXAMPLE_RULE = (
    "scenes of the tuning seed with at most {max_objects} objects (short enough to read at a glance), in index "
    "order; a 'trap' is a scene whose plain greedy caption names an absent usual "
    "partner of a present object (the co-occurrence hallucination); a 'right' scene is one whose plain caption names "
    "every present object and nothing absent; the first {n_trap} traps and the first {n_right} right scenes are kept. "
    "Only the plain model's caption is read, never a guarded one."
)
"""How the everyday world's bundled examples are chosen (recorded in their ``examples.json``)."""


def select_examples(records, n_trap: int = 4, n_right: int = 1, max_objects: int = 3) -> list[dict]:
    """Pick bundled examples by :data:`EXAMPLE_RULE` from plain (greedy, unguarded) caption records.

    Args:
        records: dicts in scene order with ``index``, ``types`` (present types), ``absent_partners`` (usual partners
            of present types that are absent), ``hallucinated`` (types the plain caption names that are absent) and
            ``recalled`` (present types the plain caption names). Nothing of a guarded caption is read.
        n_trap, n_right: how many of each kind to keep.
        max_objects: scenes with more present types are skipped.

    Returns:
        the chosen records, each with ``kind`` ``"trap"`` or ``"right"``, traps first, each kind in scene order.

    Example:
        >>> rows = [dict(index=0, types=["cup"], absent_partners=["saucer"], hallucinated=[], recalled=["cup"]),
        ...         dict(index=1, types=["fork"], absent_partners=["knife"], hallucinated=["knife"], recalled=["fork"]),
        ...         dict(index=2, types=["ball"], absent_partners=[], hallucinated=["moon"], recalled=["ball"])]
        >>> [(r["index"], r["kind"]) for r in select_examples(rows, n_trap=1, n_right=1)]
        [(1, 'trap'), (0, 'right')]
    """
    traps, right = [], []
    for record in records:
        if len(record["types"]) > max_objects:
            continue
        hallucinated = set(record["hallucinated"])
        if hallucinated & set(record["absent_partners"]):
            if len(traps) < n_trap:
                traps.append({**record, "kind": "trap"})
        elif not hallucinated and set(record["recalled"]) >= set(record["types"]):
            if len(right) < n_right:
                right.append({**record, "kind": "right"})
        if len(traps) >= n_trap and len(right) >= n_right:
            break
    return traps + right


def example_scene(name: str) -> Scene:
    """The ``Scene`` of example ``name`` (one of EXAMPLE_SCENES)."""
    if name not in EXAMPLE_SCENES:
        raise ValueError(f"unknown example {name!r}; expected one of {sorted(EXAMPLE_SCENES)}")
    objects = sorted((SceneObject(*o) for o in EXAMPLE_SCENES[name]), key=lambda o: (o.row, o.col))
    return Scene(tuple(objects), index=-1, biased=False, seed=-1)


def write_examples(folder: Path | None = None, size: int = 256) -> Path:
    """Render every example and write ``examples.json``; returns the folder."""
    from vlm_guard.synthetic.default import EXAMPLES_DIRS

    folder = Path(folder) if folder else EXAMPLES_DIRS["shapes"]
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in EXAMPLE_SCENES:
        scene = example_scene(name)
        from vlm_guard.fileio import atomic_path

        with atomic_path(folder / f"{name}.png") as temporary:  # a failure keeps the previous image
            render(scene, size).save(temporary, optimize=True)
        entries.append(
            {
                "file": f"{name}.png",
                "objects": [
                    {"type": o.type, "colour": o.colour, "size": o.size, "row": o.row, "col": o.col}
                    for o in scene.objects
                ],
                "types": sorted(scene.types),
                "caption": caption(scene),
                "absent_partners": sorted({partner_of(t) for t in scene.types} - {None} - scene.types),
            }
        )
    from vlm_guard.fileio import atomic_write_json

    atomic_write_json(folder / "examples.json", entries, indent=1)
    return folder


__all__ = ["EXAMPLE_SCENES", "EXAMPLE_RULE", "select_examples", "example_scene", "write_examples"]
