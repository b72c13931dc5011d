"""The previous layout's module paths keep working for one release, with a DeprecationWarning (vlm_guard.moved)."""

import importlib
import sys

import pytest

from vlm_guard.moved import MOVED, TRAINING


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_module_path_is_the_new_module_with_a_warning(old):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {MOVED[old]}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(MOVED[old])


def test_the_old_imports_of_users_and_scripts_still_run():
    for old in ("vlm_guard.decoding.vhr", "vlm_guard.heads.head_map"):
        sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning):
        from vlm_guard.decoding.vhr import VHRConfig
        from vlm_guard.heads.head_map import HeadMap
    from vlm_guard.calibration.head_map import HeadMap as NewHeadMap
    from vlm_guard.methods.vhr.config import VHRConfig as NewVHRConfig

    assert HeadMap is NewHeadMap and VHRConfig is NewVHRConfig
    with pytest.warns(DeprecationWarning, match="vlm_guard.heads.HeadMap moved"):
        from vlm_guard.heads import HeadMap as Alias
    assert Alias is NewHeadMap
    import vlm_guard.methods

    assert vlm_guard.methods.vhr.__name__ == "vlm_guard.methods.vhr"  # an old import rebinds nothing in the new tree


@pytest.mark.parametrize("old", TRAINING)
def test_the_training_code_says_where_it_went(old):
    with pytest.raises(ModuleNotFoundError, match="toyworld"):
        importlib.import_module(old)
