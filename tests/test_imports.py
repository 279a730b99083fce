"""The package's import graph: no module imports itself back through others (at the top of a
file or hidden inside a function), and the training driver does not depend on the planner."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'copd_jax')


def _modules() -> dict[str, str]:
  """dotted name -> file of every module in copd_jax (a package as its __init__)."""
  out = {}
  for folder, _, files in os.walk(PACKAGE):
    for name in files:
      if name.endswith('.py'):
        parts = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].split(os.sep)
        out['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = os.path.join(folder, name)
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the copd_jax modules it imports anywhere in its file."""
  modules = _modules()
  graph = {}
  for name, path in modules.items():
    deps = set()
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
        # `from copd_jax.models import hf_io` imports the submodule when there is one.
        targets = [f'{node.module}.{a.name}' if f'{node.module}.{a.name}' in modules
                   else node.module for a in node.names]
      else:
        continue
      deps |= {t for t in targets if t in modules and t != name}
    graph[name] = deps
  return graph


def _reachable(graph, start: str) -> set[str]:
  seen, todo = set(), [start]
  while todo:
    for dep in graph[todo.pop()] - seen:
      seen.add(dep)
      todo.append(dep)
  return seen


def test_import_graph_is_found():
  graph = import_graph()
  assert 'copd_jax.topology' in graph['copd_jax.config_checks']
  assert 'copd_jax.models.presets' in graph['copd_jax.memory_plan']


def test_no_module_imports_itself_back():
  graph = import_graph()
  circles = sorted(name for name in graph if name in _reachable(graph, name))
  assert circles == [], f'modules on an import circle: {circles}'


def test_the_driver_and_the_config_do_not_depend_on_the_planner():
  graph = import_graph()
  for name in ('copd_jax.driver', 'copd_jax.config', 'copd_jax.config_checks'):
    assert 'copd_jax.memory_plan' not in _reachable(graph, name), name
