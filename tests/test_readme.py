"""Every code block of README.md is run (issue 28), offline, on CPU, so that no block can rot.

How: the README's fenced blocks are parsed; each block is run or checked according to its language, and a block in
any other language (or none) fails, so the README cannot grow a block that nothing runs.

- ``python``: executed in-process in a fresh namespace, in a temporary folder.
- ``bash`` (``sh``, ``shell``): checked by ``bash -n``, then split into commands (line continuations joined, comments
  dropped, ``&&`` / ``;`` chains split) and each command is run by its handler below: ``vlm-guard ...`` and
  ``python -m vlm_guard.cli ...`` through ``vlm_guard.cli.main`` in-process (a subprocess would pay the torch and
  transformers imports again for every line: minutes on a loaded 2-core machine); ``python -c CODE`` like a Python
  block; ``bash scripts/...`` and ``lmms-eval ...`` as real subprocesses with ``.venv/bin`` first on ``PATH``;
  ``pip install`` checked against the checkout (the extras exist in ``pyproject.toml``, a named package is installed
  in the environment the suite runs in: nothing is installed, no network); ``git clone URL DIR && cd DIR`` stands for
  this checkout. A command with no handler fails, naming the handler to add. The only command never run is in
  :data:`NOT_RUN`, with its reason.
- ``bibtex``: every entry is ``@type{key,`` with balanced braces, a title, authors and a year; keys are unique.
- ``text``: not run; each line starting with ``vlm-guard `` must name a real command and list its required flags.

What changes between the README and the run (:data:`SUBSTITUTIONS`, applied to the block's text before it runs):
hub ids become tiny random-weight checkpoints of the same family built from configs (``vlm_guard/testing.py``,
processors from ``tests/tiny_processors.py``, saved with ``save_pretrained``), ``cuda`` becomes ``cpu``,
half precision becomes float32, long generations become 8 tokens, and ``eval`` takes ``--max-unclear 1`` (a random
model answers no yes/no, which would make the command exit 3 by design). Data paths are not substituted: the test
writes tiny files in the official layouts at the relative paths the block names (COCO ``val2014`` / ``train2014``
image folders, ``coco_pope_{random,popular,adversarial}.json`` POPE files naming val2014 images as the official
ones do, ``instances_*.json`` / ``captions_*.json`` annotations). The shipped default model is the 3.6M test
fixture (``VLM_GUARD_DEFAULT_MODEL=fixture``, set by ``conftest.py``); the hub is offline and its cache empty, the
head-map cache is a temporary folder.

``VLM_GUARD_README=path`` runs the harness on another file (e.g. a draft) instead of README.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import pytest
import transformers

pytestmark = pytest.mark.slow  # runs the README's blocks

if int(transformers.__version__.split(".")[0]) < 5:  # the README's blocks are checked on the main target, 5.x
    pytest.skip(
        "README blocks run on transformers 5.x: 4.57's LLaVA generate refuses the tiny test processor's token_type_ids",
        allow_module_level=True,
    )

ROOT = Path(__file__).resolve().parent.parent
README = Path(os.environ.get("VLM_GUARD_README") or ROOT / "README.md")
VENV_BIN = Path(sys.executable).parent

PYTHON_LANGUAGES = {"python", "py"}
SHELL_LANGUAGES = {"bash", "sh", "shell"}
CHECKED_LANGUAGES = {"bibtex", "text"}

NOT_RUN = {
    ("bash", "scripts/test.sh"): "runs this test suite, which holds this test (it would run itself); the suite is what "
    "it runs, and scripts/setup.sh, which it calls first, is run by `bash scripts/caption.sh`",
}
"""Commands never run: (program, first argument) -> why. Matched on the command's first two words."""

TINY_FAMILY_OF_HUB_ID = {
    "llava-hf/llava-1.5-7b-hf": "llava",
    "llava-hf/llava-1.5-13b-hf": "llava",
    "Qwen/Qwen2.5-VL-3B-Instruct": "qwen2_5_vl",
    "Qwen/Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
    "Qwen/Qwen2-VL-7B-Instruct": "qwen2_vl",
}
"""Hub ids the README may name -> the family of the tiny local checkpoint that replaces each."""

