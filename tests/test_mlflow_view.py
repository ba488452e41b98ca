"""deeplabq.mlflow_view against a real sqlite MLflow store: experiment tags, saved views, URLs."""

import json
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from mlflow.tracking import MlflowClient

from deeplabq import mlflow_view as mv


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlflow_view")
    return MlflowClient(f"sqlite:///{folder / 'mlflow.db'}"), folder  # one store: creating one takes seconds


@pytest.fixture
def store(sqlite_store, request):
    client, folder = sqlite_store
    experiment_id = client.create_experiment(f"deeplabq-{request.node.name}",
                                             artifact_location=(folder / "art").as_uri())
    return client, experiment_id


def saved_view(client, experiment_id, view_id):
    envelope = json.loads(client.get_experiment(experiment_id).tags[mv.SAVED_VIEW_TAG_PREFIX + view_id])
    return envelope, json.loads(envelope["state"])


def test_configure_experiment_sets_kind_and_deploy_view(store):
    client, experiment_id = store
    view_id = mv.configure_experiment(client, experiment_id)

    assert view_id == mv.DEFAULT_VIEW_ID
    tags = client.get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    envelope, state = saved_view(client, experiment_id, view_id)
    # The envelope the UI reads (saved views, MLflow >= 3.15): string name, number createdAt, string state.
    assert envelope["name"] == "deeplabq: deploy metrics"
    assert isinstance(envelope["createdAt"], int) and isinstance(envelope["state"], str)
    assert state["selectedColumns"] == [
        "metrics.`deploy/miou`", "metrics.`deploy/pixel_accuracy`", "metrics.`deploy/size_bytes`",
        "metrics.`deploy/latency_ms_t1`", "metrics.`deploy/latency_ms_t2`", "metrics.`deploy/delta_miou`",
        "params.`dataset.name`", "params.`quant.mode`", "params.`quant.delay_steps`",
        "params.`backbone.depth_multiplier`",
    ]
    assert state["orderByKey"] == "metrics.`deploy/miou`" and state["orderByAsc"] is False
    assert state["searchFilter"] == "" and state["lifecycleFilter"] == "Active" and state["startTime"] == "ALL"
    assert state["columnOrder"][0] == "attributes.`Run Name`"
    assert set(state["columnWidths"]) == set(state["columnOrder"])
    # Keys the UI drops when it loads a view (runsExpanded, runsPinned, ...) are not written.
    assert not {"runsExpanded", "runsPinned", "runsHidden", "runsVisibilityMap"} & set(state)


def test_configure_experiment_is_idempotent(store):
    client, experiment_id = store
    mv.configure_experiment(client, experiment_id)
    before = client.get_experiment(experiment_id).tags
    time.sleep(0.01)  # a rewrite would carry a later updatedAt

    assert mv.configure_experiment(client, experiment_id) == mv.DEFAULT_VIEW_ID
    assert client.get_experiment(experiment_id).tags == before


def test_configure_experiment_repairs_changed_tags_and_keeps_creation_time(store):
    client, experiment_id = store
    mv.configure_experiment(client, experiment_id)
    created = saved_view(client, experiment_id, mv.DEFAULT_VIEW_ID)[0]["createdAt"]
    client.set_experiment_tag(experiment_id, "mlflow.experimentKind", "genai_development")
    stale = {"name": "deeplabq: deploy metrics", "createdAt": created, "state": json.dumps({"selectedColumns": []})}
    client.set_experiment_tag(experiment_id, mv.SAVED_VIEW_TAG_PREFIX + mv.DEFAULT_VIEW_ID, json.dumps(stale))

    mv.configure_experiment(client, experiment_id)

    assert client.get_experiment(experiment_id).tags["mlflow.experimentKind"] == "custom_model_development"
    envelope, state = saved_view(client, experiment_id, mv.DEFAULT_VIEW_ID)
    assert envelope["createdAt"] == created and envelope["updatedAt"] >= created
    assert state == mv.view_state()


def test_other_columns_get_their_own_view(store):
    client, experiment_id = store
    columns = [mv.column_key("metrics", "int8/miou"), mv.column_key("params", "quant.scheme")]
    view_id = mv.configure_experiment(client, experiment_id, columns=columns)

    assert view_id.startswith("deeplabq-") and view_id != mv.DEFAULT_VIEW_ID
    assert view_id == mv.view_id_for(columns)
    assert saved_view(client, experiment_id, view_id)[1]["selectedColumns"] == columns
    assert mv.runs_view_url("http://h", experiment_id, columns).endswith(f"viewStateShareKey={view_id}")


def test_sweep_view_filters_on_the_parent(store):
    client, experiment_id = store
    parent = client.create_run(experiment_id, run_name="sweep quant.delay_steps=0,100").info.run_id
    view_id = mv.configure_sweep_view(client, experiment_id, parent)

    envelope, state = saved_view(client, experiment_id, view_id)
    assert envelope["name"] == "deeplabq sweep: sweep quant.delay_steps=0,100"
    assert state["searchFilter"] == f"tags.mlflow.parentRunId = '{parent}'"
    child = client.create_run(experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    client.create_run(experiment_id)  # not in the sweep
    found = client.search_runs([experiment_id], filter_string=state["searchFilter"])
    assert [run.info.run_id for run in found] == [child]


def test_runs_view_url_is_well_formed():
    url = mv.runs_view_url("http://127.0.0.1:5000/", "7")

    parts = urlsplit(url)
    assert (parts.scheme, parts.netloc, parts.path) == ("http", "127.0.0.1:5000", "/")
    route, _, query = parts.fragment.partition("?")
    assert route == "/experiments/7/runs"
    assert parse_qs(query) == {"workflowType": ["machine_learning"], "viewStateShareKey": ["deeplabq-deploy"]}
    # No search facet next to the view key: the UI ignores a view when the URL has one.
    assert not {"searchFilter", "orderByKey", "orderByAsc"} & set(parse_qs(query))


def test_runs_view_url_chart_mode():
    url = mv.runs_view_url("http://h", "7", page_mode="CHART")
    assert parse_qs(urlsplit(url).fragment.partition("?")[2])["compareRunsMode"] == ["CHART"]
    with pytest.raises(ValueError, match="mode"):
        mv.runs_view_url("http://h", "7", page_mode="chart")


def test_page_urls():
    assert mv.experiment_url("http://h:1", "3") == "http://h:1/#/experiments/3/runs"
    assert mv.run_url("http://h:1", "3", "abc") == "http://h:1/#/experiments/3/runs/abc?workflowType=machine_learning"
    route, _, query = urlsplit(mv.compare_runs_url("http://h:1", "3", ["a", "b"])).fragment.partition("?")
    assert route == "/compare-runs"
    args = parse_qs(query)
    assert json.loads(args["runs"][0]) == ["a", "b"] and json.loads(args["experiments"][0]) == ["3"]


def test_column_key_rejects_unknown_kinds():
    assert mv.column_key("params", "quant.mode") == "params.`quant.mode`"
    with pytest.raises(ValueError, match="column kind"):
        mv.column_key("metric", "deploy/miou")
