"""sweep.py --backend ray on a local Ray cluster started here (2 CPUs, loopback, stopped at the end): the same
results as the local backend, a lost worker's run retried and resumed, finished runs skipped, and a real tiny IQL
run identical on both backends."""
import json
import shutil

import pytest

import sweep
from test_benchmarks import DATASET, ROOT, fake_root, read_csv, write_protocol  # noqa: F401 (fixture)

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def cluster(minari_store):
    """A local Ray cluster for this module's tests (after minari_store: its workers inherit the environment)."""
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=80 * 1024 ** 2, log_to_driver=False,
             _temp_dir="/tmp/ray_o2o_tests")
    yield
    ray.shutdown()


def _rows_without_time(path):
    return [{k: v for k, v in r.items() if k not in ("wall_time", "wall_time_source")} for r in read_csv(path)]


def test_ray_backend_matches_local_and_skips_finished_runs(cluster, fake_root, tmp_path):  # noqa: F811
    root, proto = fake_root
    other = tmp_path / "root_local"
    shutil.copytree(root, other)
    assert sweep.main([str(proto)], root=other, results_dir=tmp_path / "local") == 0
    assert sweep.main([str(proto), "--backend", "ray"], root=root, results_dir=tmp_path / "ray") == 0
    assert _rows_without_time(tmp_path / "ray" / "sweep_fake.csv") == \
        _rows_without_time(tmp_path / "local" / "sweep_fake.csv")
    for seed in (0, 1):
        rd = root / "out" / "fake" / DATASET / f"seed{seed}"
        done = json.loads((rd / "done.json").read_text())
        assert done["per_seed"][str(seed)]["evals"] == 5 and (rd / "eval_times.json").exists()
    calls = (root / "out" / "fake" / DATASET / "seed0" / "calls.log").read_text()
    assert sweep.main([str(proto), "--backend", "ray"], root=root, results_dir=tmp_path / "ray") == 0
    assert (root / "out" / "fake" / DATASET / "seed0" / "calls.log").read_text() == calls  # not run again


def test_lost_worker_is_retried_and_resumes(cluster, fake_root, tmp_path):  # noqa: F811
    root, proto = fake_root
    rd = root / "out" / "fake" / DATASET / "seed1"
    rd.mkdir(parents=True)
    (rd / "kill_parent").write_text("2")  # after 2 evaluations the run SIGKILLs the Ray worker running it
    assert sweep.main([str(proto), "--backend", "ray"], root=root, results_dir=tmp_path) == 0
    calls = (rd / "calls.log").read_text().splitlines()
    assert len(calls) == 2 and "--resume" not in calls[0] and calls[1].endswith("--resume")
    assert [r["normalized_score"] for r in sweep.read_records(rd / "eval.jsonl")] == [1.0, 11.0, 21.0, 31.0, 41.0]
    assert json.loads((rd / "done.json").read_text())["attempts"] == 1  # the lost attempt never reported back


def test_failed_run_is_retried_then_reported(cluster, fake_root, tmp_path, capsys):  # noqa: F811
    root, proto = fake_root
    rd = root / "out" / "fake" / DATASET / "seed0"
    rd.mkdir(parents=True)
    (rd / "crash_after").write_text("1")  # exit 3 after one evaluation; the retry resumes and finishes
    assert sweep.main([str(proto), "--backend", "ray", "--retries", "1"], root=root, results_dir=tmp_path) == 0
    assert len(sweep.read_records(rd / "eval.jsonl")) == 5
    assert json.loads((rd / "done.json").read_text())["attempts"] == 2
    shutil.rmtree(root / "out")
    write_protocol(proto, algorithms={"fake": {"online_steps": 3, "offline_checkpoint": "missing"}})
    assert sweep.main([str(proto), "--backend", "ray", "--retries", "0"], root=root, results_dir=tmp_path,
                      ) == 1  # exit 4 from the script, no retry left: reported with its log
    assert "exit code 4" in capsys.readouterr().out


def test_ray_options_are_checked(fake_root, capsys):  # noqa: F811
    root, proto = fake_root
    assert sweep.main([str(proto), "--backend", "ray", "--jobs", "2"], root=root) == 2
    assert "--wrap, --jobs and --pin are local-backend options" in capsys.readouterr().err


def test_real_iql_run_identical_on_both_backends(cluster, tiny_dataset, tmp_path):
    """The smoke protocol's IQL entry (2 seeds in one process) on the tiny dataset: the same evaluations, bit for
    bit, whether the local backend or a Ray task runs it."""
    assert tiny_dataset("hopper", "medium") == DATASET
    outs = {}
    for backend in ("local", "ray"):
        proto = tmp_path / f"smoke_{backend}.yaml"
        proto.write_text((ROOT / "benchmarks" / "protocols" / "smoke.yaml").read_text())
        write_protocol(proto, output_root=str(tmp_path / backend), name="smoke")
        args = [str(proto), "--only", "algo=iql"] + (["--backend", "ray", "--cpus_per_run", "2"]
                                                     if backend == "ray" else [])
        assert sweep.main(args, results_dir=tmp_path / backend) == 0
        outs[backend] = _rows_without_time(tmp_path / backend / "sweep_smoke.csv")
    assert len(outs["local"]) > 4 and outs["ray"] == outs["local"]