SMALL_TOKENS = 8
SUBSTITUTIONS: list[tuple[str, str, str]] = [
    # (pattern, replacement, why); hub ids are added per run (they name temporary folders)
    (r"([\"'])cuda(:\d+)?\1", r"\1cpu\1", "no GPU in the suite: cuda -> cpu"),
    (r"--device[ =]cuda(:\d+)?\b", "--device cpu", "no GPU in the suite"),
    (r"\bdevice=cuda(:\d+)?\b", "device=cpu", "no GPU in the suite (lmms-eval --model_args)"),
    (r"\btorch\.(float16|bfloat16|half)\b", "torch.float32", "half precision on CPU: float32"),
    (r"([\"'])(float16|bfloat16)\1", r"\1float32\1", "half precision on CPU: float32"),
    (r"--dtype[ =](float16|bfloat16)\b", "--dtype float32", "half precision on CPU: float32"),
    (r"\bdtype=(float16|bfloat16)\b", "dtype=float32", "half precision on CPU: float32 (lmms-eval --model_args)"),
    (r"\bmax_new_tokens\s*=\s*\d+", f"max_new_tokens={SMALL_TOKENS}", "short generations"),
    (r"(--(?:pope-|chair-)?max-new-tokens)[ =]\d+", rf"\1 {SMALL_TOKENS}", "short generations"),
    (
        r"(^|\n)(\s*(?:vlm-guard|python -m vlm_guard\.cli) eval (?:pope|chair|synthetic)\b)",
        rf"\1\2 --max-unclear 1 --max-new-tokens {SMALL_TOKENS} --n-resamples 50 --no-progress",
        "a random model answers no yes/no (exit 3 by design); short generations; fewer bootstrap resamples",
    ),
    (r"--budget[ =][\d.]+", "--budget 0.5", "a short tuning budget"),
    (
        r"(^|\n)(\s*(?:vlm-guard|python -m vlm_guard\.cli) tune\b)",
        rf"\1\2 --chair-max-new-tokens {SMALL_TOKENS} --pope-max-new-tokens 4 --budget 0.5 --no-progress",
        "short generations and a short tuning budget",
    ),
]


