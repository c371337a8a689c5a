"""
Tests for L{oaiproxy.observe}.
"""
