"""One MLPerf LoadGen test per model × scenario, ids ``<model>_<scenario>``.

The cases are data: ``benchmarks/models/*.yaml``. ``pytest benchmarks -k llama31_8b_server`` selects
the Llama 3.1 8B Server test; ``pytest benchmarks -k sim`` runs the simulator cases.
"""

from harness_fixtures.plugin import HarnessBenchmark


def test_benchmark(harness_benchmark: HarnessBenchmark) -> None:
    result = harness_benchmark.run()
    harness_benchmark.check(result)
