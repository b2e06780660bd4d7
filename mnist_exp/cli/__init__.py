"""The command lines: parse, call, exit code."""
