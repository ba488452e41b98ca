"""The shape of the package: jobs above libraries, no import cycles, quant modes only in their registry,
modules a newcomer can read; and the registry itself, parametrized over what is registered."""

import ast
import re
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from deeplabq import quant_modes
from deeplabq.export import VARIANTS, ExportPlan
from deeplabq.quant_modes import QuantMode, register, unregister

from .conftest import CONF_DIR, TINY, compose_config, only_run

PACKAGE = Path(__file__).resolve().parent.parent / "deeplabq"
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The package modules ``name`` imports anywhere in its file (inside functions too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph = {name: _imports(path, name, modules) for name, path in modules.items()}
    # A package's __init__ re-exporting its own submodules is not an edge back up.
    for name in graph:
        graph[name] = {t for t in graph[name] if not (name.startswith(t + ".") and modules[t].name == "__init__.py")}
    return graph


def _reaches(graph, start, goal) -> list[str] | None:
    stack, seen = [(start, [start])], set()
    while stack:
        node, path = stack.pop()
        for nxt in graph.get(node, ()):
            if nxt == goal:
                return [*path, nxt]
            if nxt not in seen:
                seen.add(nxt)
                stack.append((nxt, [*path, nxt]))
    return None


def test_there_is_no_import_cycle_even_inside_functions():
    graph = _graph()
    cycles = [path for name in graph if (path := _reaches(graph, name, name))]
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_no_library_imports_a_job():
    graph = _graph()
    wrong = {name: sorted(t for t in targets if t.startswith("deeplabq.tasks"))
             for name, targets in graph.items() if not name.startswith("deeplabq.tasks")}
    assert not {k: v for k, v in wrong.items() if v}


def test_only_jobs_use_the_quant_mode_registry():
    graph = _graph()
    users = {name for name, targets in graph.items() if any(t.startswith("deeplabq.quant_modes") for t in targets)}
    assert users and all(u.startswith(("deeplabq.tasks", "deeplabq.quant_modes")) for u in users), users


# `mode == ...`, `quant.mode in ...`, or a comparison with a mode-only name ("float" is also a file's name)
MODE_COMPARISON = re.compile(r"(quant\.mode|\bmode)\s*(==|!=|\bin\b|\bnot in\b)"
                             r"|(==|!=)\s*[\"'](ptq|qat_delayed|qat_finetune)[\"']")


def test_quant_mode_names_are_compared_only_inside_the_registry():
    hits = []
    for name, path in _modules().items():
        if name.startswith("deeplabq.quant_modes"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if MODE_COMPARISON.search(line) and "RunMode" not in line:
                hits.append(f"{path.relative_to(PACKAGE.parent)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_every_module_is_short_enough_to_read(name):
    lines = len(_modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (> {MAX_LINES})"


# ---------------------------------------------------------------------------------------------- the registry

QUANT_YAMLS = sorted(p.stem for p in (CONF_DIR / "quant").glob("*.yaml"))


def test_every_registered_mode_has_its_yaml_and_every_yaml_its_mode():
    assert sorted(quant_modes.names()) == QUANT_YAMLS


@pytest.mark.parametrize("name", sorted(quant_modes.names()))
def test_each_mode_composes_and_plans_files_it_can_export(tmp_path, name):
    overrides = [f"quant={name}", "quant.float_checkpoint=/runs/float", "quant.delay_steps=100"]
    spec, mode = quant_modes.validate_config(compose_config(tmp_path, overrides))
    assert mode.name == name == spec.quant.mode
    plan = mode.export_plan(spec)
    assert plan.variants and set(plan.variants) <= set(VARIANTS), plan
    assert plan.shipped in plan.variants
    assert plan.qat == ("qat_int8" in plan.variants)


def test_an_unknown_mode_is_refused_naming_the_registered_ones(tmp_path):
    with pytest.raises(ValueError, match=r"quant\.mode must be one of .*'qat_delayed'.*got 'int4'"):
        quant_modes.validate_config(compose_config(tmp_path, ["quant.mode=int4"]))


class FloatFileOnly(QuantMode):
    """A mode written in a test: trains nothing, ships the float file of the model as built."""

    name = "float_file_only"

    def run_name_parts(self, quant):
        return ["untrained"]

    def export_plan(self, spec):
        return ExportPlan(("float",), shipped="float")

    def train(self, model, context):
        return model, model


def test_a_new_mode_is_one_class_and_the_train_job_runs_it(tmp_path):
    from deeplabq.tasks.train import train

    register(FloatFileOnly)
    try:
        cfg = compose_config(tmp_path, [*TINY, "quant.mode=float_file_only"])
        metrics = train(cfg, tmp_path / "run")
    finally:
        unregister(FloatFileOnly.name)
    run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name.startswith("float_file_only-untrained-dm0.5")
    assert run.data.tags["deeplabq.deploy_artifact"] == "float"
    assert metrics["deploy/miou"] == metrics["float/miou"] and "qat_int8/miou" not in metrics
    assert not (tmp_path / "run" / "checkpoints").exists()  # its train hook trained nothing
    assert MlflowClient(cfg.tracking.tracking_uri).get_run(run.info.run_id).data.params["quant.mode"] == \
        "float_file_only"
