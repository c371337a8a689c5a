"""
Tests for L{oaiproxy.daemon}.
"""
