"""The import layers of DESIGN.md, checked statically (ast) over uir_jax/: every `import` and
`from ... import` in a module, at its top or inside a function, counts.

  models/       imports only models/ (and the standard library / third-party packages)
  diffusion/    imports no models, systems or train
  convert/      imports no system and no train (a system's own converter lives in the system)
  train/        the spine imports no system (trainers are named by module path, imported lazily)
  systems/<a>/  imports no other system (SD-based systems may import systems/sd)
  export/reader imports no flax and no model code, also through the uir_jax modules it imports
"""

from __future__ import annotations

import ast
import os

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "uir_jax")


def _module_name(path: str) -> str:
  rel = os.path.relpath(path, os.path.dirname(PACKAGE))[:-len(".py")].replace(os.sep, ".")
  return rel.removesuffix(".__init__")


def _imports(path: str) -> list[str]:
  """Every module `path` imports (absolute names; relative imports resolved)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  package = _module_name(path)
  if not path.endswith("__init__.py"):
    package = package.rpartition(".")[0]
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out.extend(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        parts = package.split(".")
        base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
      out.append(base)
      # `from uir_jax.systems import daclip_uir` imports uir_jax.systems.daclip_uir
      out.extend(f"{base}.{alias.name}" for alias in node.names)
  return out


def _modules() -> dict[str, list[str]]:
  """uir_jax module name -> the modules it imports."""
  found = {}
  for root, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith(".py"):
        path = os.path.join(root, name)
        found[_module_name(path)] = _imports(path)
  return found


def _under(name: str, *prefixes: str) -> bool:
  return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer_violations(modules: dict[str, list[str]]) -> list[str]:
  problems = []
  ours = [m for m in modules if m.startswith("uir_jax")]
  for module in ours:
    for imported in modules[module]:
      if not _under(imported, "uir_jax"):
        continue
      bad = None
      if _under(module, "uir_jax.models") and not _under(imported, "uir_jax.models"):
        bad = "models/ imports only models/"
      elif (_under(module, "uir_jax.diffusion")
            and _under(imported, "uir_jax.models", "uir_jax.systems", "uir_jax.train")):
        bad = "diffusion imports no models, systems or train"
      elif (_under(module, "uir_jax.convert")
            and _under(imported, "uir_jax.systems", "uir_jax.train")):
        bad = "convert imports no systems or train"
      elif _under(module, "uir_jax.train") and _under(imported, "uir_jax.systems"):
        bad = "the training spine imports no system"
      elif _under(module, "uir_jax.systems") and module.count(".") >= 2:
        system = module.split(".")[2]
        other = imported.split(".")[2] if (_under(imported, "uir_jax.systems")
                                           and imported.count(".") >= 2) else None
        if other and other not in (system, "sd"):
          bad = f"a system imports no other system ({system} -> {other})"
      if bad:
        problems.append(f"{module} imports {imported}: {bad}")
  return problems


def _reader_violations(modules: dict[str, list[str]]) -> list[str]:
  """flax or model code reached from the export reader through uir_jax modules."""
  problems, seen, todo = [], set(), ["uir_jax.export.reader"]
  while todo:
    module = todo.pop()
    if module in seen:
      continue
    seen.add(module)
    for imported in modules.get(module, []):
      if _under(imported, "flax", "torch", "uir_jax.models", "uir_jax.systems", "uir_jax.train",
                "uir_jax.convert"):
        problems.append(f"{module} (reached from the export reader) imports {imported}")
      elif _under(imported, "uir_jax") and imported in modules:
        todo.append(imported)
  return problems


def test_import_layers():
  modules = _modules()
  assert "uir_jax.export.reader" in modules and "uir_jax.models.unet" in modules
  assert _layer_violations(modules) == []
  assert _reader_violations(modules) == []


def test_the_checks_catch_forbidden_imports():
  """Each rule, fed one forbidden import, reports it (a check that cannot fail proves nothing)."""
  modules = _modules()
  cases = {
      "uir_jax.models.unet": "uir_jax.losses",
      "uir_jax.diffusion.tiling": "uir_jax.models.unet",
      "uir_jax.train.loop": "uir_jax.systems.daclip_uir.irsde",
      "uir_jax.convert.nafnet": "uir_jax.systems.textual_deg_removal.guided_nafnet",
  }
  for module, imported in cases.items():
    broken = dict(modules, **{module: modules.get(module, []) + [imported]})
    assert any(imported in p for p in _layer_violations(broken)), (module, imported)
  broken = dict(modules, **{"uir_jax.systems.textual_deg_removal.stages":
                            ["uir_jax.systems.daclip_uir.conditioning", "uir_jax.systems.sd.x"]})
  problems = _layer_violations(broken)
  assert len(problems) == 1 and "daclip_uir" in problems[0]  # systems/sd is allowed
  broken = dict(modules, **{"uir_jax.export.manifest": modules["uir_jax.export.manifest"]
                            + ["flax.nnx"]})
  assert _reader_violations(broken) == ["uir_jax.export.manifest (reached from the export "
                                        "reader) imports flax.nnx"]


def test_the_export_reader_imports_without_flax(tmp_path):
  """Importing the reader (and the package it lives in) with flax and torch blocked works."""
  import subprocess
  import sys

  code = ("import sys\nfor m in ('flax', 'torch', 'uir_jax.models'): sys.modules[m] = None\n"
          "from uir_jax.export import reader, load_export\nimport uir_jax.export.manifest\n"
          "print('ok', 'flax' in sys.modules and sys.modules['flax'] is not None)")
  env = dict(os.environ, PYTHONPATH=os.path.dirname(PACKAGE), JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.split() == ["ok", "False"]
