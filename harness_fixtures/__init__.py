"""harness-fixtures: MLPerf LoadGen benchmarks of LLM serving engines as pytest tests."""

__version__ = "0.1.0"
