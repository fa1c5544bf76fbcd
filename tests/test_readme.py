"""The documentation's commands and examples run as written; its links resolve.

`test_readme_runs_in_order`: the README, followed as a reader follows it. Every
```bash and ```python block of README.md runs, in the order of the README, each
command as a subprocess of `bash -c` in the checkout (a reader's shell: one CPU
device, the console scripts beside this interpreter first on PATH, this
checkout on PYTHONPATH), each python block as a script of its own. The rules,
and the only changes made to what the README says:

- SKIPPED, and reported as a `ReadmeCommandSkipped` warning naming the command
  and the rule: `pip install ...` (needs the network; the checkout under test is
  already installed) and `pytest` (the suite that is running this test). A
  bash line joins its backslash continuations and splits at `&&`, so
  `pip install -e . && moejax-train ...` skips the install and runs the train.
- `--config.train.steps=3` is appended to every `moejax-train` command (the
  quickstart's 500 steps take minutes), so the data preparation, compilation,
  evaluation and checkpoint of a real run are all exercised.
- Paths under `/tmp/` are moved into a fresh temporary directory, so the test
  never touches a reader's runs.
- The placeholder `/path/to/*.txt` (the reader's own text files) becomes this
  checkout's Markdown (README.md, docs/*.md, experiments/README.md) copied as
  `.txt` files into a temporary directory: about 100 KB of real text.

Every ```python block of every docs/*.md runs in this process, the blocks of
one file in order in one namespace (a later block may use what an earlier one
defined). Every `moejax-train` command of the docs' ```bash blocks (pods,
several GPUs, 1,000 steps: nothing this machine can run as written) resolves
its config with `--print_config`, each override taken; the docs' other shell
lines (installs, `tfds build`, experiment and benchmark scripts) are not run.
"""

import json
import math
import os
import pathlib
import re
import resource
import shlex
import shutil
import subprocess
import sys
import time
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md"))
ALL_DOCS = [README, *DOC_FILES, ROOT / "experiments" / "README.md"]


def fenced_blocks(path: pathlib.Path) -> list[tuple[str, str]]:
  """(language, body) of every fenced block of `path`, in order."""
  return re.findall(r"^```(\w*)\n(.*?)^```$", path.read_text(), flags=re.S | re.M)


def python_blocks(path: pathlib.Path) -> list[str]:
  return [body for lang, body in fenced_blocks(path) if lang == "python"]


def run_python(blocks: list[str], name: str) -> dict:
  """Runs `blocks` in order in one namespace; returns it."""
  namespace = {"__name__": f"docs_{name}"}
  for i, block in enumerate(blocks):
    exec(compile(block, f"{name}:block{i}", "exec"), namespace)  # pylint: disable=exec-used
  return namespace


@pytest.mark.parametrize("path", DOC_FILES, ids=lambda p: p.name)
def test_docs_python_examples_run(path):
  blocks = python_blocks(path)
  namespace = run_python(blocks, path.name)
  # Every block ran to its end: the names its last lines assign exist.
  for block in blocks:
    assigned = re.findall(r"^(\w+)\s*=", block, flags=re.M)
    assert all(name in namespace for name in assigned), path.name


def test_docs_hold_the_examples_the_readme_points_to():
  """The pages the README sends a reader to for examples have them."""
  for page in ("library.md", "routers.md"):
    assert python_blocks(DOCS / page), page


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
  """Every relative link (file and, for .md targets, #anchor) exists."""
  text = path.read_text()
  links = re.findall(r"\]\(([^)\s]+)\)", text)
  assert links or path.name != "README.md"
  for link in links:
    if re.match(r"\w+://", link):
      continue
    target, _, anchor = link.partition("#")
    file = (path.parent / target).resolve() if target else path
    assert file.exists(), f"{path.name}: broken link {link}"
    if anchor and file.suffix == ".md":
      assert anchor in anchors(file), f"{path.name}: no #{anchor} in {file.name}"


