"""Node-loss scenarios on a multi-node Ray cluster, each run in a process of its own.

The integration suite shares one in-process Ray instance (`ray_local`), and a process that
has called ``ray.init`` cannot start a ``ray.cluster_utils.Cluster`` as well, so
tests/integration/test_faults.py runs every scenario here as a child process:

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 PYTHONPATH=. python -m tests.integration.fault_scenarios \
        colorize --src S --dst D --model M --ray-temp T --result R.json

The child builds the cluster (a head with no CPUs, so all work lands on worker nodes, and two
worker nodes), runs the product's own entry point, removes a worker node ungracefully
mid-run, always shuts the cluster down, and writes what it observed to R.json. The test
asserts on that JSON and, above all, on what the run left under DST.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

from tests.integration.checkpoints import registered_checkpoints, wait_for_checkpoint

LOOPBACK = "127.0.0.1"
# Logical CPUs per worker node: a colorizer actor (1 CPU), a finalize task (1 CPU) and
# prepare tasks (0.5 CPU) all fit on either node alone, so the survivor can finish the run.
WORKER_CPUS = 2
# GCS marks a node dead after failure_threshold missed health checks; Ray's defaults (3 s x 5)
# would leave the run waiting on a dead node for ~15 s of the test's budget.
SYSTEM_CONFIG = {
    "health_check_initial_delay_ms": 0,
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 500,
    "health_check_failure_threshold": 3,
}
# ray.init(address="127.0.0.1:port") swaps a loopback host for the machine's "reachable" IP,
# where no node of a loopback cluster listens. With this flag at 0 Ray takes its own address to
# be 127.0.0.1 (as on macOS), so the driver connects where the nodes are. Ray reads it once,
# at import, so it must be in the environment of the process from the start.
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
# Ray Data names the actor of a map_batches callable class "MapWorker(MapBatches(Colorizer))".
COLORIZER_ACTOR = "(Colorizer)"


def _free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextmanager
def multi_node_cluster(ray_temp: str, *, workers: int = 2) -> Iterator[Cluster]:
    """A head without CPUs plus ``workers`` worker nodes, all on loopback; driver connected.

    Always shut down on the way out, so a failed scenario leaves no raylet behind.
    """
    # Ray writes the address of the cluster it started to $RAY_TMPDIR/ray/ray_current_cluster
    # (default /tmp/ray), where a bare ray.init() of any other test on the machine would find
    # it: this process and its nodes keep that file inside the private temp dir instead.
    os.environ["RAY_TMPDIR"] = ray_temp
    if os.environ.get(LOOPBACK_ONLY) != "0":
        # Without it the driver would wait minutes on an address where nothing listens.
        raise RuntimeError(f"set {LOOPBACK_ONLY}=0 in the environment before Ray is imported")
    temp_dir = os.path.join(ray_temp, "ray")
    os.makedirs(temp_dir, exist_ok=True)
    common: dict[str, Any] = {
        "node_ip_address": LOOPBACK,
        "temp_dir": temp_dir,
        "object_store_memory": 100 * 1024 * 1024,
    }
    cluster = Cluster()
    try:
        cluster.add_node(
            **common,
            num_cpus=0,
            include_dashboard=False,
            # Ray's fixed defaults (52365, ...) may be taken by another Ray on the machine.
            dashboard_agent_listen_port=_free_port(),
            dashboard_port=_free_port(),
            _system_config=SYSTEM_CONFIG,
        )
        for _ in range(workers):
            cluster.add_node(**common, num_cpus=WORKER_CPUS)
        cluster.wait_for_nodes()
        ray.init(
            address=cluster.address,
            _node_ip_address=LOOPBACK,
            logging_level="WARNING",
            log_to_driver=False,
        )
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def alive_node_ids() -> list[str]:
    return sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])


def colorizer_actors(cluster: Cluster) -> list[dict[str, Any]]:
    """Ray Data's map actors (here: the Colorizer), from the GCS actor table.

    The state API (ray.util.state) needs the dashboard, which these clusters do not run.
    """
    return actors_by_class(cluster, COLORIZER_ACTOR)


def _wait_for_alive_nodes(count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(alive_node_ids()) != count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"expected {count} alive nodes, have {alive_node_ids()}")
        time.sleep(0.1)


# --- Scenario: a worker node dies mid-colorize ---------------------------------------------


def colorize_scenario(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.colorize import ColorizeConfig, Progress, run_colorize

    # One input per block and per batch: many small tasks on both nodes, and a manifest part
    # per block, so the removal falls between blocks that are done and blocks in flight. One
    # actor, so the removed node holds exactly the one the run depends on.
    config = ColorizeConfig(
        src=args.src,
        dst=args.dst,
        model=args.model,
        actors=1,
        batch_size=1,
        rows_per_block=1,
        flush_rows=1,
    )
    observed: dict[str, Any] = {"removals": []}
    with multi_node_cluster(args.ray_temp) as cluster:
        observed["nodes_before"] = alive_node_ids()
        worker_by_id = {node.node_id: node for node in cluster.worker_nodes}

        progress: dict[str, int] = {"done": 0}
        run_over = threading.Event()

        def note_progress(state: Progress) -> None:
            progress["done"] = state.done

        def remove_colorizer_node() -> None:
            # Watched from the side, not from the progress callback: with fast stages the
            # actor can finish every input before the first result reaches the driver.
            while not run_over.wait(0.02):
                actors = [a for a in colorizer_actors(cluster) if a["state"] == "ALIVE"]
                hosts = [a["node_id"] for a in actors if a["node_id"] in worker_by_id]
                if not hosts:  # the actor is not placed yet
                    continue
                victim = hosts[0]
                observed["removals"].append(
                    {"node_id": victim, "done": progress["done"], "actors": actors}
                )
                cluster.remove_node(worker_by_id[victim], allow_graceful=False)
                return

        remover = threading.Thread(target=remove_colorizer_node, daemon=True)
        remover.start()
        try:
            summary = run_colorize(config, software="chromascan fault test", progress=note_progress)
        finally:
            run_over.set()
            remover.join()
        # Counted after the run so the GCS has had time to mark the node dead.
        _wait_for_alive_nodes(len(observed["nodes_before"]) - len(observed["removals"]))
        observed["nodes_after"] = alive_node_ids()
        observed["actors_after"] = colorizer_actors(cluster)
    observed["summary"] = {
        "listed": summary.listed,
        "ok": summary.ok,
        "failed": summary.failed,
        "attempted": summary.attempted,
        "run_id": summary.run_id,
    }
    return observed


# --- Scenario: a training worker's node dies mid-epoch -------------------------------------


def actors_by_class(cluster: Cluster, fragment: str) -> list[dict[str, Any]]:
    table = cluster.global_state.actor_table(None)
    return [
        {
            "actor_id": info["ActorID"],
            "node_id": info["Address"]["NodeID"],
            "state": info["State"],
            "restarts": info["NumRestarts"],
            "class_name": info["ActorClassName"],
        }
        for info in table.values()
        if fragment in info["ActorClassName"]
    ]


# Queues the scenario makes to see where the scheduler puts them. One placement says little:
# left to the scheduler, a queue landed on the 0-CPU head (the driver's node) 3 times in 20.
PROBE_QUEUES = 10


def _progress_queue_placements(cluster: Cluster, count: int) -> list[dict[str, Any]]:
    """Where run_training's progress queue lands: ``count`` of them made, placed, stopped.

    The queue must live with the driver: on any other node it dies with that node, and
    the driver hears nothing more of a run that goes on.
    """
    from pipeline.training import _start_progress_pump

    pumps = [_start_progress_pump(lambda event: None) for _ in range(count)]
    for sink, _ in pumps:
        sink.put({"kind": "probe"})  # returns once the queue's actor is up, so placed
    placed = [a for a in actors_by_class(cluster, "_QueueActor") if a["state"] == "ALIVE"]
    # Stopped side by side: each stop waits out its pump's 0.5 s poll, 5 s one after another.
    stoppers = [threading.Thread(target=stop) for _, stop in pumps]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    return placed


def train_scenario(args: argparse.Namespace) -> dict[str, Any]:
    from models.config import DiscriminatorConfig, GeneratorConfig
    from pipeline.train_data import build_training_data
    from pipeline.training import RUN_FOLDER, TrainConfig, run_training

    config = TrainConfig(
        generator=GeneratorConfig(width=8, depth=6, image_size=64),
        discriminator=DiscriminatorConfig(width=8),
        epochs=args.epochs,
        decay_epochs=0,
        batch_size=2,
    )
    output = Path(args.output)
    observed: dict[str, Any] = {"removals": [], "added": []}
    with multi_node_cluster(args.ray_temp) as cluster:
        # The driver is connected to the head: Ray prefers the head among nodes on one host.
        observed["head"] = cluster.head_node.node_id
        observed["driver_node"] = ray.get_runtime_context().get_node_id()
        observed["nodes_before"] = alive_node_ids()
        worker_by_id = {node.node_id: node for node in cluster.worker_nodes}
        observed["probe_queues"] = _progress_queue_placements(cluster, PROBE_QUEUES)
        data = build_training_data(
            args.src, image_size=64, prepared_url=str(output / "data"), min_train_images=4
        )
        finished: dict[str, Any] = {}
        # As the CLI does: progress events travel from the workers through a Ray queue.
        events: list[dict[str, Any]] = []

        def train() -> None:
            try:
                finished["outcome"] = run_training(
                    data,
                    config,
                    output_url=str(output),
                    workers=2,
                    max_failures=1,
                    keep_checkpoints=2,
                    on_progress=events.append,
                )
            except Exception as err:  # handed to the main thread, which re-raises it
                finished["error"] = err

        # Training runs beside the main thread because adding a node (Ray's Node installs
        # signal handlers) only works on the main thread.
        trainer = threading.Thread(target=train, daemon=True)
        trainer.start()
        wait_for_checkpoint(output / RUN_FOLDER, "epoch_00001")
        workers = [a for a in actors_by_class(cluster, "RayTrainWorker") if a["state"] == "ALIVE"]
        hosts = sorted({a["node_id"] for a in workers if a["node_id"] in worker_by_id})
        if not hosts or not trainer.is_alive():
            raise RuntimeError(f"no training worker to take down: {workers}, {finished}")
        probes = {a["actor_id"] for a in observed["probe_queues"]}
        queue = [a for a in actors_by_class(cluster, "_QueueActor") if a["actor_id"] not in probes]
        victim = hosts[0]
        observed["removals"].append(
            {
                "node_id": victim,
                "workers": workers,
                # Registered checkpoints are the ones a restart may resume from; a folder
                # can exist before its checkpoint is complete and registered.
                "registered": registered_checkpoints(output / RUN_FOLDER),
                "folders": sorted(p.name for p in (output / RUN_FOLDER).glob("epoch_*")),
                "progress_queue": queue,
            }
        )
        cluster.remove_node(worker_by_id[victim], allow_graceful=False)
        # What an autoscaler does: a new node with the lost node's CPUs, so the worker group
        # can be placed again at full size.
        observed["added"].append(
            cluster.add_node(
                node_ip_address=LOOPBACK,
                temp_dir=os.path.join(args.ray_temp, "ray"),
                object_store_memory=100 * 1024 * 1024,
                num_cpus=WORKER_CPUS,
            ).node_id
        )
        trainer.join(timeout=args.join_timeout)
        if trainer.is_alive():
            raise TimeoutError(f"training still running {args.join_timeout} s after the removal")
        if "error" in finished:
            raise finished["error"]
        outcome = finished["outcome"]
        observed["nodes_after"] = alive_node_ids()
        observed["workers_after"] = actors_by_class(cluster, "RayTrainWorker")
        observed["events"] = [event["kind"] for event in events]
    observed["outcome"] = {
        "checkpoint": outcome.checkpoint,
        "metrics": outcome.metrics,
        "history": outcome.history,
    }
    return observed


# --- Scenario: one epoch over photos several times the size of a small object store ---------


def train_store_scenario(args: argparse.Namespace) -> dict[str, Any]:
    """A single node whose object store holds a fraction of the decoded photos; one epoch.

    Its own ray.init: the store's cap is a property of the cluster, and the shared test
    cluster's is not small.
    """
    import dataclasses

    from jobs.bench_train import StoreWatch
    from models.config import DiscriminatorConfig, GeneratorConfig
    from pipeline.train_data import build_training_data
    from pipeline.training import TrainConfig, run_training

    os.environ["RAY_TMPDIR"] = args.ray_temp  # see multi_node_cluster
    temp_dir = os.path.join(args.ray_temp, "ray")
    os.makedirs(temp_dir, exist_ok=True)
    ray.init(
        num_cpus=4,
        object_store_memory=args.store_mb * 1024 * 1024,
        _temp_dir=temp_dir,
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    output = Path(args.output)
    # Width 1: the figures are the ingest's; the model only has to consume the photos.
    config = TrainConfig(
        generator=GeneratorConfig(width=1, depth=3, image_size=256, dropout_blocks=1),
        discriminator=DiscriminatorConfig(width=1),
        epochs=1,
        decay_epochs=0,
        batch_size=16,
    )
    try:
        with StoreWatch() as preparing:
            data = build_training_data(
                args.src,
                val_url=args.val,
                image_size=256,
                prepared_url=str(output / "data"),
                min_train_images=32,
            )
        with StoreWatch() as training:
            outcome = run_training(data, config, output_url=str(output), workers=2)
    finally:
        ray.shutdown()
    return {
        "train_images": data.train_images,
        "load_size": data.load_size,
        "preparing": dataclasses.asdict(preparing.figures),
        "training": dataclasses.asdict(training.figures),
        "metrics": outcome.metrics,
    }


SCENARIOS = {
    "colorize": colorize_scenario,
    "train": train_scenario,
    "train_store": train_store_scenario,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--ray-temp", required=True, help="Ray's private temp dir (short)")
    parser.add_argument("--result", required=True, help="where to write the JSON result")
    parser.add_argument("--src")
    parser.add_argument("--dst")
    parser.add_argument("--model")
    parser.add_argument("--output", help="training output folder")
    parser.add_argument("--val", help="validation photos (train_store)")
    parser.add_argument("--store-mb", type=int, default=80, help="object store cap (train_store)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--join-timeout", type=float, default=240.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = _parser().parse_args(argv)
    observed = SCENARIOS[args.scenario](args)
    Path(args.result).write_text(json.dumps(observed, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