# ------------------------------------------------------------------------------------------------ the README
@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    language: str
    code: str

    @property
    def name(self) -> str:
        return f"L{self.line}-{self.language or 'none'}"


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})\s*(?P<language>[^\s`]*)\s*$")


def parse_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, in order. An unclosed fence is an error."""
    blocks, lines, index = [], text.splitlines(), 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        fence, start, body = opening["fence"], index + 1, []
        index += 1
        while index < len(lines) and not re.match(
            rf"^ {{0,3}}{re.escape(fence[0])}{{{len(fence)},}}\s*$", lines[index]
        ):
            body.append(lines[index])
            index += 1
        if index == len(lines):
            raise ValueError(f"README line {start}: code fence {fence!r} is never closed")
        blocks.append(Block(start, opening["language"].lower(), "\n".join(body) + "\n"))
        index += 1
    return blocks


def _readme_blocks() -> list[Block]:
    return parse_blocks(README.read_text(encoding="utf-8"))


def substitute(code: str, tiny_paths: dict[str, str]) -> tuple[str, list[str]]:
    """``code`` with the substitution table applied, and the reasons of the rules that changed something."""
    applied = []
    for hub_id, path in tiny_paths.items():
        if hub_id in code:
            code = code.replace(hub_id, path)
            applied.append(f"{hub_id} -> a tiny local checkpoint of the same family")
    for pattern, replacement, why in SUBSTITUTIONS:
        code, count = re.subn(pattern, replacement, code)
        if count:
            applied.append(why)
    return code, applied


# ------------------------------------------------------------------------------------------------ data in official layouts
COCO_IDS = (42, 73, 74, 139)
CATEGORIES = [
    {"id": 1, "name": "person"},
    {"id": 17, "name": "cat"},
    {"id": 18, "name": "dog"},
    {"id": 44, "name": "bottle"},
    {"id": 62, "name": "chair"},
]
_PATH_CHARS = r"[\w.\-/]"


def _coco_name(split: str, image_id: int) -> str:
    return f"COCO_{split}2014_{image_id:012d}.jpg"


def make_data(work: Path, text: str) -> None:
    """Tiny files in the official layouts at the relative paths ``text`` names (see the module docstring)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ids = set(COCO_IDS) | {int(found) for found in re.findall(r"COCO_(?:train|val)2014_(\d{12})\.jpg", text)}

    def image(path: Path) -> None:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)

    for folder, split in re.findall(rf"(?<!{_PATH_CHARS})((?:[\w.\-]+/)*(train|val)2014)(?=[\s\"'/]|$)", text):
        if not Path(folder).is_absolute():
            for image_id in sorted(ids):
                image(work / folder / _coco_name(split, image_id))
    for path in re.findall(rf"(?<!{_PATH_CHARS})((?:[\w.\-]+/)*COCO_(?:train|val)2014_\d{{12}}\.jpg)", text):
        image(work / path)
    # POPE files: the official ones (coco_pope_{split}.json) name val2014 images; a file of another name given to
    # --pope is the user's own, naming images of the split of the same command's --images folder
    pope_files = {
        path: "val"
        for path in re.findall(
            rf"(?<!{_PATH_CHARS})((?:[\w.\-]+/)*coco_pope_(?:random|popular|adversarial)\.json)", text
        )
    }
    for folder in re.findall(r"--pope-dir[ =]([\w.\-/]+)(?=\s|$)", text):
        pope_files.update({f"{folder}/coco_pope_{split}.json": "val" for split in ("random", "popular", "adversarial")})
    for command in re.split(r"\n(?![ \t])", text.replace("\\\n", " ")):
        own = re.search(r"--pope((?:\s+[\w.\-/]+\.json)+)", command)
        images = re.search(r"--images[ =][\w.\-/]*(train|val)2014\b", command)
        for path in own[1].split() if own else ():
            if not re.search(r"(^|/)coco_pope_(random|popular|adversarial)\.json$", path):
                pope_files[path] = images[1] if images else "val"
    for path, split in pope_files.items():
        questions = []
        for index, image_id in enumerate(sorted(ids)):
            questions.append(
                {
                    "question_id": 2 * index + 1,
                    "image": _coco_name(split, image_id),
                    "text": "Is there a dog in the image?",
                    "label": "yes",
                }
            )
            questions.append(
                {
                    "question_id": 2 * index + 2,
                    "image": _coco_name(split, image_id),
                    "text": "Is there a cat in the image?",
                    "label": "no",
                }
            )
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text("".join(json.dumps(question) + "\n" for question in questions))
    for path, kind, split in re.findall(
        rf"(?<!{_PATH_CHARS})((?:[\w.\-]+/)*(instances|captions)_(train|val)2014\.json)", text
    ):
        images = [
            {"id": image_id, "file_name": _coco_name(split, image_id), "height": 48, "width": 64}
            for image_id in sorted(ids)
        ]
        if kind == "instances":
            annotations = [
                {
                    "id": index + 1,
                    "image_id": image_id,
                    "category_id": CATEGORIES[index % len(CATEGORIES)]["id"],
                    "bbox": [0, 0, 10, 10],
                    "area": 100.0,
                    "iscrowd": 0,
                }
                for index, image_id in enumerate(sorted(ids))
            ]
            payload = {"images": images, "annotations": annotations, "categories": CATEGORIES}
        else:
            words = ["A dog on the grass.", "A cat on a chair.", "A man holding a bottle.", "A person and a dog."]
            annotations = [
                {"id": index + 1, "image_id": image_id, "caption": words[index % len(words)]}
                for index, image_id in enumerate(sorted(ids))
            ]
            payload = {"images": images, "annotations": annotations}
        (work / path).parent.mkdir(parents=True, exist_ok=True)
        (work / path).write_text(json.dumps(payload))


# ------------------------------------------------------------------------------------------------ runners
class BlockFailure(AssertionError):
    pass


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@dataclass
class Runner:
    """Runs blocks in ``work`` with the suite's offline environment (see the module docstring)."""

    work: Path
    env: dict[str, str]
    monkeypatch: pytest.MonkeyPatch
    clone_dir: str | None = None  # `git clone URL DIR` then `cd DIR`: this checkout

    def python(self, code: str, where: str) -> None:
        namespace = {"__name__": "__main__"}
        self.monkeypatch.chdir(self.work)
        for key, value in self.env.items():
            self.monkeypatch.setenv(key, value)
        exec(compile(code, where, "exec"), namespace)  # noqa: S102 - the README's own code

    def bash(self, code: str, where: str) -> None:
        checked = subprocess.run(["bash", "-n"], check=False, input=code, text=True, capture_output=True)
        if checked.returncode:
            raise BlockFailure(f"{where}: bash -n: {checked.stderr.strip()}")
        cwd = self.work
        for command in shell_commands(code):
            cwd = self.command(command, cwd, where)

    def command(self, words: list[str], cwd: Path, where: str) -> Path:
        env = dict(self.env)
        while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
            key, value = words.pop(0).split("=", 1)
            env[key] = value
        if not words:
            return cwd
        program, args = words[0], words[1:]
        shown = f"{where}: `{shlex.join(words)}`"
        if tuple(words[:2]) in NOT_RUN:
            return cwd
        if program == "cd":
            target = args[0] if args else "~"
            return ROOT if target == self.clone_dir else (cwd / target)
        if program == "git" and args[:1] == ["clone"]:
            rest = [arg for arg in args[1:] if not arg.startswith("-")]
            if not rest or not re.match(r"^(https?://|git@|ssh://|file://|/|\.)", rest[0]):
                raise BlockFailure(
                    f"{shown}: {rest[:1] or 'nothing'} is not a repository address (bash reads a "
                    "'<...>' placeholder as a redirection): give the address"
                )
            self.clone_dir = rest[1] if len(rest) > 1 else rest[0].rstrip("/").split("/")[-1].removesuffix(".git")
            return cwd
        if program in ("python", "python3") and args[:2] == ["-m", "vlm_guard.cli"]:
            program, args = "vlm-guard", args[2:]
        if program in ("python", "python3") and args[:2] == ["-m", "pip"]:
            program, args = "pip", args[2:]
        if program == "vlm-guard":
            self.vlm_guard(args, cwd, env, shown)
        elif program in ("python", "python3") and args[:1] == ["-c"]:
            self.work, saved = cwd, self.work
            try:
                self.python(args[1], where)
            finally:
                self.work = saved
        elif program in ("pip", "pip3"):
            check_pip(args, cwd, shown)
        elif program == "bash" and args and not Path(args[0]).is_absolute():
            script = (
                (cwd / args[0]) if (cwd / args[0]).exists() else ROOT / args[0]
            )  # the README runs from the checkout
            done = self.run_process(
                ["bash", str(script), *args[1:]], cwd, {**env, "VLM_GUARD_SKIP_INSTALL": "1"}, shown
            )
            lines = done.stdout.splitlines()
            if script.name == "caption.sh" and not (
                any(line.startswith("plain") for line in lines) and any(line.startswith("guarded") for line in lines)
            ):
                raise BlockFailure(f"{shown}: printed no plain and guarded captions:\n{done.stdout[-1500:]}")
        elif program == "lmms-eval":
            self.lmms_eval(args, cwd, env, shown)
        else:
            raise BlockFailure(
                f"{shown}: no handler for {program!r}: add one to tests/test_readme.py (run it), or list "
                "the command in NOT_RUN with the reason it cannot run"
            )
        return cwd

    def vlm_guard(self, args: list[str], cwd: Path, env: dict[str, str], shown: str) -> None:
        from vlm_guard.cli import main

        for key, value in env.items():
            self.monkeypatch.setenv(key, value)
        self.monkeypatch.chdir(cwd)
        args = [str(ROOT / arg) if _checkout_path(arg, cwd) else arg for arg in args]
        import torch

        out, err, warnings, threads = io.StringIO(), io.StringIO(), _Collect(), torch.get_num_threads()
        logging.getLogger("vlm_guard").addHandler(warnings)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(args)
        except SystemExit as exit_:
            code = exit_.code
        finally:
            logging.getLogger("vlm_guard").removeHandler(warnings)
            torch.set_num_threads(threads)  # a command's --threads must not reach the tests that run after it
        if code not in (0, None):
            raise BlockFailure(
                f"{shown} exited {code}\n--- ran: vlm-guard {shlex.join(args)}\n--- stderr (end):\n"
                f"{err.getvalue()[-3000:]}\n--- stdout (end):\n{out.getvalue()[-1500:]}"
            )
        # the test writes every file the block names: an image skipped as missing means the block's paths do not
        # fit one another (e.g. question files naming val2014 images, --images a train2014 folder)
        if "--out" in args and not (cwd / args[args.index("--out") + 1]).exists():
            raise BlockFailure(f"{shown} exited 0 but wrote no --out {args[args.index('--out') + 1]}")
        missing = [message for message in warnings.messages if "skipping image" in message and "not found" in message]
        if missing:
            raise BlockFailure(
                f"{shown}: {len(missing)} image(s) named by the block's files are not in its --images "
                f"folder, e.g. {missing[0]}"
            )

    def lmms_eval(self, args: list[str], cwd: Path, env: dict[str, str], shown: str) -> None:
        """lmms-eval exits 0 when its evaluation fails (it logs "Error during evaluation"): the run counts when it
        wrote a ``*_results.json`` under ``--output_path``."""
        if "--output_path" not in args:
            raise BlockFailure(f"{shown}: no --output_path, so nothing shows that it ran")
        out = cwd / args[args.index("--output_path") + 1]
        before = set(out.rglob("*_results.json")) if out.exists() else set()
        done = self.run_process([str(VENV_BIN / "lmms-eval"), *args], cwd, env, shown)
        written = set(out.rglob("*_results.json")) - before if out.exists() else set()
        if not written:
            errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line or "error" in line]
            raise BlockFailure(
                f"{shown}: lmms-eval wrote no results (it exits 0 on failure); its errors:\n"
                + "\n".join(errors[-8:])[-3000:]
            )

    def run_process(self, argv: list[str], cwd: Path, env: dict[str, str], shown: str) -> subprocess.CompletedProcess:
        full = {**os.environ, **env, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
        done = subprocess.run(argv, check=False, cwd=cwd, env=full, text=True, capture_output=True, timeout=900)
        if done.returncode:
            raise BlockFailure(
                f"{shown} exited {done.returncode}\n--- stderr (end):\n{done.stderr[-3000:]}\n"
                f"--- stdout (end):\n{done.stdout[-1500:]}"
            )
        return done


def _checkout_path(arg: str, cwd: Path) -> bool:
    """A relative path the README means inside the checkout (absent from the run's folder, present in the repo)."""
    if arg.startswith("-") or "/" not in arg or Path(arg).is_absolute() or (cwd / arg).exists():
        return False
    return (ROOT / arg).exists() and arg.split("/")[0] in {"scripts", "docs", "vlm_guard", "tests", "toyworld"}


def shell_commands(code: str) -> list[list[str]]:
    """The commands of a shell block: continuations joined, comments dropped, ``&&`` and ``;`` chains split.
    Pipes and redirections are refused (no handler runs them)."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        words, current = shlex.split(line, comments=True), []
        for word in [*words, "&&"]:
            if word in ("&&", ";"):
                if current:
                    commands.append(current)
                current = []
            elif word in ("|", "||", ">", ">>", "<", "&") or word.startswith(("<", ">")):
                raise BlockFailure(
                    f"shell line {line.strip()!r}: {word!r} (pipe, redirection or placeholder) has no "
                    "handler in tests/test_readme.py"
                )
            else:
                current.append(word)
    return commands


def _extras() -> set[str]:
    """The extras of the checkout's pyproject.toml (Python 3.10: of the installed distribution)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        return {extra for extra in metadata.metadata("vlm-attention-guard").get_all("Provides-Extra") or ()}
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"].get("optional-dependencies", {}))


def check_pip(args: list[str], cwd: Path, shown: str) -> None:
    """``pip install`` lines: the checkout's own extras exist; any other package is installed in this environment."""
    if args[:1] != ["install"]:
        raise BlockFailure(f"{shown}: only `pip install` is checked")
    extras = _extras()
    targets = [arg for arg in args[1:] if not arg.startswith("-")]
    if not targets:
        raise BlockFailure(f"{shown}: installs nothing")
    for target in targets:
        local = re.fullmatch(r"(\.|\./?[\w.\-/]*)(?:\[([\w,\-\s]+)\])?", target)
        if local:  # the README's commands run from the checkout's root ("." is the checkout)
            folder = (
                ROOT / local[1]
                if cwd.resolve() in (ROOT.resolve(), Path.cwd().resolve()) or local[1] in (".", "./")
                else cwd / local[1]
            )
            if not (folder / "pyproject.toml").is_file():
                raise BlockFailure(f"{shown}: {local[1]!r} is not a checkout (no pyproject.toml in {folder})")
            unknown = [
                extra.strip() for extra in (local[2] or "").split(",") if extra.strip() and extra.strip() not in extras
            ]
            if unknown:
                raise BlockFailure(f"{shown}: extra(s) {unknown} not in pyproject.toml (known: {sorted(extras)})")
            continue
        name = re.split(r"[\[<>=!~ ;]", target, maxsplit=1)[0]
        if name.lower().replace("_", "-") in ("vlm-attention-guard", "vlm-guard"):
            raise BlockFailure(f"{shown}: {name!r} is not served by any package index: install from the checkout")
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            raise BlockFailure(f"{shown}: {name!r} is not installed in the environment the suite runs in") from None


def check_bibtex(code: str) -> list[str]:
    """Problems of a BibTeX block (empty when it parses): entries ``@type{key,``, balanced braces, title, author and
    year fields, unique keys, nothing between entries."""
    problems, keys, index = [], [], 0
    while True:
        start = code.find("@", index)
        if code[index : start if start >= 0 else len(code)].strip():
            problems.append(f"text outside an entry: {code[index : start if start >= 0 else len(code)].strip()[:60]!r}")
        if start < 0:
            break
        head = re.match(r"@(\w+)\s*\{\s*([^,\s{}]+)\s*,", code[start:])
        if not head:
            problems.append(f"entry at offset {start} is not '@type{{key,': {code[start : start + 40]!r}")
            break
        depth, opening = 0, start + code[start:].index("{")
        for position in range(opening, len(code)):
            depth += {"{": 1, "}": -1}.get(code[position], 0)
            if depth == 0:
                break
        if depth:
            problems.append(f"entry {head[2]!r}: unbalanced braces")
            break
        body = code[start : position + 1]
        fields = {name.lower() for name in re.findall(r"[,{]\s*(\w+)\s*=", body)}
        missing = {"title", "author", "year"} - fields
        if missing:
            problems.append(f"entry {head[2]!r}: no {sorted(missing)}")
        keys.append(head[2])
        index = position + 1
    duplicates = sorted({key for key in keys if keys.count(key) > 1})
    if duplicates:
        problems.append(f"duplicate keys {duplicates}")
    if not keys and not problems:
        problems.append("no entry")
    return problems


def check_text(code: str) -> list[str]:
    """Problems of a text block: a ``vlm-guard ...`` line that names no command or omits a required flag."""
    from vlm_guard.cli import build_parser

    def child(parser, name):
        for action in parser._actions:
            if isinstance(getattr(action, "choices", None), dict) and name in action.choices:
                return action.choices[name]
        return None

    problems, parser = [], build_parser()
    for line in code.splitlines():
        if not line.startswith("vlm-guard "):
            continue
        words = shlex.split(re.sub(r"[()|\[\]]", " ", line.split("  #")[0]))[1:]
        command, path = parser, []
        for word in words:
            found = child(command, word)
            if found is None:
                break
            command, path = found, [*path, word]
        if not path:
            problems.append(f"{line!r} names no command")
            continue
        required = [action.option_strings for action in command._actions if action.option_strings and action.required]
        missing = [options[0] for options in required if not any(option in words for option in options)]
        if missing:
            problems.append(f"`vlm-guard {' '.join(path)}` omits required {missing}")
        known = {option for action in command._actions for option in action.option_strings}
        unknown = [word for word in words if word.startswith("--") and word.split("=")[0] not in known]
        if unknown:
            problems.append(f"`vlm-guard {' '.join(path)}` has no option(s) {unknown}")
    return problems


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory) -> dict[str, str]:
    """Hub id -> folder of a tiny checkpoint of its family, for the hub ids the README names (built once)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from tiny_processors import tiny_family_model, tiny_processor

    text, folders, paths = README.read_text(encoding="utf-8"), {}, {}
    for hub_id, family in TINY_FAMILY_OF_HUB_ID.items():
        if hub_id not in text:
            continue
        if family not in folders:
            folder = tmp_path_factory.mktemp(f"tiny_{family}")
            tiny_family_model(family).save_pretrained(folder)
            tiny_processor(family).save_pretrained(folder)
            folders[family] = str(folder)
        paths[hub_id] = folders[family]
    return paths


@pytest.fixture
def runner(tmp_path, monkeypatch) -> Runner:
    work = tmp_path / "work"
    work.mkdir()
    hub_cache = tmp_path / "hub"
    hub_cache.mkdir()
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "VLM_GUARD_CACHE": str(tmp_path / "vlm_guard_cache"),
        "VLM_GUARD_DEFAULT_MODEL": "fixture",
        "TQDM_DISABLE": "1",
    }
    return Runner(work, env, monkeypatch)


def _params():
    try:
        blocks = _readme_blocks()
    except ValueError as error:  # reported by test_readme_blocks_parse
        return [pytest.param(None, id="unparsable", marks=pytest.mark.skip(reason=str(error)))]
    params = []
    for block in blocks:
        slow = block.language in SHELL_LANGUAGES | PYTHON_LANGUAGES and re.search(
            r"lmms-eval --model|scripts/caption\.sh|\btune\b|from_pretrained\(|calibrate", block.code
        )
        params.append(pytest.param(block, id=block.name, marks=[pytest.mark.slow] if slow else []))
    return params


# ------------------------------------------------------------------------------------------------ the tests
def test_readme_blocks_parse_and_each_has_a_runner():
    blocks = _readme_blocks()
    assert blocks, f"{README} has no code block"
    known = PYTHON_LANGUAGES | SHELL_LANGUAGES | CHECKED_LANGUAGES
    unknown = [block.name for block in blocks if block.language not in known]
    assert unknown == [], (
        f"README blocks with no runner: {unknown}; give each a language this test runs or checks ({sorted(known)})"
    )


@pytest.mark.parametrize("block", _params())
def test_readme_block(block: Block, runner: Runner, tiny_checkpoints):
    where = f"{README.name}:{block.line}"
    if block.language == "bibtex":
        assert check_bibtex(block.code) == [], where
        return
    if block.language == "text":
        assert check_text(block.code) == [], where
        return
    code, _ = substitute(block.code, tiny_checkpoints)
    make_data(runner.work, code)
    if block.language in PYTHON_LANGUAGES:
        runner.python(code, where)
    elif block.language in SHELL_LANGUAGES:
        runner.bash(code, where)
    else:
        pytest.fail(f"{where}: no runner for language {block.language!r}")


# ------------------------------------------------------------------------------------------------ the harness itself
def test_harness_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    """A block in an unknown language, a command with no handler, a placeholder address, an unknown extra, an
    unpublished package and broken BibTeX are all failures (the harness cannot pass a block by doing nothing)."""
    blocks = parse_blocks("x\n```console\n$ ls\n```\n```bash\nvlm-guard --help\n```\n")
    assert [(block.line, block.language) for block in blocks] == [(2, "console"), (5, "bash")]
    with pytest.raises(ValueError, match="never closed"):
        parse_blocks("```python\nprint(1)\n")
    run = Runner(tmp_path, {}, monkeypatch)
    with pytest.raises(BlockFailure, match="no handler for 'make'"):
        run.bash("make all\n", "t")
    with pytest.raises(BlockFailure, match="placeholder"):
        run.bash("git clone <this repository> vlm-guard && cd vlm-guard\n", "t")
    with pytest.raises(BlockFailure, match="not a repository address"):
        run.bash("git clone this-repository vlm-guard && cd vlm-guard\n", "t")
    with pytest.raises(BlockFailure, match="not in pyproject"):
        check_pip(["install", "-e", ".[nonexistent-extra]"], ROOT, "t")
    with pytest.raises(BlockFailure, match="not served"):
        check_pip(["install", "vlm-attention-guard"], ROOT, "t")
    check_pip(["install", "-e", ".[dev]"], ROOT, "t")  # passes: the extra exists
    with pytest.raises(BlockFailure, match="exited 2"):
        run.bash("vlm-guard calibrate --no-such-flag\n", "t")
    with pytest.raises(ZeroDivisionError):
        run.python("1 / 0\n", "t")
    assert check_bibtex("@article{a, title={T}, author={A}, year={2024}}") == []
    assert check_bibtex("@article{a, title={T}, author={A}, year={2024}") == ["entry 'a': unbalanced braces"]
    assert check_bibtex("@article{a title={T}}")[0].startswith("entry at offset 0")
    assert check_bibtex("@misc{a, title={T}, author={A}, year=2024}\n@misc{a, title={T}, author={A}, year=2024}") == [
        "duplicate keys ['a']"
    ]
    assert check_text("vlm-guard calibrate --images DIR\n") == ["`vlm-guard calibrate` omits required ['--out']"]
    assert check_text("vlm-guard calibrate --images DIR --out D [--limt N]\n") == [
        "`vlm-guard calibrate` has no option(s) ['--limt']"
    ]
    assert check_text("vlm-guard calibrat --images DIR\n") == ["'vlm-guard calibrat --images DIR' names no command"]


def test_substitutions_and_data_layouts(tmp_path):
    code, applied = substitute(
        'm = f("org/x", dtype=torch.float16).to("cuda")\nvlm-guard eval pope --device cuda '
        "--dtype bfloat16 --images coco/val2014 --pope-dir pope\nout = g(max_new_tokens=512)\n",
        {"org/x": "/tiny"},
    )
    assert '"/tiny"' in code and "torch.float32" in code and '.to("cpu")' in code and "max_new_tokens=8" in code
    assert "--device cpu" in code and "--dtype float32" in code and "--max-unclear 1" in code and applied
    make_data(
        tmp_path,
        code + "annotations/instances_val2014.json annotations/captions_val2014.json "
        "coco/val2014/COCO_val2014_000000000999.jpg",
    )
    assert (tmp_path / "coco/val2014/COCO_val2014_000000000999.jpg").is_file()
    assert len(list((tmp_path / "coco/val2014").glob("COCO_val2014_*.jpg"))) == len(COCO_IDS) + 1
    questions = (tmp_path / "pope/coco_pope_adversarial.json").read_text().splitlines()
    assert all((tmp_path / "coco/val2014" / json.loads(line)["image"]).is_file() for line in questions)
    own = tmp_path / "own"
    make_data(
        own, "vlm-guard tune --pope mine/adversarial.json pope/coco_pope_random.json \\\n    --images coco/train2014\n"
    )
    assert json.loads((own / "mine/adversarial.json").read_text().splitlines()[0])["image"].startswith(
        "COCO_train2014_"
    )
    assert json.loads((own / "pope/coco_pope_random.json").read_text().splitlines()[0])["image"].startswith(
        "COCO_val2014_"
    )
    from vlm_guard.eval.chair import ChairGroundTruth

    truth = ChairGroundTruth.from_coco(
        tmp_path / "annotations/instances_val2014.json", tmp_path / "annotations/captions_val2014.json"
    )
    assert "dog" in truth.objects_for(42)
