"""Tensor parallelism over two nodes, as two launchers on this machine (gloo, a tiny random Llama):
`--nnodes 2 --node-rank 0|1 --tp-size 2` gives the greedy tokens of `--tp-size 2` on one node, and a node that
dies, however it dies, takes the other one down with it (exit code 1, within 10 s, nothing left behind)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest
import torch
from server_fixture import DEBUG_FLAGS, REPO, SMALL_LIMITS, RadixServer, alive, descendants, process_title
from test_models import tiny_config
from transformers import AutoModelForCausalLM

from radixserve import Engine, wire
from radixserve.config import ServerArgs

PROMPTS = [[5, 17, 33, 2, 9, 41, 100], [7, 7, 7], [200, 3, 15, 8, 99, 12, 61, 250, 4, 1, 77]]
PARAMS = {"temperature": 0, "max_new_tokens": 10, "ignore_eos": True}
DEATH_S = 10.0  # every node exits within this after another one dies


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> str:
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(tiny_config("llama"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            p.copy_((1.0 if name.endswith("norm.weight") else 0.0) + 0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("tiny-llama")
    hf.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def one_node_tokens(tiny_llama) -> list[list[int]]:
    with Engine(tiny_llama, skip_tokenizer_init=True, tp_size=2, max_total_tokens=1024, device="cpu") as eng:
        return [r["output_ids"] for r in eng.generate(input_ids=PROMPTS, sampling_params=PARAMS)]


def free_port_block(n: int) -> int:
    """A port p with p .. p+n-1 all free (torch.distributed, the node link, the remote rank's step batches)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + n < 65535 and all(_free(base + i) for i in range(1, n)):
            return base


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


class TwoNodes:
    """Node 0 (RadixServer: HTTP on a free port) and node 1 (workers only) of one TP group."""

    def __init__(self, model_dir: str, *extra: str, device: str = "cpu") -> None:
        """With device "cuda", the two launchers share one host with 2 GPUs: node 1 takes GPU 1."""
        flags = ["--model-path", model_dir, "--skip-tokenizer-init", "--device", device, "--tp-size", "2",
                 "--nnodes", "2", "--dist-init-addr", f"127.0.0.1:{free_port_block(5)}", *extra]
        node1_gpu = ["--base-gpu-id", "1"] if device == "cuda" else []
        self.node0 = RadixServer(*flags, "--node-rank", "0", wait=False)
        self.log1 = Path(os.environ.get("TMPDIR", "/tmp")) / f"radixserve-test-node1-{self.node0.port}.log"
        with open(self.log1, "wb") as log:
            self.node1 = subprocess.Popen([sys.executable, "-m", "radixserve", "serve", *SMALL_LIMITS, *DEBUG_FLAGS,
                                           *flags, *node1_gpu, "--node-rank", "1", "--log-level", "info"],
                                          cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        try:
            self.node0.wait_ready()
        except BaseException:
            self.kill()
            raise
        self.node1_children = descendants(self.node1.pid)
        assert any(b"worker-1" in process_title(p) for p in self.node1_children), self.logs()

    def __enter__(self) -> TwoNodes:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def logs(self) -> str:
        return f"node 0:\n{self.node0.log()}\nnode 1:\n{self.log1.read_text(errors='replace')[-3000:]}"

    def pids(self) -> list[int]:
        return [self.node0.proc.pid, *self.node0.child_pids, self.node1.pid, *self.node1_children]

    def wait_all_gone(self, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(alive(p) for p in self.pids()):
            time.sleep(0.1)
        return [p for p in self.pids() if alive(p)]

    def kill(self) -> None:
        for pid in [*descendants(self.node1.pid), self.node1.pid]:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.node1.wait()
        self.node0.kill()


def _exit_within(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return None


def test_two_nodes_match_one_node_and_a_killed_node_stops_both(tiny_llama, one_node_tokens):
    with TwoNodes(tiny_llama) as nodes:
        resp = nodes.node0.post("/generate", {"input_ids": PROMPTS, "sampling_params": PARAMS})
        assert resp.status_code == 200, resp.text
        assert [r["output_ids"] for r in resp.json()] == one_node_tokens
        again = nodes.node0.post("/generate", {"input_ids": PROMPTS[2], "sampling_params": PARAMS}).json()
        assert again["output_ids"] == one_node_tokens[2] and again["meta_info"]["cached_tokens"] > 0
        info = nodes.node0.get("/get_server_info").json()
        assert (info["nnodes"], info["tp_size"]) == (2, 2)

        started = time.monotonic()
        nodes.node1.send_signal(signal.SIGKILL)  # node 1's launcher: its worker goes with it
        code = nodes.node0.wait_exit(DEATH_S)
        assert code == 1, f"node 0 exited with {code} ({time.monotonic() - started:.1f} s)\n{nodes.logs()}"
        assert "node 1 is gone" in nodes.node0.log()
        assert nodes.wait_all_gone(2.0) == [], nodes.logs()


@pytest.mark.long  # make test keeps a killed node (the first test) and a dead rank stopping every node
def test_node_zero_killed_stops_node_one(tiny_llama):
    with TwoNodes(tiny_llama) as nodes:
        nodes.node0.proc.send_signal(signal.SIGKILL)  # node 0's launcher: scheduler, tokenizer, worker 0 go with it
        code = _exit_within(nodes.node1, DEATH_S)
        assert code == 1, nodes.logs()
        assert "node 0 is gone" in nodes.log1.read_text()
        assert nodes.wait_all_gone(2.0) == [], nodes.logs()


def test_a_dead_rank_stops_every_node(tiny_llama):
    """Rank 0's worker killed: node 0 stops (exit 1) and tells node 1, which stops with exit 1 too."""
    with TwoNodes(tiny_llama) as nodes:
        (rank0,) = [p for p in nodes.node0.child_pids if b"worker-0" in process_title(p)]
        os.kill(rank0, signal.SIGKILL)
        assert nodes.node0.wait_exit(DEATH_S) == 1, nodes.logs()
        assert _exit_within(nodes.node1, DEATH_S) == 1, nodes.logs()
        assert "node 0 stopped: node 0 failed" in nodes.log1.read_text()
        assert nodes.wait_all_gone(2.0) == [], nodes.logs()


@pytest.mark.long
def test_orderly_stop_of_node_zero_stops_node_one_cleanly(tiny_llama):
    with TwoNodes(tiny_llama, "--shutdown-timeout", "1") as nodes:
        code, left = nodes.node0.stop()  # SIGTERM: drain, then the scheduler's Shutdown reaches rank 1 too
        assert (code, left) == (0, []), nodes.logs()
        assert _exit_within(nodes.node1, DEATH_S) == 0, nodes.logs()
        assert nodes.wait_all_gone(2.0) == [], nodes.logs()


def test_node_with_other_flags_is_refused(tiny_llama):
    """A node that joins with other flags (here --tp-size) is a configuration error: node 0 stops and says why."""
    port = free_port_block(5)
    common = ["--model-path", tiny_llama, "--skip-tokenizer-init", "--device", "cpu", "--nnodes", "2",
              "--dist-init-addr", f"127.0.0.1:{port}"]
    node0 = RadixServer(*common, "--tp-size", "2", "--node-rank", "0", wait=False)
    try:
        link = _connect_when_listening(port + 1, timeout=120)
        with link:
            theirs = ServerArgs(model_path=tiny_llama, tp_size=4, nnodes=2, node_rank=1,
                                dist_init_addr=f"127.0.0.1:{port}")
            hello = wire.encoder.encode(wire.NodeHello(node_rank=1, server_args=msgspec.json.encode(theirs)))
            link.sendall(len(hello).to_bytes(4, "big") + hello)
            assert node0.wait_exit(DEATH_S) == 1, node0.log()
        assert "--tp-size 4 (node 0: 2)" in node0.log()
        assert node0.leftovers(2.0) == []
    finally:
        node0.kill()


def _connect_when_listening(port: int, timeout: float) -> socket.socket:
    deadline = time.monotonic() + timeout
    while True:
        try:
            return socket.create_connection(("127.0.0.1", port), timeout=1)
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_flags_are_checked():
    bad = [["--nnodes", "2", "--tp-size", "2"],  # no --dist-init-addr
           ["--nnodes", "2", "--tp-size", "3", "--dist-init-addr", "127.0.0.1:20000"],
           ["--nnodes", "2", "--node-rank", "2", "--tp-size", "2", "--dist-init-addr", "127.0.0.1:20000"]]
    for flags in bad:
        out = subprocess.run([sys.executable, "-m", "radixserve", "serve", *flags], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 2 and "error:" in out.stderr, (flags, out.stderr)


def test_leaderworkerset_args_parse():
    """The LeaderWorkerSet's leader and worker args, with LWS' variables filled in, are valid server flags."""
    import argparse

    import yaml

    lws = next(yaml.safe_load_all((REPO / "deploy" / "k8s" / "lws" / "radixserve-lws.yaml").read_text()))
    template = lws["spec"]["leaderWorkerTemplate"]
    env = {"MODEL": "org/model", "LWS_GROUP_SIZE": str(template["size"]), "LWS_LEADER_ADDRESS": "leader.lws"}
    for role, index in (("leaderTemplate", 0), ("workerTemplate", 1)):
        raw = template[role]["spec"]["containers"][0]["args"]
        values = {**env, "LWS_WORKER_INDEX": str(index)}
        argv = [re.sub(r"\$\((\w+)\)", lambda m: values[m.group(1)], a) for a in raw]  # noqa: B023
        parser = argparse.ArgumentParser()
        ServerArgs.add_cli_args(parser)
        known, _ = parser.parse_known_args(argv)  # every flag exists: tests/test_deploy.py
        args = ServerArgs.from_cli_args(known)
        assert (args.nnodes, args.node_rank, args.dist_init_addr.split(":")[0]) == (template["size"], index,
                                                                                     "leader.lws")


def test_engine_refuses_several_nodes_or_replicas():
    with pytest.raises(ValueError, match="one replica on one node"):
        Engine(tp_size=2, nnodes=2, dist_init_addr="127.0.0.1:29999")
    with pytest.raises(ValueError, match="one replica on one node"):
        Engine(dp_size=2)
