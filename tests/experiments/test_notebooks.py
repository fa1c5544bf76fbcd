"""The notebooks run top to bottom, headless, with tiny settings."""

import json
import pathlib
import sys

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = pathlib.Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
KERNEL = "moejax-test"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
  """A kernelspec for this interpreter, and the env the kernel inherits: the
  checkout importable, one CPU device, a fresh workdir."""
  spec = tmp_path / "jupyter" / "kernels" / KERNEL
  spec.mkdir(parents=True)
  (spec / "kernel.json").write_text(json.dumps({
      "argv": [sys.executable, "-m", "ipykernel_launcher", "-f",
               "{connection_file}"],
      "display_name": "moejax test", "language": "python"}))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  monkeypatch.setenv("PYTHONPATH", str(ROOT))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.setenv("XLA_FLAGS", "")  # One device: the tiny run needs no more.
  monkeypatch.setenv("MOEJAX_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("MOEJAX_STEPS", "30")
  return tmp_path


def execute(name: str, cwd: pathlib.Path) -> nbformat.NotebookNode:
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=240,
                                   resources={"metadata": {"path": str(cwd)}})
  client.execute()
  return nb


@pytest.mark.parametrize("name", ["quickstart.ipynb", "inspect_routing.ipynb"])
def test_notebook_is_stored_without_outputs(name):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(not c.outputs and c.execution_count is None for c in code)


def test_quickstart_runs(kernel_env):
  nb = execute("quickstart.ipynb", kernel_env)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  text = "".join(o.get("text", "") for o in outputs)
  assert "final held-out loss" in text
  assert "sampled 0: " in text and "sampled 1: " in text
  assert "held-out perplexity" in text and "\u27e8" in text  # Experts shown.
  assert any("image/png" in o.get("data", {}) for o in outputs)  # Loss and PPL.
  assert (kernel_env / "run" / "metrics.jsonl").exists()


def test_inspect_routing_runs(kernel_env):
  nb = execute("inspect_routing.ipynb", kernel_env)
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
  # Held-out and generated text coloured by expert.
  assert sum("text/html" in o.get("data", {}) for o in outputs) == 2
  assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
