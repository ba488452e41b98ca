"""Screenshots of the MLflow UI for a deeplabq store (not part of CI).

    python docs/screenshot_mlflow_ui.py --backend-store-uri sqlite:////abs/path/mlflow.db

Installs Debian's chromium if it is missing (apt-get, as root), starts ``mlflow server`` on a free
127.0.0.1 port, writes the deeplabq UI tags (deeplabq.mlflow_view.configure_experiment, and a saved view of
the latest sweep) unless --no-configure, and saves with headless chromium:

  docs/mlflow_runs_table.png    the experiment's runs table, deploy metrics and swept params as columns
  docs/mlflow_runs_charts.png   the same runs in the runs page's chart view (the "deploy" charts first)
  docs/mlflow_sweep_children.png  the latest sweep's child runs, same columns
  docs/mlflow_sweep_parent.png  the sweep's parent run page (its child runs under "About this run")
  docs/mlflow_compare.png       the Compare Runs page of the sweep's children

then stops the server. The pages are opened as http://deeplabq.localhost:<port> (chromium resolves
*.localhost to 127.0.0.1): on 127.0.0.1 or localhost the UI opens its Assistant panel over a third of the page.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow.tracking import MlflowClient  # noqa: E402

from deeplabq import mlflow_view  # noqa: E402

HOST = "deeplabq.localhost"


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    if os.geteuid() != 0:
        sys.exit("chromium is missing; install it (apt-get install chromium) or run this script as root")
    print("installing chromium with apt-get ...", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    return shutil.which("chromium") or sys.exit("apt-get installed chromium but it is not on PATH")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(backend_store_uri: str, port: int, log_path: Path) -> subprocess.Popen:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_store_uri,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--allowed-hosts", f"{HOST}:{port},127.0.0.1:{port},localhost:{port}",
        "--cors-allowed-origins", f"http://{HOST}:{port}",
    ]  # fmt: skip
    log = log_path.open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"mlflow server exited with status {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return server
        except OSError:
            time.sleep(1)
    stop_server(server)
    sys.exit(f"mlflow server did not answer on port {port} within 120 s:\n{log_path.read_text()[-3000:]}")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)  # its own session: the server and its uvicorn worker
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def screenshot(chromium: str, url: str, path: Path, window: str, budget_ms: int) -> None:
    with tempfile.TemporaryDirectory() as profile:  # a fresh profile: no localStorage from earlier visits
        command = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            f"--user-data-dir={profile}", f"--window-size={window}",
            f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=180)
    if result.returncode != 0 or not path.is_file():
        sys.exit(f"chromium failed on {url}:\n{result.stderr[-3000:]}")
    print(f"{path}  <-  {url}", flush=True)


def latest_sweep(client: MlflowClient, experiment_id: str):
    """The latest sweep parent (tag deeplabq.sweep = parent) and its children, best deploy/miou first."""
    parents = client.search_runs(
        [experiment_id], "tags.`deeplabq.sweep` = 'parent'", order_by=["attributes.start_time DESC"], max_results=1
    )
    if not parents:
        return None, []
    parent = parents[0]
    children = client.search_runs(
        [experiment_id],
        f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
        order_by=["metrics.`deploy/miou` DESC"],
    )
    return parent, children


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend-store-uri", required=True, help="e.g. sqlite:////abs/path/mlflow.db")
    parser.add_argument("--experiment-name", default="deeplabq")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    parser.add_argument("--window-size", default="2200,1000", help="chromium --window-size (width,height)")
    parser.add_argument("--budget-ms", type=int, default=15000, help="chromium --virtual-time-budget")
    parser.add_argument("--no-configure", action="store_true", help="do not write the deeplabq view tags")
    args = parser.parse_args()

    client = MlflowClient(args.backend_store_uri)
    experiment = client.get_experiment_by_name(args.experiment_name)
    if experiment is None:
        sys.exit(f"no experiment {args.experiment_name!r} in {args.backend_store_uri}")
    experiment_id = experiment.experiment_id
    parent, children = latest_sweep(client, experiment_id)
    sweep_view = None
    if not args.no_configure:
        mlflow_view.configure_experiment(client, experiment_id)
        if parent is not None:
            sweep_view = mlflow_view.configure_sweep_view(client, experiment_id, parent.info.run_id)

    chromium = chromium_binary()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.backend_store_uri, port, Path(tmp) / "server.log")
        try:
            base = f"http://{HOST}:{port}"

            def shoot(name: str, url: str, window: str = args.window_size, budget_ms: int = args.budget_ms) -> None:
                screenshot(chromium, url, args.out_dir / name, window, budget_ms)

            shoot("mlflow_runs_table.png", mlflow_view.runs_view_url(base, experiment_id))
            charts = mlflow_view.runs_view_url(base, experiment_id, page_mode="CHART")
            shoot("mlflow_runs_charts.png", charts, budget_ms=3 * args.budget_ms)  # the plot library loads lazily
            if parent is None:
                print("no sweep parent run (tag deeplabq.sweep = parent): no sweep or compare screenshots")
                return
            if sweep_view is not None:
                shoot("mlflow_sweep_children.png", mlflow_view.runs_view_url(base, experiment_id, view_id=sweep_view))
            shoot("mlflow_sweep_parent.png", mlflow_view.run_url(base, experiment_id, parent.info.run_id))
            if children:
                run_ids = [child.info.run_id for child in children]
                width = args.window_size.split(",")[0]
                shoot("mlflow_compare.png", mlflow_view.compare_runs_url(base, experiment_id, run_ids), f"{width},1600")
        finally:
            stop_server(server)


if __name__ == "__main__":
    main()
