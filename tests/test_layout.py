"""Where MLflow is used: the tracking layer and the served model import it; the steps and the Keras side do not."""

from __future__ import annotations

import ast

from tests.conftest import ROOT

PIPELINE = ROOT / "pipeline"
MAY_IMPORT_MLFLOW = {"serve.py"}  # besides tracking/: the served pyfunc model is an MLflow class


def imports_mlflow(path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mlflow" for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlflow":
            return True
    return False


def test_only_the_tracking_layer_and_serve_import_mlflow():
    found = {str(p.relative_to(PIPELINE)) for p in PIPELINE.rglob("*.py") if imports_mlflow(p)}
    outside = sorted(p for p in found if not p.startswith("tracking/") and p not in MAY_IMPORT_MLFLOW)
    assert outside == [], f"MLflow imported outside pipeline/tracking/: {outside}"
    assert "tracking/__init__.py" in found  # the check does see imports


def test_steps_and_the_keras_side_never_import_mlflow():
    for name in ("prepare", "train", "evaluate", "register", "main", "compare", "sweep",
                 "fitting", "model", "augment", "data", "config", "distribute", "predict", "inputs"):
        assert not imports_mlflow(PIPELINE / f"{name}.py"), name
