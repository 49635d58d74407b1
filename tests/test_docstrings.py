"""Every docstring example in kstep runs, and every annotation is an object, not a string.

The examples are doctests (``>>>``) on tiny data; this module runs them for every module of the
package, found with ``pkgutil`` (a new module is covered without being listed here).
Annotations: ``from __future__ import annotations`` turns them into strings, and optax's own
checks (``inspect.signature``, ``typing.get_type_hints``) then skip or misread kstep's factories.
"""

import doctest
import importlib
import inspect
import pathlib
import pkgutil
import re
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
      # Methods written here (not those a dataclass decorator generates from a base's fields).
      for fn in (f for n, f in vars(obj).items() if inspect.isfunction(f) and n != "__init__"):
        typing.get_type_hints(fn, globalns=vars(module))  # every annotation resolves


def test_learning_rate_annotations_are_optax_schedules():
  """What optax's schedule test reads (``inspect.signature``) for the factories taking η."""
  for factory in (kstep.track_batch_sharpness, kstep.track_lambda_max, kstep.track_k,
                  kstep.k_controlled_sgd):
    annotation = inspect.signature(factory).parameters["learning_rate"].annotation
    members = set(typing.get_args(annotation)) - {type(None)}
    assert annotation is optax.ScalarOrSchedule or members == set(
        typing.get_args(optax.ScalarOrSchedule)), (factory.__name__, annotation)


def _args_entries(doc: str) -> dict[str, list[str]]:
  """The ``Args:`` section of a Google-style docstring: argument -> its lines."""
  lines = doc.split("\n")
  start = lines.index("Args:") + 1
  entries, current = {}, None
  for line in lines[start:]:
    if line and not line.startswith(" "):
      break  # the next section
    m = re.match(r"^  (\w+): ", line)
    if m:
      current = m.group(1)
      entries[current] = [line]
    elif current is not None and line.strip():
      entries[current].append(line)
  return entries


def test_k_controlled_sgd_docstring_is_a_contract():
  """The optimizer users call documents every argument (≤ 6 lines each), in optax's template,
  with links to the papers, and keeps its signature short."""
  params = inspect.signature(kstep.k_controlled_sgd).parameters
  assert len(params) <= 14, list(params)
  doc = inspect.getdoc(kstep.k_controlled_sgd)
  for section in ("Args:", "Returns:", "Raises:", "Example:", "References:"):
    assert f"\n{section}\n" in doc, section
  entries = _args_entries(doc)
  assert list(entries) == list(params)
  assert all(len(v) <= 6 for v in entries.values()), {k: len(v) for k, v in entries.items()}
  references = doc.split("\nReferences:\n")[1]
  for arxiv in ("2404.19261", "2103.00065", "2412.20553", "2604.14108"):
    assert f"https://arxiv.org/abs/{arxiv}" in references, arxiv
  # The lower-level transforms document their own arguments too (fewer words, same names).
  for factory in (kstep.scale_by_k_control, kstep.value_and_grad, kstep.Estimate, kstep.Guard):
    doc = inspect.getdoc(factory)
    names = _args_entries(doc) if "\nArgs:\n" in doc else _attributes(doc)
    assert set(names) == set(inspect.signature(factory).parameters), factory.__name__


def _attributes(doc: str) -> dict[str, list[str]]:
  return _args_entries(doc.replace("\nAttributes:\n", "\nArgs:\n"))


# Words of a diary of the work: they belong in git history, not in the package or its docs.
DIARY = re.compile(r"\bsession\b|\bissue \d+|\bbenchmarks README\b|\bdesign doc\b|until "
                   r"[0-9a-f]{7}\b|\bprevious defaults?\b", re.IGNORECASE)


def test_no_diary_in_docstrings_and_docs():
  root = pathlib.Path(kstep.__file__).parent.parent
  texts = {str(p.relative_to(root)): p.read_text() for p in root.joinpath("kstep").rglob("*.py")}
  for path in [root / "README.md", root / "CONTRIBUTING.md", root / "benchmarks" / "README.md",
               *root.glob("docs/*.md")]:
    texts[str(path.relative_to(root))] = path.read_text()
  hits = {name: DIARY.findall(text) for name, text in texts.items() if DIARY.search(text)}
  assert not hits, hits


def test_doc_references_resolve():
  """Every ``docs/<file>.md`` named in the package, the README and the docs exists."""
  root = pathlib.Path(kstep.__file__).parent.parent
  sources = [*root.joinpath("kstep").rglob("*.py"), root / "README.md", *root.glob("docs/*.md")]
  named = set()
  for path in sources:
    named |= set(re.findall(r"docs/(\w+\.md)", path.read_text()))
    if path.parent.name == "docs":  # relative links between the docs
      named |= set(re.findall(r"\]\((\w+\.md)", path.read_text()))
  assert named, "no reference found: the pattern is stale"
  missing = sorted(n for n in named if not (root / "docs" / n).exists())
  assert not missing, missing
