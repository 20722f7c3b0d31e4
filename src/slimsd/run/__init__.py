"""Running a model: the fast runtime, generation, PNG info and output files, the web UI."""
