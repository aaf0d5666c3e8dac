"""MLPerf LoadGen: the run spec, the child process that runs one test, user.conf, the detail log, and
the rate each run uses."""
