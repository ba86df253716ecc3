"""A real multi-process run: two processes of 2 CPU devices each, joined by
``jax.distributed`` (gloo collectives) through ``maybe_initialize_distributed``, train a tiny
Llama with replay for a few sharded steps and end with the same parameters and losses as one
process with 4 devices on the same mesh.

Each process only loads its half of every global batch (asserted in the worker,
tests/multiprocess_worker.py). Two meshes: data=2 x fsdp=2 (the data axis spans the
processes) and fsdp=2 x tensor=2 (fsdp spans them: each process holds half the parameters).
The pytest process has 8 forced devices (conftest.py), so every run here is a subprocess.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cpt_jax import sharding as sharding_lib
from cpt_jax.run_config import default_config

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` skips it in the inner loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))  # the coordinator binds every interface
        return s.getsockname()[1]


def _env(n_devices: int) -> dict:
    # LLVM optimisation level 0 halves the compile time of the step (the test is all compile);
    # every run here uses the same flags, so the comparison is like for like.
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
             if not f.startswith(("--xla_force_host_platform_device_count",
                                  "--xla_backend_optimization_level"))]
    flags += [f"--xla_force_host_platform_device_count={n_devices}",
              "--xla_backend_optimization_level=0"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(flags),
               PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID",
              "JAX_LOCAL_DEVICE_IDS"):
        env.pop(k, None)
    return env


def _run_all(runs, tmp_path, timeout=TIMEOUT_S, script=WORKER):
    """Start every (name, args, env) at once; wait for all. If one fails or time runs out,
    stop the others (a process waiting on a dead peer would otherwise hang). Returns None,
    or the failure with every process's output."""
    procs = []
    for name, args, env in runs:
        log = open(tmp_path / f"{name}.log", "w+")
        procs.append((name, subprocess.Popen([sys.executable, script, *args], env=env,
                                             cwd=REPO, stdout=log, stderr=subprocess.STDOUT),
                      log))
    deadline = time.monotonic() + timeout
    failed = None
    while None in (codes := [p.poll() for _, p, _ in procs]):
        if any(c not in (None, 0) for c in codes):
            failed = "a process failed"
            break
        if time.monotonic() > deadline:
            failed = f"timed out after {timeout} s"
            break
        time.sleep(0.2)
    if failed is None and any(p.returncode != 0 for _, p, _ in procs):
        failed = "a process failed"
    report = []
    for name, p, log in procs:  # stop the rest, in order; only the ones started here
        if p.poll() is None:
            p.kill()
            p.wait()
        log.seek(0)
        report.append(f"----- {name} (exit code {p.returncode}) -----\n{log.read()[-20000:]}")
        log.close()
    return f"{failed}\n" + "\n".join(report) if failed else None


def _with_port(run, port: int):
    name, args, env = run
    if "--port" in args:
        args = list(args)
        args[args.index("--port") + 1] = str(port)
    return name, args, env


def _load(out):
    params = dict(np.load(os.path.join(out, "params.npz")))
    infos = sorted((json.load(open(os.path.join(out, f))) for f in os.listdir(out)
                    if f.startswith("process")), key=lambda d: d["process_index"])
    return params, infos


