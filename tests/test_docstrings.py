"""Every docstring example in kstep runs, and every annotation is an object, not a string.

The examples are doctests (``>>>``) on tiny data; this module runs them for every module of the
package, found with ``pkgutil`` (a new module is covered without being listed here).
Annotations: ``from __future__ import annotations`` turns them into strings, and optax's own
checks (``inspect.signature``, ``typing.get_type_hints``) then skip or misread kstep's factories.
"""

import doctest
import importlib
import inspect
import pkgutil
import typing

import optax
import pytest

import kstep

MODULES = sorted(
    m.name for m in pkgutil.walk_packages(kstep.__path__, prefix="kstep.")
) + ["kstep"]


def _module(name):
  return importlib.import_module(name)


def _defined_here(module):
  """Functions and classes defined in ``module`` (not imported into it)."""
  return [
      obj for _, obj in sorted(vars(module).items())
      if (inspect.isfunction(obj) or inspect.isclass(obj))
      and getattr(obj, "__module__", None) == module.__name__
  ]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
  module = _module(name)
  finder = doctest.DocTestFinder(exclude_empty=True)
  runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
  for test in finder.find(module, name):  # globals: the module's own, as doctest.testmod
    runner.run(test)
  failed, attempted = runner.summarize(verbose=False)
  assert failed == 0, f"{failed} of {attempted} doctest examples in {name} failed (see stdout)"


def test_every_module_has_doctests_where_it_shows_code():
  """A docstring that shows code (``::`` blocks) shows it as a doctest, so the test runs it."""
  offenders = []
  for name in MODULES:
    module = _module(name)
    for obj in [module, *_defined_here(module)]:
      doc = inspect.getdoc(obj) or ""
      if "::\n" in doc and ">>>" not in doc:
        offenders.append(f"{name}.{getattr(obj, '__qualname__', '')}")
  assert not offenders, offenders


@pytest.mark.parametrize("name", MODULES)
def test_annotations_are_objects(name):
  """Module-level functions carry objects; a method may quote its own class (a forward
  reference), as long as every annotation resolves."""
  module = _module(name)
  for obj in _defined_here(module):
    if inspect.isfunction(obj):
      sig = inspect.signature(obj)
      raw = {p.name: p.annotation for p in sig.parameters.values()}
      raw["return"] = sig.return_annotation
      strings = {k: v for k, v in raw.items() if isinstance(v, str)}
      assert not strings, f"{name}.{obj.__qualname__}: string annotations {strings}"
      typing.get_type_hints(obj)
    else:
      for fn in (f for f in vars(obj).values() if inspect.isfunction(f)):
        typing.get_type_hints(fn, globalns=vars(module))  # every annotation resolves


def test_learning_rate_annotations_are_optax_schedules():
  """What optax's schedule test reads (``inspect.signature``) for the factories taking η."""
  for factory in (kstep.track_batch_sharpness, kstep.track_lambda_max, kstep.track_k,
                  kstep.k_controlled_sgd):
    annotation = inspect.signature(factory).parameters["learning_rate"].annotation
    members = set(typing.get_args(annotation)) - {type(None)}
    assert annotation is optax.ScalarOrSchedule or members == set(
        typing.get_args(optax.ScalarOrSchedule)), (factory.__name__, annotation)
