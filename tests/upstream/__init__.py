"""
Tests for L{oaiproxy.upstream}.
"""
