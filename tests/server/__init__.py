"""
Tests for L{oaiproxy.server}.
"""
