"""The example images shipped in ``vlm_guard/assets/examples`` (PNG, 256x256 = 4x nearest upscale of 64x64).

``examples.json`` lists, per image: the file, the objects (type/colour/size/grid cell), the set of types,
the reference caption and the *absent partners* (usual partners of present objects that are missing:
what a biased model is expected to hallucinate).
"""

from __future__ import annotations

from pathlib import Path

from .world import Scene, SceneObject, caption, partner_of, render

EXAMPLE_SCENES: dict[str, tuple[tuple[str, str, str, int, int], ...]] = {
    # name: (type, colour, size, row, col), ...
    "house_and_tree": (("house", "red", "big", 1, 1), ("tree", "green", "big", 1, 2)),
    "house_without_tree": (("house", "blue", "big", 0, 1), ("ring", "yellow", "small", 2, 3)),
    "moon_without_star": (("moon", "yellow", "big", 1, 0), ("cross", "white", "big", 2, 2)),
    "cup_without_plate": (("cup", "purple", "big", 1, 2), ("ball", "red", "small", 3, 0),
                          ("kite", "green", "big", 0, 0)),
    "table_set": (("cup", "white", "small", 0, 3), ("plate", "blue", "big", 1, 3), ("star", "yellow", "big", 2, 1),
                  ("moon", "white", "big", 3, 1)),
}


def example_scene(name: str) -> Scene:
    """The ``Scene`` of example ``name`` (one of EXAMPLE_SCENES)."""
    if name not in EXAMPLE_SCENES:
        raise ValueError(f"unknown example {name!r}; expected one of {sorted(EXAMPLE_SCENES)}")
    objects = sorted((SceneObject(*o) for o in EXAMPLE_SCENES[name]), key=lambda o: (o.row, o.col))
    return Scene(tuple(objects), index=-1, biased=False, seed=-1)


def write_examples(folder: Path | None = None, size: int = 256) -> Path:
    """Render every example and write ``examples.json``; returns the folder."""
    from ..defaults import EXAMPLES_DIRS

    folder = Path(folder) if folder else EXAMPLES_DIRS["shapes"]
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for name in EXAMPLE_SCENES:
        scene = example_scene(name)
        from ..fileio import atomic_path

        with atomic_path(folder / f"{name}.png") as temporary:  # a failure keeps the previous image
            render(scene, size).save(temporary, optimize=True)
        entries.append({
            "file": f"{name}.png",
            "objects": [{"type": o.type, "colour": o.colour, "size": o.size, "row": o.row, "col": o.col}
                        for o in scene.objects],
            "types": sorted(scene.types),
            "caption": caption(scene),
            "absent_partners": sorted({partner_of(t) for t in scene.types} - {None} - scene.types),
        })
    from ..fileio import atomic_write_json

    atomic_write_json(folder / "examples.json", entries, indent=1)
    return folder
