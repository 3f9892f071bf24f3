"""The benchmarks never overwrite an earlier results file."""
from reference import benchmark_module


def test_a_new_results_file_never_replaces_an_earlier_one(tmp_path):
    io = benchmark_module("results_io")
    first = io.fresh_path(tmp_path, "2026-11-29-host")
    assert first == tmp_path / "2026-11-29-host.json"
    first.write_text("{}")
    second = io.fresh_path(tmp_path, "2026-11-29-host")
    assert second == tmp_path / "2026-11-29-host-2.json"
    second.write_text("{}")
    assert io.fresh_path(tmp_path, "2026-11-29-host") == tmp_path / "2026-11-29-host-3.json"
    assert first.read_text() == "{}" and second.read_text() == "{}"


def test_the_cpu_is_named():
    cpu = benchmark_module("results_io").cpu_model()
    assert isinstance(cpu, str) and cpu.strip()
