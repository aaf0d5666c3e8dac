"""Suite policy lives here (hook implementations such as pytest_harness_update_metadata).

The harness plugin itself is registered once, by the pytest11 entry point of the installed package;
do not add ``pytest_plugins = ["harness_fixtures.plugin"]`` here (pluggy refuses a second registration).
"""
