"""
Tests for L{oaiproxy.access}.
"""
