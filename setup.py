"""The one packaging rule pyproject.toml's static tables cannot state: the top-level configs/
folder (the YAML presets) ships inside the package as `w2s_presets`, next to every package under
proxy/ and scorers/. proxy/presets.py finds it with importlib.resources, so an installed wheel
has the presets wherever it runs. The tuned guide's LoRA adapter ships as data of `scorers`
(scorers.tuning.shipped_adapter_path). All other metadata lives in pyproject.toml; package data
is stated here only, since a pyproject package-data table would replace this one."""
from setuptools import find_namespace_packages, setup

presets = ["w2s_presets", *(f"w2s_presets.{p}" for p in find_namespace_packages(where="configs"))]

setup(
    packages=[*find_namespace_packages(include=["proxy", "proxy.*", "scorers", "scorers.*"]), *presets],
    package_dir={"w2s_presets": "configs"},
    package_data={**{p: ["*.yaml"] for p in presets}, "scorers": ["adapters/*/*"]},
)
