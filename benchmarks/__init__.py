"""Benchmark suite: our server against a bare reference server, same load generators, same machine."""
