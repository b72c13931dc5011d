"""Write the bundled examples of the everyday world (vlm_guard/assets/examples): scenes of the TUNING seed 910001
chosen by a rule written in code (vlm_guard.synthetic.examples.select_examples), from the plain default model's
greedy captions only (never a guarded caption): the first 4 scenes whose plain caption names an absent usual
partner of a present object, and the first scene whose plain caption is right (every object named, nothing absent),
to show the guard does no harm there; scenes of at most 3 objects. Also writes examples.json (a list: per image its ground truth, the plain
caption at selection and the rule that chose it).

    .venv/bin/python scripts/make_everyday_examples.py [FOLDER] [--max-scenes 200]
    VLM_GUARD_DEFAULT_MODEL=v3 .venv/bin/python scripts/make_everyday_examples.py vlm_guard/assets/examples_v3 \
        --world everyday_v3 --max-objects 4          # default model v3's examples (its scenes hold 3-5 objects)

Deterministic: the same model and seed give the same examples (greedy decoding, scenes in index order).
"""

import argparse
import sys
from pathlib import Path

SEED = 910001  # the tuning seed: never the reported 900001
BATCH = 8


def plain_records(max_scenes: int, n_trap: int, n_right: int, world: str = "everyday", max_objects: int = 3):
    """Plain greedy captions of the tuning seed's scenes in index order, scored, until the rule is satisfied."""
    import torch

    from vlm_guard.defaults import default_world, load_default
    from vlm_guard.eval.runner import chat_prompt, generate_answers, prepare_processor
    from vlm_guard.eval.synthetic import score_synthetic_caption, synthetic_world
    from vlm_guard.synthetic.examples import select_examples
    from vlm_guard.synthetic.worlds import world_kind

    torch.set_num_threads(1)
    kind = world_kind(world)
    if default_world() != kind.name:
        raise SystemExit(
            f"the default model is trained on the {default_world()!r} world, not {kind.name!r}: set "
            "VLM_GUARD_DEFAULT_MODEL (v2: everyday, v3: everyday_v3)"
        )
    scenes = synthetic_world(SEED, False, kind)
    model, processor = load_default()
    prepare_processor(processor)
    records = []
    for start in range(0, max_scenes, BATCH):
        batch = [scenes.scene(i) for i in range(start, min(start + BATCH, max_scenes))]
        images = [kind.render(scene) for scene in batch]
        prompts = [chat_prompt(processor, kind.caption_prompt)] * len(batch)
        with torch.no_grad():
            answers = generate_answers(model, processor, images, prompts, kind.caption_tokens)
        for scene, image, answer in zip(batch, images, answers):
            types = sorted(scene.types)
            scored = score_synthetic_caption(answer, types, kind)
            records.append(
                {
                    "index": scene.index,
                    "scene": scene,
                    "image": image,
                    "types": types,
                    "absent_partners": sorted({kind.partner_of(t) for t in types} - {None} - set(types)),
                    "hallucinated": sorted({t for _, t in scored["hallucinated"]}),
                    "recalled": sorted(scored["recalled_objects"]),
                    "plain_caption": answer,
                }
            )
        chosen = select_examples(records, n_trap, n_right, max_objects)
        if sum(r["kind"] == "trap" for r in chosen) >= n_trap and sum(r["kind"] == "right" for r in chosen) >= n_right:
            return chosen, len(records)
    raise SystemExit(
        f"the rule found fewer than {n_trap} traps / {n_right} right scenes in {max_scenes} scenes; raise --max-scenes"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", default="vlm_guard/assets/examples")
    parser.add_argument("--max-scenes", type=int, default=200)
    parser.add_argument("--traps", type=int, default=4)
    parser.add_argument("--right", type=int, default=1)
    parser.add_argument("--world", default="everyday", help="everyday (default model v2) or everyday_v3 (v3)")
    parser.add_argument("--max-objects", type=int, default=3, help="skip scenes with more objects (default 3)")
    args = parser.parse_args()
    from vlm_guard.fileio import atomic_write_bytes, atomic_write_json
    from vlm_guard.synthetic.examples import EXAMPLE_RULE
    from vlm_guard.synthetic.worlds import world_kind

    kind = world_kind(args.world)
    chosen, scanned = plain_records(args.max_scenes, args.traps, args.right, args.world, args.max_objects)
    out = Path(args.folder)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.png"):
        old.unlink()
    entries = []
    for record in chosen:
        scene = record["scene"]
        what = (
            f"no_{'_'.join(sorted(set(record['hallucinated']) & set(record['absent_partners'])))}"
            if record["kind"] == "trap"
            else "plain_right"
        )
        name = f"scene{record['index']:03d}_{what}.png"
        import io

        buffer = io.BytesIO()
        record["image"].save(buffer, format="PNG", optimize=True)
        atomic_write_bytes(out / name, buffer.getvalue())
        entries.append(
            {
                "file": name,
                "kind": record["kind"],
                "scene_index": record["index"],
                "world_seed": SEED,
                "objects": [{"type": o.type, "colour": o.colour, "row": o.row, "col": o.col} for o in scene.objects],
                "types": record["types"],
                "caption": kind.reference_caption(scene),
                "absent_partners": record["absent_partners"],
                "plain_caption_at_selection": record["plain_caption"],
                "plain_hallucinated_at_selection": record["hallucinated"],
            }
        )
    rule = EXAMPLE_RULE.format(n_trap=args.traps, n_right=args.right, max_objects=args.max_objects)
    for entry in entries:  # a list of entries, as every reader expects; each carries how it was chosen
        entry["selected_by"] = {"rule": rule, "scenes_scanned": scanned}
    atomic_write_json(out / "examples.json", entries, indent=1)
    for entry in entries:
        print(f"{entry['file']}: {entry['kind']}; plain: {entry['plain_caption_at_selection']!r}")


if __name__ == "__main__":
    sys.exit(main())
