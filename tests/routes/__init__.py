"""
Tests for L{oaiproxy.routes}.
"""
