"""Shared test helpers."""

import importlib.util
import pathlib
import types

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> types.ModuleType:
  """The script ``examples/<name>.py`` as a module (its ``main`` is not run)."""
  spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
