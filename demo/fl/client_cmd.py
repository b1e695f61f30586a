"""The FL act's Flower client: trains the logistic regression on its own cohort.

Run by femd on each data node from the task's git repository, with the
runtime's interpreter. FEM-shaped like flcore's ``client_cmd.py``: arguments
``--num_rounds --data_id --node_name --sandbox_path``; the server's address
and the CA that signed its certificate come from ``FLOWER_*`` variables. Only
model weights and counts leave the node, over TLS, to that one server.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import flmodel
import flwr as fl


class Cohort(fl.client.NumPyClient):  # type: ignore[misc]
    """This node's cohort: local training and evaluation, weights in and out."""

    def __init__(self, data: Path, name: str) -> None:
        self.x, self.y = flmodel.load(data)
        self.name = name
        self.rounds = 0

    def get_parameters(self, config):  # noqa: ANN001, ANN201, D102
        return [flmodel.initial()]

    def fit(self, parameters, config):  # noqa: ANN001, ANN201, D102
        self.rounds += 1
        w = flmodel.train(parameters[0], self.x, self.y)
        return [w], len(self.y), {}

    def evaluate(self, parameters, config):  # noqa: ANN001, ANN201, D102
        loss, acc = flmodel.evaluate(parameters[0], self.x, self.y)
        print(f"{self.name}: round {self.rounds} local accuracy {acc:.4f}", flush=True)
        return loss, len(self.y), {"accuracy": acc}


def main() -> int:
    """Join the federated training; 0 when the server ended the session."""
    p = argparse.ArgumentParser()
    p.add_argument("--num_rounds", type=int, required=True)
    p.add_argument("--data_id", type=Path, required=True)
    p.add_argument("--node_name", required=True)
    p.add_argument("--sandbox_path", type=Path, required=True)
    a = p.parse_args()
    env = os.environ
    address = f"{env['FLOWER_CENTRAL_SERVER_IP']}:{env['FLOWER_CENTRAL_SERVER_PORT']}"
    client = Cohort(a.data_id, a.node_name)
    print(
        f"{a.node_name}: {len(client.y)} patients; server {address} (TLS)", flush=True
    )
    fl.client.start_client(
        server_address=address,
        client=client.to_client(),
        root_certificates=Path(env["FLOWER_SSL_CACERT"]).read_bytes(),
        max_wait_time=60.0,
    )
    report = {"node": a.node_name, "patients": len(client.y), "rounds": client.rounds}
    (a.sandbox_path / "client.json").write_text(json.dumps(report) + "\n")
    return 0 if client.rounds == a.num_rounds else 1


if __name__ == "__main__":
    sys.exit(main())
