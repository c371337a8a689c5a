"""
End-to-end tests: each starts real processes (the daemon under C{twistd},
the fake upstream, systemd's tools) on 127.0.0.1.  They are the slow part
of the suite, kept apart so the README's test command runs them once, and
the in-memory tests beside the package stay seconds.
"""
