"""
Tests for L{oaiproxy.ledger}.
"""
