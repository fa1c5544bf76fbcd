"""Every `moejax.*` module imports on its own, first, in a fresh interpreter.

An import cycle only shows when the cycle's module is the first one imported
(importing `moejax.train` first once hid `moejax.stages`' cycle), so each module
gets an interpreter of its own. To keep this fast, one fresh interpreter imports
the third-party packages that moejax imports (never a moejax module), then forks
a child per module: each child starts with no moejax module loaded and imports
only its module. A child that hangs (a fork can inherit a lock another thread
held) is killed and its module imported in a fresh interpreter instead.
"""

import ast
import pathlib
import subprocess
import sys
import textwrap

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "moejax"


def module_names() -> list[str]:
  """Every module and package of moejax, found from the files (no import)."""
  names = []
  for path in sorted(PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    if parts[-1] != "__main__":  # A script: importing it runs it.
      names.append(".".join(parts))
  return names


def third_party_imports() -> list[str]:
  """Top-level imports of moejax's modules that are not moejax itself."""
  found = set()
  for path in PACKAGE.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if isinstance(node, ast.Import):
        found.update(alias.name for alias in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module)
  return sorted(n for n in found if n.split(".")[0] != "moejax")


_CHILD = textwrap.dedent("""
    import importlib, os, signal, subprocess, sys, time, traceback
    modules, preload = sys.argv[1].split(","), sys.argv[2].split(",")
    for name in preload:
      try:
        importlib.import_module(name)
      except Exception:  # An optional dependency; the child will say if needed.
        pass
    assert not [m for m in sys.modules if m.split(".")[0] == "moejax"]

    def forked(name, timeout=120.0):
      pid = os.fork()
      if pid == 0:
        try:
          importlib.import_module(name)
        except BaseException:
          sys.stdout.write(f"--- {name}\\n{traceback.format_exc()}")
          sys.stdout.flush()
          os._exit(1)
        os._exit(0)
      deadline = time.monotonic() + timeout
      while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
          return status == 0
        time.sleep(0.02)
      os.kill(pid, signal.SIGKILL)  # A fork can inherit a held lock: retry.
      os.waitpid(pid, 0)
      return None

    failed = []
    for name in modules:
      ok = forked(name)
      if ok is None:  # Undecided: a fresh interpreter of its own decides.
        run = subprocess.run([sys.executable, "-c", f"import {name}"],
                             capture_output=True, text=True)
        ok = run.returncode == 0
        if not ok:
          sys.stdout.write(f"--- {name}\\n{run.stderr[-3000:]}")
      if not ok:
        failed.append(name)
    print("FAILED:", " ".join(failed))
    sys.exit(1 if failed else 0)
""")


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_every_module_imports_first_in_a_fresh_interpreter():
  modules = module_names()
  assert "moejax.stages" in modules and "moejax.train.loop" in modules
  env = {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin", "TF_CPP_MIN_LOG_LEVEL": "3"}
  result = subprocess.run(
      [sys.executable, "-c", _CHILD, ",".join(modules),
       ",".join(third_party_imports())],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