# data=2 x fsdp=2: the data axis spans the processes (gradients are all-reduced across them),
# fsdp splits the parameters over each process's two devices. fsdp=2 x tensor=2: fsdp spans
# the processes, so each process holds only half of every embed-sharded parameter.
MESHES = ["data=2,fsdp=2", "fsdp=2,tensor=2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Train on every mesh with two processes of 2 devices and with one process of 4 (all
    three processes at once); {mesh: (two-process outputs, one-process outputs)}."""
    tmp = tmp_path_factory.mktemp("multiprocess")
    meshes = [a for m in MESHES for a in ("--mesh", m)]
    procs = [(f"process{i}", ["--out", str(tmp / "multi"), *meshes, "--num-processes", "2",
                              "--process-id", str(i), "--port", "PORT"], _env(2))
             for i in range(2)]
    procs.append(("reference", ["--out", str(tmp / "ref"), *meshes], _env(4)))
    for _ in range(2):
        port = _free_port()
        procs = [_with_port(p, port) for p in procs]
        error = _run_all(procs, tmp)
        # The free port can be taken between _free_port() and the coordinator's bind: retry.
        if not error or not any(m in error for m in ("Failed to start RPC server",
                                                      "Failed to add port")):
            break
    if error:
        pytest.fail(error, pytrace=False)
    name = lambda m: m.replace("=", "").replace(",", "_")  # noqa: E731 (the worker's mesh_name)
    return {m: (_load(tmp / "multi" / name(m)), _load(tmp / "ref" / name(m))) for m in MESHES}


@pytest.mark.parametrize("mesh", MESHES)
def test_two_processes_match_one(runs, mesh):
    (params, infos), (ref_params, (ref_info,)) = runs[mesh]
    assert [(d["process_index"], d["process_count"], d["local_devices"], d["devices"])
            for d in infos] == [(0, 2, 2, 4), (1, 2, 2, 4)]
    assert (ref_info["process_count"], ref_info["local_devices"]) == (1, 4)
    assert infos[0]["mesh"] == ref_info["mesh"]

    # The two processes split every global batch into disjoint halves and read only those.
    assert sorted(tuple(d["rows"]) for d in infos) == [(0, 4), (4, 8)]
    assert ref_info["rows"] == [0, 8]
    assert [d["rows_read"] for d in infos] == [ref_info["rows_read"] // 2] * 2 == [12, 12]

    # Parameters: the one process holds everything; across processes they are split as the
    # mesh says.
    assert set(ref_info["held_fraction"].values()) == {1.0}
    embed = "['embed']['embedding']"
    for d in infos:
        held = d["held_fraction"]
        assert held[embed] == (0.5 if mesh == "fsdp=2,tensor=2" else 1.0), held

    # Both processes saw the same (replicated) metrics, equal to the one-process run's.
    assert infos[0]["metrics"] == infos[1]["metrics"]
    assert len(infos[0]["metrics"]) == len(ref_info["metrics"]) == 3
    for got, want in zip(infos[0]["metrics"], ref_info["metrics"]):
        assert got["n_replay"] == want["n_replay"] == 2 and got["update_norm"] > 0
        for k in ("loss", "loss_current", "loss_replay", "grad_norm_current",
                  "grad_norm_replay", "grad_cos", "update_norm", "lr", "tokens"):
            np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert infos[0]["final_step"] == ref_info["final_step"] == 3

    # The final parameters (gathered by process 0) equal the one-process run's. Seen:
    # bit-equal on fsdp=2 x tensor=2; on data=2 x fsdp=2 up to 7.2e-7 (embedding entries of
    # ~8e-3, 1e-4 of one step): the cross-process reduction sums in another order, and Adam's
    # g / (|g| + eps) magnifies that in near-zero gradients. Deterministic, not flaky.
    assert params.keys() == ref_params.keys() and len(params) > 5
    diff = 0.0
    for k in params:
        assert params[k].shape == ref_params[k].shape, k
        np.testing.assert_allclose(params[k], ref_params[k], rtol=1e-5, atol=1e-6, err_msg=k)
        diff = max(diff, float(np.abs(params[k] - ref_params[k]).max()))
    print(f"{mesh}: max |param difference| two processes vs one: {diff:.3g}")


def test_two_process_training_run_matches_one(tmp_path):
    """The whole driver (loop.run: data preparation, sampler, loader, checkpoints, eval,
    results) in two processes of 2 devices equals it in one process of 4, on a mesh whose
    fsdp axis spans the processes. Process 0 prepares the data while process 1 waits.

    On the way, process 1 alone gets SIGTERM: JAX's preemption sync manager makes both
    processes save the same step and stop; rerun, they resume from it."""
    from cpt_jax.train.checkpoint import RunCheckpointer, load_params

    script = os.path.join(REPO, "tests", "run_worker.py")
    (tmp_path / "data").mkdir()
    common = [str(tmp_path / "data"), "--config", "loop", "--mesh", "data=1,fsdp=2,tensor=2"]
    error = _run_all([("one", [common[0], str(tmp_path / "one"), *common[1:]], _env(4))],
                     tmp_path, script=script)
    assert error is None, error

    def two_processes(extra):
        for _ in range(2):
            port = _free_port()
            error = _run_all([(f"process{i}", [common[0], str(tmp_path / "two"), *common[1:],
                                               "--coordinator", f"localhost:{port}",
                                               "--num_processes", "2", "--process_id", str(i),
                                               *extra[i]], _env(2)) for i in range(2)],
                             tmp_path, script=script)
            if not error or "Failed to start RPC server" not in error:
                break
        assert error is None, error
        return [(tmp_path / f"process{i}.log").read_text() for i in range(2)]

    logs = two_processes([[], ["--signal", "SIGTERM", "--at", "5"]])
    stops = [re.findall(r"preempted: stopped, and the newest checkpoint is step (\d+)", log) for log in logs]
    assert stops[0] == stops[1] and len(stops[0]) == 1, logs
    stop = int(stops[0][0])
    assert 5 <= stop < 20 and not (tmp_path / "two" / "results.json").exists()
    assert RunCheckpointer(tmp_path / "two" / "checkpoints").latest_step() == stop
    two_processes([[], []])  # resumed to the end

    one = json.loads((tmp_path / "one" / "results.json").read_text())
    two = json.loads((tmp_path / "two" / "results.json").read_text())
    assert two["config"]["distributed"]["num_processes"] == 2
    assert [t["steps"] for t in two["task_stats"]] == [t["steps"] for t in one["task_stats"]]
    np.testing.assert_allclose(two["loss_matrix"], one["loss_matrix"], rtol=1e-5)
    for a, b in zip(jax_leaves(load_params(tmp_path / "two" / "final_params")[1]),
                    jax_leaves(load_params(tmp_path / "one" / "final_params")[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # both processes wrote their shards of every checkpoint; task ends are kept
    assert {8, 14, 20} <= set(RunCheckpointer(tmp_path / "two" / "checkpoints").step_dirs())


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_distributed_kwargs_leave_unset_fields_to_auto_detection():
    defaults = default_config().distributed  # "", 0, -1: unset
    assert sharding_lib.distributed_kwargs(defaults) == {}
    dist = dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=0,
                local_device_ids=[0, 1])
    assert sharding_lib.distributed_kwargs(dist) == dist
    assert sharding_lib.distributed_kwargs(dict(num_processes=2, process_id=None,
                                                local_device_ids=3)) == {
        "num_processes": 2, "local_device_ids": [3]}
    assert sharding_lib.distributed_kwargs(dict(coordinator_address=None,
                                                local_device_ids=[])) == {}


def test_maybe_initialize_distributed_passes_only_set_fields(monkeypatch):
    import jax

    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    config = default_config()
    sharding_lib.maybe_initialize_distributed(config)  # enabled=False: nothing happens
    assert calls == []
    config.distributed.enabled = True
    config.distributed.num_processes = 2
    before = jax.config.jax_cpu_collectives_implementation
    try:
        jax.config.update("jax_cpu_collectives_implementation", None)  # as in older JAX
        sharding_lib.maybe_initialize_distributed(config)
        assert calls == [{"num_processes": 2}]
        assert jax.config.jax_cpu_collectives_implementation == "gloo"
        jax.config.update("jax_cpu_collectives_implementation", "mpi")  # a choice is kept
        sharding_lib.maybe_initialize_distributed(config)
        assert jax.config.jax_cpu_collectives_implementation == "mpi"
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
    # A process that already joined does not join again.
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    sharding_lib.maybe_initialize_distributed(config)
    assert len(calls) == 2


def test_two_processes_prepare_the_same_files_as_one(tmp_path):
    """A two-process run prepares its data as one process does: each process tokenizes its
    share of every domain's units into the shared cache, process 0 assembles them, and
    the folders hold the same bytes as one process's."""
    from cpt_jax.data import prepare
    from cpt_jax.data import tokenizer as tk

    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "x = 1", "\n", "déjà"]
    (tmp_path / "src").mkdir()
    for i in range(60):
        (tmp_path / "src" / f"{i:03d}.txt").write_text(
            " ".join(rng.choice(words, size=rng.integers(1, 150))))
    domains = [{"name": "toy", "kind": "text_glob", "pattern": str(tmp_path / "src" / "*.txt")},
               {"name": "docs", "kind": "demo", "demo": "python_docs", "max_chars": 20_000}]
    tok = tk.train_tokenizer(domains, str(tmp_path / "tok"), 400, sample_chars=30_000)
    (tmp_path / "cfg.py").write_text(
        "from cpt_jax.run_config import default_config\n"
        "def get_config():\n"
        "    c = default_config()\n"
        "    c.model.vocab_size, c.seq_len = 400, 16\n"
        f"    c.tokenizer.path = {tok.path!r}\n"
        f"    c.data.domains = {domains!r}\n"
        "    c.data.workers = 1\n"
        "    c.tasks = [{'domain': 'toy', 'steps': 1}, {'domain': 'docs', 'steps': 1}]\n"
        "    return c\n")
    shard_chars = 4000  # several units per domain
    script = os.path.join(REPO, "tests", "prepare_worker.py")
    args = [str(tmp_path / "cfg.py"), str(tmp_path / "run"), str(shard_chars)]
    for _ in range(2):
        port = _free_port()
        error = _run_all([(f"prep{i}", [*args, str(tmp_path / f"out{i}.json"),
                                        "--coordinator", f"localhost:{port}",
                                        "--num_processes", "2", "--process_id", str(i)],
                           _env(1)) for i in range(2)], tmp_path, timeout=120, script=script)
        if not error or "Failed to start RPC server" not in error:
            break
    assert error is None, error
    outs = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert outs[0]["dirs"] == outs[1]["dirs"]
    assert outs[0]["units"] and outs[1]["units"]  # both tokenized a share
    assert not set(outs[0]["units"]) & set(outs[1]["units"])

    saved = prepare.SHARD_CHARS
    prepare.SHARD_CHARS = shard_chars
    try:
        one = prepare.prepare_domains(domains, tok, str(tmp_path / "one"), 16,
                                      val_fraction=0.05, progress=False)
    finally:
        prepare.SHARD_CHARS = saved
    for name, splits in one.items():
        folder = os.path.dirname(splits["train"].path)
        two = outs[0]["dirs"][name]
        assert os.path.basename(two) == os.path.basename(folder)
        assert sorted(os.listdir(two)) == sorted(os.listdir(folder))
        for f in os.listdir(folder):
            assert open(os.path.join(two, f), "rb").read() == \
                open(os.path.join(folder, f), "rb").read(), (name, f)
