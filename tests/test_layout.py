"""The package's import graph: no cycle, and the layering the design states.

Parsed from the source (``ast``), so the check covers function-level imports too.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PKG = ROOT / "eagle_jax"


def _module(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _graph() -> dict[str, set[str]]:
  modules = {_module(p): p for p in PKG.rglob("*.py")}
  graph = {m: set() for m in modules}
  for m, path in modules.items():
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      for n in names:
        if n in modules and n != m:
          graph[m].add(n)
  return graph


def _cycle(graph):
  state, stack = {}, []

  def visit(m):
    state[m] = 1
    stack.append(m)
    for n in sorted(graph[m]):
      if state.get(n) == 1:
        return stack[stack.index(n):] + [n]
      if n not in state and (c := visit(n)):
        return c
    state[m] = 2
    stack.pop()
    return None

  for m in sorted(graph):
    if m not in state and (c := visit(m)):
      return c
  return None


def test_no_import_cycle_between_modules():
  graph = _graph()
  # A package's __init__ re-exporting its modules is not a cycle of logic.
  graph = {m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()}
  assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_elm_and_embed_reach_the_environment_only_through_the_client_protocol():
  allowed = {"eagle_jax.env", "eagle_jax.env.client"}
  for m, deps in _graph().items():
    if m.startswith(("eagle_jax.elm", "eagle_jax.embed")):
      bad = sorted(d for d in deps if d.startswith("eagle_jax.env") and d not in allowed)
      assert not bad, f"{m} imports {bad}"


def test_lower_layers_never_import_higher_ones():
  order = ["eagle_jax.data", "eagle_jax.models", "eagle_jax.env", "eagle_jax.agent",
           "eagle_jax.evaluation"]
  rank = lambda m: next((i for i, p in enumerate(order) if m.startswith(p)), None)
  for m, deps in _graph().items():
    for d in deps:
      if rank(m) is not None and rank(d) is not None:
        assert rank(d) <= rank(m), f"{m} (layer {order[rank(m)]}) imports {d}"


def test_every_module_has_about_500_lines_at_most():
  long = {str(p.relative_to(ROOT)): n for p in PKG.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > 530}
  assert not long, f"modules over ~500 lines (split them by job): {long}"
