"""What the MLflow 3 UI shows when a deeplabq experiment is opened: the runs table, with the deploy columns.

Facts of the MLflow 3.17 UI (mlflow/server/js, checked in headless Chromium against ``mlflow server``):

* ``/#/experiments/<id>`` redirects to a tab chosen by the *workflow type*, not by the experiment: the
  ``workflowType`` URL parameter (``genai`` | ``machine_learning``), else the browser's localStorage
  (``mlflow.workflowType``, set by the sidebar's GenAI / Model training switch), else ``genai``, which
  opens Overview (traces). The ``mlflow.experimentKind`` experiment tag is no longer read for this
  (the workflow-based navigation flag is always on), so only a URL can pick the runs table.
* The runs table shows the attribute columns Source, Models and Dataset by default; no metric or param
  column. The selected columns are not URL state (the URL only carries ``searchFilter``, ``orderByKey``,
  ``orderByAsc``, ``startTime``, ``lifecycleFilter``, ``modelVersionFilter``, ``datasetsFilter`` and
  ``compareRunsMode``); they live in the browser's localStorage, or in a *saved view*.
* A saved view (MLflow >= 3.15, "Views" menu of the runs page) is the experiment tag
  ``mlflow.sharedViewState.<view id>`` holding ``{"name", "createdAt", "updatedAt", "state"}``, ``state``
  being the JSON of the search facets and table settings (``selectedColumns``, ``columnOrder``, ...).
  ``/#/experiments/<id>/runs?viewStateShareKey=<view id>`` opens it. Any search facet in the same URL makes
  the UI skip the view, so sorting and filtering are part of the view, not of the URL.

* A parent run is shown collapsed under its children's rows only when the table is sorted by creation time;
  whether it is expanded (``runsExpanded``) is neither URL state nor restored from a saved view. Sorted by a
  metric, the table lists parents and children flat.

So ``configure_experiment`` writes the kind tag (still the declared kind of the experiment) and a saved view
with the deploy metrics and swept params as columns, sorted by ``deploy/miou``; ``runs_view_url`` links to
the runs table with that view and the machine-learning workflow type. ``configure_sweep_view`` adds a view
of one sweep's child runs; ``run_url`` of a sweep parent lists its child runs.
"""

from __future__ import annotations

import hashlib
import json
import time
from urllib.parse import urlencode

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # "Machine learning" in the UI; the other choice is genai_development
SAVED_VIEW_TAG_PREFIX = "mlflow.sharedViewState."
WORKFLOW_TYPE = "machine_learning"  # the sidebar's "Model training"; the default is "genai"
RUNS_PAGE_MODES = ("TABLE", "CHART", "ARTIFACT")  # compareRunsMode: the runs page's table / chart / artifact views

DEPLOY_METRICS = (
    "deploy/miou",
    "deploy/pixel_accuracy",
    "deploy/size_bytes",
    "deploy/latency_ms_t1",
    "deploy/latency_ms_t2",
    "deploy/delta_miou",
)
SWEPT_PARAMS = ("dataset.name", "quant.mode", "quant.delay_steps", "backbone.depth_multiplier")
DEFAULT_ORDER_BY = "metrics.`deploy/miou`"
RUN_NAME_COLUMN = "attributes.`Run Name`"
DEFAULT_VIEW_ID = "deeplabq-deploy"
DEFAULT_VIEW_NAME = "deeplabq: deploy metrics"

# The UI's defaults for the facets a saved view carries (ExperimentPageSearchFacetsState).
_DEFAULT_FACETS = {
    "searchFilter": "",
    "startTime": "ALL",
    "lifecycleFilter": "Active",
    "datasetsFilter": [],
    "modelVersionFilter": "All Runs",
}
_MAX_TAG_VALUE = 20000  # mlflow.utils.validation.MAX_EXPERIMENT_TAG_VAL_LENGTH (the UI also stops at 2e4)


