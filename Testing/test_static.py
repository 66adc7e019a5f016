"""Static checks that keep the Slicer packaging honest (no Slicer application needed)."""
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["CoRXRegistration", "TIAMapping"]
S4EXT_FIELDS = ["scm", "scmurl", "scmrevision", "depends", "build_subdirectory", "homepage", "contributors",
                "category", "iconurl", "status", "description", "screenshoturls", "enabled"]


def cmake_listed_files(cmake_text: str, module: str):
    files = []
    for block in re.findall(r"set\(MODULE_PYTHON_(?:SCRIPTS|RESOURCES)(.*?)\)", cmake_text, flags=re.S):
        for token in block.split():
            files.append(token.replace("${MODULE_NAME}", module))
    return files


@pytest.mark.parametrize("module", MODULES)
def test_every_cmake_listed_file_exists(module):
    files = cmake_listed_files((ROOT / module / "CMakeLists.txt").read_text(), module)
    assert files, "no files listed"
    missing = [f for f in files if not (ROOT / module / f).is_file()]
    assert not missing, f"{module}/CMakeLists.txt lists missing files: {missing}"


@pytest.mark.parametrize("module", MODULES)
def test_every_lib_file_is_listed_in_cmake(module):
    files = set(cmake_listed_files((ROOT / module / "CMakeLists.txt").read_text(), module))
    on_disk = {str(p.relative_to(ROOT / module)) for p in (ROOT / module / f"{module}Lib").rglob("*.py")}
    assert on_disk - files == set(), f"not packaged by CMake: {sorted(on_disk - files)}"


@pytest.mark.parametrize("module", MODULES)
def test_ui_defines_every_widget_the_module_uses(module):
    code = (ROOT / module / f"{module}.py").read_text()
    used = set(re.findall(r"self\.ui\.(\w+)", code))
    tree = ET.parse(ROOT / module / "Resources" / "UI" / f"{module}.ui")
    defined = {w.get("name") for w in tree.iter("widget")}
    assert used, "module uses no widget"
    assert used <= defined, f"{module}.py uses widgets missing from the .ui: {sorted(used - defined)}"


@pytest.mark.parametrize("module", MODULES)
def test_module_shape(module):
    code = (ROOT / module / f"{module}.py").read_text()
    for cls in (module, f"{module}Widget", f"{module}Logic", f"{module}Test"):
        assert re.search(rf"^class {cls}\(", code, flags=re.M), f"{module}.py lacks class {cls}"
    assert "slicer_add_python_unittest" in (ROOT / module / "Testing" / "Python" / "CMakeLists.txt").read_text()
    assert (ROOT / module / "Resources" / "Icons" / f"{module}.png").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_lib_never_imports_slicer_or_qt(module):
    for path in (ROOT / module / f"{module}Lib").rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(import|from)\s+(slicer|qt|ctk|vtk)\b", text, flags=re.M), path


def test_s4ext_has_every_required_field():
    fields = {}
    for line in (ROOT / "CoRXExtension.s4ext").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            fields[key] = value.strip()
    missing = [f for f in S4EXT_FIELDS if not fields.get(f)]
    assert not missing, f".s4ext lacks {missing}"


def test_extension_cmake_adds_every_module():
    text = (ROOT / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer"):
        assert key in text
    for module in MODULES:
        assert f"add_subdirectory({module})" in text


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "make test" in (ROOT / "README.md").read_text()
