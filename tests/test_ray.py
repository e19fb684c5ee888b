"""Ray: `vpt-fast eval --ray` (Ray Data over an actor pool) writes the rows local evaluation
writes; `vpt-fast serve --ray` (Ray Serve replicas) gives the engine's answers. One local
cluster for the module: a head with two logical GPUs and two worker nodes with one each."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from eval_cases import MAX_NEW_TOKENS, SCRIPT, assert_rows, data_url, read_rows, write_dataset
from vpt_cases import rand_image, toks

ray = pytest.importorskip("ray")
pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")
from ray.cluster_utils import Cluster  # noqa: E402

from vpt_fast.engine import Engine  # noqa: E402
from vpt_fast.scale_out import ClusterTooSmall, actors_that_fit, evaluate_with_ray, plan_actors  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cluster():
    """The head (2 CPUs, 2 GPUs, resource "head") and two nodes (1 CPU, 1 GPU, resource "node")."""
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 2, "resources": {"head": 4}})
    for _ in range(2):
        c.add_node(num_cpus=1, num_gpus=1, resources={"node": 4})
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_bundle):
    return write_dataset(tmp_path_factory.mktemp("ray_eval"), tiny_bundle("region"))


def run(data, out, ckpt, **kw):
    options = dict(model=str(ckpt), workers=2, batch_size=6, max_new_tokens=MAX_NEW_TOKENS, force=SCRIPT,
                   engine_options={"max_batch_size": 6}, progress=False)
    return evaluate_with_ray(data, out, **{**options, **kw})


def test_two_actors_on_one_node_each_see_their_own_gpu(cluster, dataset, tiny_ckpt, tmp_path):
    data, expected = dataset
    out = tmp_path / "results.jsonl"
    summary = run(data, out, tiny_ckpt("region"), ray_options={"resources": {"head": 1}})
    rows = read_rows(out)
    assert_rows(rows, expected)
    assert [r["id"] for r in rows] == list(expected)  # input order, as locally
    assert summary.items == 40 and summary.errors == 3
    assert len(summary.workers) == 2 and len({w["node"] for w in summary.workers}) == 1
    assert sorted(w["cuda_visible_devices"] for w in summary.workers) == ["0", "1"]


def test_actors_on_two_nodes_and_a_resumed_run(cluster, dataset, tiny_ckpt, tmp_path):
    data, expected = dataset
    out = tmp_path / "results.jsonl"
    lines = [json.dumps(expected[i]) + "\n" for i in list(expected)[:9] if not i.startswith("bad")]
    out.write_text("".join(lines) + '{"id": "item-09", "pre')  # a run that crashed mid-write
    summary = run(data, out, tiny_ckpt("region"), ray_options={"resources": {"node": 1}})
    assert summary.skipped == 9 and summary.items == 31
    assert_rows(read_rows(out), expected)
    assert len(summary.workers) == 2 and len({w["node"] for w in summary.workers}) == 2
    head = cluster.head_node.node_id
    assert head not in {w["node"] for w in summary.workers}


def test_a_pool_the_cluster_cannot_hold_fails_at_once(cluster, dataset, tiny_ckpt, tmp_path):
    data, _ = dataset
    with pytest.raises(ClusterTooSmall, match=r"3 worker\(s\) of 2 GPU\(s\) and 1 CPU\(s\) each were asked for; the "
                                              r"Ray cluster holds 1 such: 3 node\(s\) .*4 GPU\(s\) in all"):
        run(data, tmp_path / "out.jsonl", tiny_ckpt("region"), workers=3, gpus_per_worker=2.0)
    assert not (tmp_path / "out.jsonl").exists() or (tmp_path / "out.jsonl").read_text() == ""


def test_actor_plans_against_node_resources(capsys):
    gpu_nodes = [{"CPU": 8.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 1.0}]
    cpu_nodes = [{"CPU": 8.0}, {"CPU": 2.0}]
    assert plan_actors("worker", 3, None, 1.0, gpu_nodes) == 1.0  # a GPU each, where there are GPUs
    assert plan_actors("worker", 10, None, 1.0, cpu_nodes) == 0.0  # none anywhere: CPU actors, said once
    assert capsys.readouterr().out == "the Ray cluster has no GPU: 10 worker(s) run on the CPU\n"
    assert plan_actors("worker", 2, 0.5, 4.0, gpu_nodes) == 0.5
    assert actors_that_fit(gpu_nodes, 0.5, 1.0) == 6 and actors_that_fit(gpu_nodes, 1.0, 4.0) == 3
    with pytest.raises(ClusterTooSmall, match=r"1 replica\(s\) of 1 GPU\(s\) .* 2 node\(s\) \(0 GPU/8 CPU, 0 GPU/2 CPU\)"):
        plan_actors("replica", 1, 1.0, 1.0, cpu_nodes)  # GPUs asked for explicitly: fail, do not fall back
    with pytest.raises(ClusterTooSmall, match=r"4 worker\(s\) of 1 GPU\(s\) and 1 CPU\(s\) each .* holds 3 such"):
        plan_actors("worker", 4, None, 1.0, gpu_nodes)
    with pytest.raises(ClusterTooSmall, match="holds 2 such"):
        plan_actors("worker", 3, 0.0, 4.0, [{"CPU": 8.0}, {"CPU": 3.0}])


def test_eval_cli_on_an_existing_cluster(cluster, dataset, tiny_ckpt, tmp_path):
    data, expected = dataset
    out = tmp_path / "results.jsonl"
    done = subprocess.run([sys.executable, "-m", "vpt_fast.cli", "eval", str(data), "--out", str(out), "--model",
                           str(tiny_ckpt("region")), "--force", SCRIPT, "--max-new-tokens", str(MAX_NEW_TOKENS),
                           "--limit", "14", "--batch-size", "4", "--ray", cluster.address, "--workers", "2",
                           "--gpus-per-worker", "1"],
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "items: 14 answered now" in done.stdout and done.stdout.count("worker: node") == 2, done.stdout
    assert [r["id"] for r in read_rows(out)] == list(expected)[:14]
    assert_rows(read_rows(out), {k: expected[k] for k in list(expected)[:14]})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_two_replicas(cluster, tiny_ckpt, tiny_bundle):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vpt_fast.cli", "serve", "--ray", cluster.address, "--replicas", "2",
                             "--gpus-per-replica", "1", "--port", str(port), "--model", str(tiny_ckpt("region")),
                             "--served-model-name", "tiny", "--max-batch-size", "4", "--api-key", "k"],
                            env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    reader = threading.Thread(target=lambda: log.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not any("serving on" in line for line in log):
            assert proc.poll() is None and time.monotonic() < deadline, "".join(log)
            time.sleep(0.2)
        bundle = tiny_bundle("region")
        jobs = [(rand_image(50 + 4 * i, 40 + 3 * i, 300 + i), f"Question {i}?") for i in range(8)]
        want = Engine(bundle).generate([image for image, _ in jobs], ["<image>" + q for _, q in jobs], 8,
                                       [toks(bundle.tokenizer, SCRIPT)] * 8)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120)
        got: list = [None] * 8

        def ask(i):
            image, question = jobs[i]
            messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                     {"type": "text", "text": question}]}]
            raw = client.chat.completions.with_raw_response.create(model="tiny", messages=messages, max_tokens=8,
                                                                   temperature=0, extra_body={"vpt_force": SCRIPT})
            got[i] = (raw.headers.get("x-vpt-fast-replica"), raw.parse())

        ask(0)  # once alone first: lazy imports then happen in this thread (CPython 3.11's parser is not thread-safe)
        threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for (replica, completion), w in zip(got, want):
            vpt = completion.choices[0].model_extra["vpt"]
            assert completion.choices[0].message.content == w.text and vpt["token_ids"] == w.token_ids
            assert [t["kind"] for t in vpt["trace"]] == ["region"]
        from ray import serve

        replicas = {replica for replica, _ in got}
        assert None not in replicas, replicas  # every answer names its replica (which one is Serve's choice)
        deployment = serve.status().applications["vpt-fast"].deployments["VptFastServer"]
        assert deployment.replica_states.get("RUNNING") == 2, deployment.replica_states

        image, question = jobs[0]
        stream = client.chat.completions.create(
            model="tiny", max_tokens=8, temperature=0, stream=True, extra_body={"vpt_force": SCRIPT},
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                                   {"type": "text", "text": question}]}])
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).endswith(want[0].text)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong", max_retries=0).models.list()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert code == 130, "".join(log)
    from ray import serve

    assert "vpt-fast" not in serve.status().applications  # Ctrl-C took the deployment down
