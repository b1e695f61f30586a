"""The FL act's Flower server: FedAvg over the clients' logistic regressions.

Run by femd on the server node from the task's git repository, with the
runtime's interpreter. FEM-shaped like flcore's ``server_cmd.py``: arguments
``--num_clients --num_rounds --sandbox_path --certs_path``, and the listening
address and TLS files from ``FLOWER_*`` variables. Each round's metrics go to
stdout and to ``rounds.jsonl`` in the sandbox (output) directory, the final
model to ``model.json`` there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import flmodel
import flwr as fl
import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAvg


class Logged(FedAvg):  # type: ignore[misc]
    """FedAvg that reports every round and keeps the latest global model."""

    def __init__(self, out: Path, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.out = out
        self.weights = flmodel.initial()
        self.started = time.monotonic()

    def aggregate_fit(self, server_round, results, failures):  # noqa: ANN001, ANN201, D102
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.weights = parameters_to_ndarrays(params)[0]
        return params, metrics

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201, D102
        loss, _ = super().aggregate_evaluate(server_round, results, failures)
        n = sum(r.num_examples for _, r in results)
        acc = sum(r.metrics["accuracy"] * r.num_examples for _, r in results) / n
        line = {
            "round": server_round,
            "clients": len(results),
            "examples": n,
            "loss": round(float(loss), 6),
            "accuracy": round(float(acc), 6),
            "elapsed_s": round(time.monotonic() - self.started, 2),
        }
        print(json.dumps(line), flush=True)
        with (self.out / "rounds.jsonl").open("a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
        return loss, {"accuracy": acc}


def main() -> int:
    """Serve the federated training; 0 when every round completed."""
    p = argparse.ArgumentParser()
    p.add_argument("--num_clients", type=int, required=True)
    p.add_argument("--num_rounds", type=int, required=True)
    p.add_argument("--sandbox_path", type=Path, required=True)
    p.add_argument("--certs_path", type=Path, required=True)
    a = p.parse_args()
    env = os.environ
    address = f"{env['FLOWER_CENTRAL_SERVER_IP']}:{env['FLOWER_CENTRAL_SERVER_PORT']}"
    certificates = tuple(
        Path(env[k]).read_bytes()
        for k in (
            "FLOWER_SSL_CACERT",
            "FLOWER_SSL_SERVER_CERT",
            "FLOWER_SSL_SERVER_KEY",
        )
    )
    n = a.num_clients
    strategy = Logged(
        a.sandbox_path,
        fraction_fit=1.0,
        fraction_evaluate=1.0,
        min_fit_clients=n,
        min_evaluate_clients=n,
        min_available_clients=n,
        initial_parameters=ndarrays_to_parameters([flmodel.initial()]),
    )
    print(
        f"flower server on {address} (TLS), {n} clients, {a.num_rounds} rounds",
        flush=True,
    )
    history = fl.server.start_server(
        server_address=address,
        config=fl.server.ServerConfig(num_rounds=a.num_rounds),
        strategy=strategy,
        certificates=certificates,
    )
    done = len(history.losses_distributed)
    model = {
        "features": list(flmodel.FEATURES),
        "weights": [float(w) for w in np.asarray(strategy.weights)],
        "rounds": done,
    }
    (a.sandbox_path / "model.json").write_text(json.dumps(model, indent=1) + "\n")
    return 0 if done == a.num_rounds else 1


if __name__ == "__main__":
    sys.exit(main())