def anchors(path: pathlib.Path) -> set[str]:
  """GitHub's heading anchors of a Markdown file."""
  out = set()
  for heading in re.findall(r"^#+ (.+)$", path.read_text(), flags=re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    out.add(slug)
  return out


def test_readme_is_short():
  assert len(README.read_text().splitlines()) < 250


# The README's commands ------------------------------------------------------

STEPS = 3  # Appended to every moejax-train command as --config.train.steps.
SKIP_RULES = (  # (pattern of a command's start, why it is not run here)
    (r"pip install\b", "needs the network; the checkout under test is installed"),
    (r"pytest\b", "the test suite that is running this test"),
)
PLACEHOLDER_TEXTS = "/path/to/*.txt"


class ReadmeCommandSkipped(UserWarning):
  """A README command this test does not run, and the rule that says so."""


def readme_steps() -> list[tuple[str, str]]:
  """("bash", command) and ("python", block) of the README, in order."""
  steps = []
  for lang, body in fenced_blocks(README):
    if lang == "python":
      steps.append(("python", body))
    elif lang == "bash":
      for line in body.replace("\\\n", " ").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
          steps += [("bash", c.strip()) for c in line.split("&&")]
  return steps


def skip_rule(command: str) -> str | None:
  return next((why for pattern, why in SKIP_RULES if re.match(pattern, command)),
              None)


def reader_env() -> dict[str, str]:
  """A reader's shell: one CPU device, the installed console scripts on PATH."""
  bindir = os.path.dirname(sys.executable)
  return {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"],
          "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}


def substitute(text: str, tmp: pathlib.Path, texts: pathlib.Path) -> str:
  return (text.replace("/tmp/", f"{tmp}/")
          .replace(PLACEHOLDER_TEXTS, f"{texts}/*.txt"))


def check_command(argv: list[str], stdout: str) -> None:
  """What each documented command promises, beyond exiting 0."""
  program, flags = argv[0], dict(re.findall(r"--([\w.]+)=(\S+)", " ".join(argv)))
  workdir = pathlib.Path(argv[argv.index("--workdir") + 1])
  if program == "moejax-train":
    assert f"done: step={STEPS}" in stdout, stdout[-2000:]
    config = json.loads((workdir / "config.json").read_text())
    assert config["train"]["steps"] == STEPS
    for key in ("router", "top_k"):  # Switching routers took effect.
      if f"config.model.{key}" in flags:
        assert str(config["model"]["moe"][key]) == flags[f"config.model.{key}"]
  elif program == "moejax-sample":
    assert "\u27e8" in stdout and "\u2502" in stdout, stdout[-2000:]  # ⟨e⟩, │
  elif program == "moejax-eval":
    (result,) = [json.loads(p.read_text()) for p in (workdir / "eval").glob("*.json")
                 if "text:" in p.read_text()]
    assert math.isfinite(result["eval/ppl"])


def _children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def test_readme_runs_in_order(tmp_path):
  texts = tmp_path / "texts"
  texts.mkdir()
  for doc in ALL_DOCS:
    shutil.copy(doc, texts / f"{doc.parent.name}-{doc.stem}.txt")
  runs = tmp_path / "tmp"
  runs.mkdir()
  env = reader_env()
  for program in ("moejax-train", "moejax-sample", "moejax-eval"):
    assert shutil.which(program, path=env["PATH"]), (
        f"{program} is not installed: pip install -e . (the README's first step)")
  ran = []
  for i, (lang, text) in enumerate(readme_steps()):
    text = substitute(text, runs, texts)
    if lang == "bash" and (why := skip_rule(text)):
      warnings.warn(ReadmeCommandSkipped(f"not run: `{text}` ({why})"))
      continue
    start, cpu = time.perf_counter(), _children_cpu()
    if lang == "bash":
      argv = shlex.split(text)
      if argv[0] == "moejax-train":
        text += f" --config.train.steps={STEPS}"
      proc = subprocess.run(["bash", "-c", text], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    else:
      script = tmp_path / f"readme_block_{i}.py"
      script.write_text(text)
      argv = ["python", str(script)]
      proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (
        f"README step failed: {text}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    if lang == "bash":
      check_command(argv, proc.stdout)
    ran.append(argv[0])
    print(f"{time.perf_counter() - start:6.1f} s ({_children_cpu() - cpu:5.1f} s CPU)"
          f"  {text.splitlines()[0][:80]}")
  # The quickstart as the issue names it: train first, then sample, eval and a
  # second train that switches routers; and the README's Python examples.
  assert ran[0] == "moejax-train"
  assert {"moejax-sample", "moejax-eval", "python"} <= set(ran)
  assert ran.count("moejax-train") == 2


# The docs' training commands ------------------------------------------------


def docs_train_commands() -> list[tuple[str, str]]:
  """(file, command) of every `moejax-train` command in the docs' bash blocks.

  A command is cut out of its line, so the ones a pod launcher wraps
  (`gcloud ... --command "cd moejax && moejax-train ..."`), runs in the
  background (`... &`) or prefixes with variables (`JAX_PROCESS_ID=$i`) are
  read as the command each host runs.
  """
  found = []
  for path in [*DOC_FILES, ROOT / "experiments" / "README.md"]:
    for lang, body in fenced_blocks(path):
      if lang != "bash":
        continue
      for line in body.replace("\\\n", " ").splitlines():
        for command in re.findall(r"\bmoejax-train\b[^\"&;#\n]*", line):
          found.append((path.name, command.strip()))
  return found


def leaves(tree, path=()):
  """(path, value) of every leaf of a JSON tree."""
  if isinstance(tree, dict):
    for key, value in tree.items():
      yield from leaves(value, (*path, key))
  else:
    yield path, tree


@pytest.mark.parametrize("name, command", docs_train_commands(),
                         ids=lambda c: c if c.endswith(".md") else None)
def test_docs_train_commands_resolve(name, command):
  """Every documented training command gives a valid config, overrides taken.

  Run with `--print_config` (the resolved config, then exit): a run on a pod,
  on 8 GPUs or for 1,000 steps cannot run here, but a renamed key, a value
  its type rejects or a router option that no longer exists fails this test.
  `$HOME`-style variables expand as a shell would.
  """
  argv = shlex.split(os.path.expandvars(command)) + ["--print_config"]
  proc = subprocess.run(argv, cwd=ROOT, env=reader_env(), capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 0, f"{name}: {command}\n{proc.stderr[-2000:]}"
  config = json.loads(proc.stdout[proc.stdout.index("{"):])
  values = list(leaves(config))
  for key, value in re.findall(r"--config\.([\w.]+)=(\S+)", " ".join(argv)):
    first, *_, last = key.split(".")
    assert any(path[0] == first and path[-1] == last and str(got) == value
               for path, got in values), f"{name}: --config.{key}={value} not taken"


def test_docs_have_train_commands():
  """The parse above sees the pod, multi-process and override examples."""
  names = {name for name, _ in docs_train_commands()}
  assert {"configs.md", "running.md", "data.md"} <= names
