"""Write the bundled examples of the everyday world (vlm_guard/assets/examples): five hand-specified scenes,
four with a usual partner absent (the co-occurrence trap) and one with both partners, plus examples.json."""
import json
import sys
from dataclasses import asdict
from pathlib import Path

from vlm_guard.toyworld.everyday.world import Scene, SceneObject, caption, partner_of, render

O = SceneObject
EXAMPLES = {
    "fork_without_knife": (O("fork", "white", 1, 1, 0.9, 0.95), O("cup", "red", 2, 2, 0.8, 0.9)),
    "cup_without_saucer": (O("cup", "yellow", 1, 2, 0.85, 0.9), O("ball", "green", 2, 0, 0.8, 0.9)),
    "keyboard_without_mouse": (O("keyboard", "blue", 1, 1, 1.0, 0.95), O("clock", "white", 0, 3, 0.8, 0.9)),
    "moon_without_star": (O("moon", "yellow", 0, 1, 0.9, 0.95), O("leaf", "green", 3, 2, 0.8, 0.9)),
    "table_and_chair": (O("table", "red", 2, 1, 0.95, 0.95), O("chair", "blue", 2, 2, 0.9, 0.9)),
}


def main(folder: str) -> None:
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (name, objects) in enumerate(EXAMPLES.items()):
        scene = Scene(tuple(sorted(objects, key=lambda o: (o.row, o.col))), index=index, biased=False, seed=31337)
        render(scene).save(out / f"{name}.png")
        types = sorted(scene.types)
        absent = sorted({partner_of(t) for t in types if partner_of(t) and partner_of(t) not in scene.types})
        entries.append({"file": f"{name}.png", "objects": [asdict(o) for o in scene.objects], "types": types,
                        "caption": caption(scene), "absent_partners": absent})
    (out / "examples.json").write_text(json.dumps(entries, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "vlm_guard/assets/examples")