def column_key(kind: str, name: str) -> str:
    """The runs table's key of a column: ``metrics.`deploy/miou```, ``params.`quant.mode```."""
    if kind not in ("attributes", "metrics", "params", "tags"):
        raise ValueError(f"column kind must be attributes, metrics, params or tags, got {kind!r}")
    return f"{kind}.`{name}`"


def default_columns() -> list[str]:
    return [column_key("metrics", m) for m in DEPLOY_METRICS] + [column_key("params", p) for p in SWEPT_PARAMS]


def view_state(columns=None, *, order_by: str = DEFAULT_ORDER_BY, ascending: bool = False,
               search_filter: str = "") -> dict:
    """The state a runs-table saved view stores: search facets plus table settings."""
    columns = list(default_columns() if columns is None else columns)
    return {
        **_DEFAULT_FACETS,
        "searchFilter": search_filter,
        "orderByKey": order_by,
        "orderByAsc": ascending,
        "selectedColumns": columns,
        # The UI applies widths to the columns of columnOrder only; the run name column is wider than its
        # default 190 px so that deeplabq's run names (dataset-backbone-os-head-quant) are readable.
        "columnOrder": [RUN_NAME_COLUMN, *columns],
        "columnWidths": {RUN_NAME_COLUMN: 360, **{c: _header_width(c, sorted_by=c == order_by) for c in columns}},
        "runsHiddenMode": "SHOW_ALL",  # every run in the chart view, not the first 10
    }


def _header_width(column: str, sorted_by: bool = False) -> int:
    """Pixels that show a column's whole header (the table's default width cuts ``deploy/latency_ms_t1``)."""
    name = column.split(".", 1)[1].strip("`")
    return max(90, 6 * len(name) + 24) + (24 if sorted_by else 0)  # room for the sort arrow


def view_id_for(columns=None) -> str:
    """The saved view id of a column list: ``deeplabq-deploy`` for the default, a hash otherwise."""
    if columns is None or list(columns) == default_columns():
        return DEFAULT_VIEW_ID
    digest = hashlib.sha256(json.dumps(list(columns)).encode()).hexdigest()[:12]
    return f"deeplabq-{digest}"


def _envelope(name: str, state: dict, created_at_ms: int, updated_at_ms: int) -> str:
    return json.dumps(
        {"name": name, "createdAt": created_at_ms, "updatedAt": updated_at_ms,
         "state": json.dumps(state, separators=(",", ":"))},
        separators=(",", ":"),
    )


def save_view(client, experiment_id: str, view_id: str, name: str, state: dict) -> bool:
    """Write the runs-table saved view ``view_id`` unless it already holds ``name`` and ``state``.

    Returns whether the tag was written. A view of the same id written by the UI (its state is deflated) is
    replaced; the view's creation time is kept.
    """
    key = SAVED_VIEW_TAG_PREFIX + view_id
    existing = _read_envelope((client.get_experiment(experiment_id).tags or {}).get(key))
    if existing is not None and existing["name"] == name and existing["state"] == state:
        return False
    now = int(time.time() * 1000)
    created = existing["createdAt"] if existing is not None else now
    value = _envelope(name, state, created, now)
    if len(value) > _MAX_TAG_VALUE:
        raise ValueError(f"saved view {view_id} is {len(value)} characters, more than an experiment tag holds")
    client.set_experiment_tag(experiment_id, key, value)
    return True


def configure_experiment(client, experiment_id: str, *, columns=None, order_by: str = DEFAULT_ORDER_BY,
                         ascending: bool = False) -> str:
    """Tag a deeplabq experiment for the MLflow UI; idempotent (repeated calls write nothing). Returns the view id.

    Sets ``mlflow.experimentKind`` (the experiment's declared kind; MLflow 3.17's UI does not read it to pick
    the tab, see the module docstring) and the saved view of ``columns`` (default: deploy metrics and swept
    params), sorted by ``order_by``, which ``runs_view_url`` links to.
    """
    if (client.get_experiment(experiment_id).tags or {}).get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    view_id = view_id_for(columns)
    name = DEFAULT_VIEW_NAME if view_id == DEFAULT_VIEW_ID else f"deeplabq: {view_id.split('-', 1)[1]}"
    save_view(client, experiment_id, view_id, name, view_state(columns, order_by=order_by, ascending=ascending))
    return view_id


