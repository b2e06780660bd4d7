"""One experiment from a config: build, train, test, record; the run's end when it fails."""
