"""
Tests for L{oaiproxy.sharedstate}.
"""