def sweep_view_id(parent_run_id: str) -> str:
    return f"deeplabq-sweep-{parent_run_id[:12]}"


def configure_sweep_view(client, experiment_id: str, parent_run_id: str, *, name: str | None = None,
                         columns=None) -> str:
    """A saved view of one sweep: its child runs (``tags.mlflow.parentRunId``) with the deploy columns.

    The UI cannot show a parent expanded from a URL or a view (``runsExpanded`` is not restored), and sorting
    by a metric lists runs flat, so the view filters on the parent and sorts by ``deploy/miou``. One tag per
    sweep; returns the view id for ``runs_view_url(..., view_id=...)``.
    """
    view_id = sweep_view_id(parent_run_id)
    if name is None:
        name = f"deeplabq sweep: {client.get_run(parent_run_id).info.run_name}"[:200]
    state = view_state(columns, search_filter=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    save_view(client, experiment_id, view_id, name, state)
    return view_id


def _read_envelope(value: str | None) -> dict | None:
    if not value:
        return None
    try:
        envelope = json.loads(value)
        return {"name": envelope["name"], "createdAt": int(envelope["createdAt"]),
                "state": json.loads(envelope["state"])}
    except (ValueError, KeyError, TypeError):
        return None  # a view written by the UI (deflate-compressed state) or something else: rewrite it


def runs_view_url(
    base_url: str, experiment_id: str, columns=None, *, view_id: str | None = None,
    workflow_type: str = WORKFLOW_TYPE, page_mode: str | None = None,
) -> str:
    """URL of the experiment's runs table showing ``columns`` (default: deploy metrics and swept params).

    The UI takes no column list from a URL, so the URL names the saved view that ``configure_experiment``
    wrote for the same columns (``viewStateShareKey``); sorting and filters come from that view too.
    ``workflowType`` makes the sidebar show the model-training navigation instead of the GenAI one.
    ``page_mode``: ``CHART`` opens the chart view (a "deploy" section of bar charts first), ``TABLE`` is the default.
    """
    if page_mode is not None and page_mode not in RUNS_PAGE_MODES:
        raise ValueError(f"page_mode must be one of {RUNS_PAGE_MODES}, got {page_mode!r}")
    view_id = view_id or view_id_for(columns)
    args = {"workflowType": workflow_type, "viewStateShareKey": view_id}
    if page_mode is not None:
        args["compareRunsMode"] = page_mode  # not a search facet: the view still applies
    return f"{experiment_url(base_url, experiment_id, tab='runs')}?{urlencode(args)}"


def experiment_url(base_url: str, experiment_id: str, tab: str = "runs") -> str:
    """Plain URL of an experiment tab (``runs``, ``models``, ``traces``, ...), no view, no query."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/{tab}"


def run_url(base_url: str, experiment_id: str, run_id: str, *, workflow_type: str = WORKFLOW_TYPE) -> str:
    """A run's page; for a sweep parent it lists the child runs ("Child runs" under "About this run")."""
    query = urlencode({"workflowType": workflow_type})
    return f"{experiment_url(base_url, experiment_id, tab='runs')}/{run_id}?{query}"


def compare_runs_url(base_url: str, experiment_id: str, run_ids, *, workflow_type: str = WORKFLOW_TYPE) -> str:
    """The Compare Runs page (parallel coordinates, params and metrics side by side) of ``run_ids``."""
    query = urlencode({"runs": json.dumps(list(run_ids)), "experiments": json.dumps([str(experiment_id)]),
                       "workflowType": workflow_type})
    return f"{base_url.rstrip('/')}/#/compare-runs?{query}"
