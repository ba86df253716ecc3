"""scripts/gpu_benchmark.sh --dry_run on the CPU: the script's syntax, every run's
benchmark.py arguments (parsed by benchmark.py, configs and overrides loaded) and its
summary are checked without running anything heavy; a bad argument fails, naming the run."""

import os
import subprocess

from tiny_runs import ROOT


def _dry_run(script_dir, out):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    return subprocess.run(["bash", os.path.join(script_dir, "gpu_benchmark.sh"), "--dry_run",
                           "--extra", str(out)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_dry_run_checks_every_run_and_a_bad_argument_fails(tmp_path):
    r = _dry_run(os.path.join(ROOT, "scripts"), tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    names = ["1b_flash_b16", "l32_flash_b16", "560m_methods_b8", "1b_decode", "1b_xla_b8",
             "1b_flash_b64_mb4", "l32_xla_b8"]
    ok = [line.split(":")[0][3:] for line in r.stdout.splitlines() if line.startswith("ok ")]
    assert ok == ["bash syntax of " + os.path.join(ROOT, "scripts", "gpu_benchmark.sh")] \
        + names + ["summary"]
    assert "16 x 2048" in r.stdout and "methods plain,replay,agem,reptile,mer" in r.stdout
    assert not list((tmp_path / "out").iterdir())  # nothing was run

    # the same script with a misspelt override, next to the real benchmark.py and configs
    (tmp_path / "scripts").mkdir()
    os.symlink(os.path.join(ROOT, "scripts", "benchmark.py"),
               tmp_path / "scripts" / "benchmark.py")
    os.symlink(os.path.join(ROOT, "configs"), tmp_path / "configs")
    text = open(os.path.join(ROOT, "scripts", "gpu_benchmark.sh")).read()
    (tmp_path / "scripts" / "gpu_benchmark.sh").write_text(
        text.replace("--config.microbatches=4", "--config.microbatchez=4"))
    r = _dry_run(str(tmp_path / "scripts"), tmp_path / "out2")
    assert r.returncode != 0
    assert "1b_flash_b64_mb4: arguments rejected" in r.stderr and "microbatchez" in r.stderr
