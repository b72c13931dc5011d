"""Module paths of the previous layout, kept importable for one release with a ``DeprecationWarning``.

``import vlm_guard.decoding.vhr`` (or ``from vlm_guard.heads.head_map import HeadMap``) still works: a finder on
``sys.meta_path`` imports the module's new home and registers the same module object under the old name, so
``vlm_guard.decoding.vhr.VHRConfig is vlm_guard.methods.vhr.intervention.VHRConfig``. The training code left the
package (``toyworld/`` in the repository); importing its old paths says where it went.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "vlm_guard.commands": "vlm_guard.cli",
    "vlm_guard.commands.arguments": "vlm_guard.cli.arguments",
    "vlm_guard.commands.bench": "vlm_guard.cli.bench",
    "vlm_guard.commands.caption": "vlm_guard.cli.caption",
    "vlm_guard.commands.checks": "vlm_guard.cli.checks",
    "vlm_guard.commands.heads": "vlm_guard.cli.heads",
    "vlm_guard.decoding.base": "vlm_guard.core.contract",
    "vlm_guard.decoding.bench": "vlm_guard.eval.bench",
    "vlm_guard.decoding.calls": "vlm_guard.core.calls",
    "vlm_guard.decoding.engine": "vlm_guard.core.engine",
    "vlm_guard.decoding.gift": "vlm_guard.methods.gift.intervention",
    "vlm_guard.decoding.pai": "vlm_guard.methods.pai.intervention",
    "vlm_guard.decoding.registry": "vlm_guard.methods.registry",
    "vlm_guard.decoding.var": "vlm_guard.methods.var.intervention",
    "vlm_guard.decoding.vcd": "vlm_guard.methods.vcd.intervention",
    "vlm_guard.decoding.vhr": "vlm_guard.methods.vhr.intervention",
    "vlm_guard.demo.cli": "vlm_guard.cli.demo",
    "vlm_guard.eval.cli": "vlm_guard.cli.eval",
    "vlm_guard.heads.bench": "vlm_guard.calibration.bench",
    "vlm_guard.heads.calibrate": "vlm_guard.calibration.calibrate",
    "vlm_guard.heads.cli": "vlm_guard.cli.calibrate",
    "vlm_guard.heads.gaze": "vlm_guard.methods.gift.gaze",
    "vlm_guard.heads.gift_layer": "vlm_guard.methods.gift.layer",
    "vlm_guard.heads.head_map": "vlm_guard.calibration.head_map",
    "vlm_guard.heads.head_map_schema": "vlm_guard.calibration.head_map_schema",
    "vlm_guard.heads.hub": "vlm_guard.calibration.hub",
    "vlm_guard.heads.plots": "vlm_guard.calibration.plots",
    "vlm_guard.heads.session": "vlm_guard.calibration.session",
    "vlm_guard.heads.sinks": "vlm_guard.methods.var.sinks",
    "vlm_guard.heads.tvhd": "vlm_guard.calibration.tvhd",
    "vlm_guard.heads.vhd": "vlm_guard.methods.vhr.vhd",
    "vlm_guard.integrations.lmms_eval.cli": "vlm_guard.cli.export_lmms",
    "vlm_guard.toyworld": "vlm_guard.synthetic",
    "vlm_guard.toyworld.everyday": "vlm_guard.synthetic.everyday",
    "vlm_guard.toyworld.everyday_v3": "vlm_guard.synthetic.everyday_v3",
    "vlm_guard.toyworld.examples": "vlm_guard.synthetic.examples",
    "vlm_guard.toyworld.model": "vlm_guard.synthetic.model",
    "vlm_guard.toyworld.world": "vlm_guard.synthetic.world",
    "vlm_guard.toyworld.worlds": "vlm_guard.synthetic.worlds",
    "vlm_guard.tuning.cli": "vlm_guard.cli.tune",
    "vlm_guard.tuning.settings": "vlm_guard.settings",
}

TRAINING = (
    "vlm_guard.commands.toy",
    "vlm_guard.grounding.train",
    "vlm_guard.toyworld.cli",
    "vlm_guard.toyworld.data",
    "vlm_guard.toyworld.everyday.data",
    "vlm_guard.toyworld.everyday.report",
    "vlm_guard.toyworld.everyday.train",
    "vlm_guard.toyworld.report",
    "vlm_guard.toyworld.train",
)


# old packages whose modules moved to different places: an empty package of their own, so importing one of their
# old modules does not bind that module to an attribute of the new package
OLD_PACKAGES = ("vlm_guard.decoding",)


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str | None):
        self.new = new

    def create_module(self, spec):
        return importlib.import_module(self.new) if self.new else None

    def exec_module(self, module) -> None:
        pass


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names in :data:`MOVED` (and says where the training code went)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname in TRAINING:
            raise ModuleNotFoundError(
                f"{fullname} moved out of the package: the training code is in the repository's "
                "toyworld/ folder (python -m toyworld toy --help)",
                name=fullname,
            )
        if fullname in OLD_PACKAGES:
            return importlib.util.spec_from_loader(fullname, _Alias(None), is_package=True)
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(
            f"{fullname} moved to {new}; the old name goes away in the next release", DeprecationWarning, stacklevel=2
        )
        is_package = importlib.util.find_spec(new).submodule_search_locations is not None
        return importlib.util.spec_from_loader(fullname, _Alias(new), is_package=is_package)


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, MovedModuleFinder())
